"""Every exception the pipeline raises on purpose, in one place (httpx's ``_exceptions.py`` is the model).
Its root, :class:`PipelineError`, is an :class:`olmocr.errors.OlmocrError`.

Each message is user-facing: one line that says what is wrong and what to do.

```
PipelineError
├── ConfigError (ValueError) .............. a setting or input the run cannot use
│   ├── FleetConfigError .................. a server list, weight or key file
│   ├── WorkspaceError .................... a workspace that cannot be used (path, permissions, credentials, bucket)
│   ├── NoInput ........................... --pdfs gave nothing to queue and the workspace has nothing to do
│   └── UsageError ........................ a command-line mistake: ``prog: error: ...`` on one line, exit status 2
├── ModelAnswerError ...................... an answer that came back whole but is not a usable olmOCR page
│   └── FrontMatterError .................. a model answer without valid olmOCR front matter
├── FilterUnavailable (RuntimeError) ...... --apply_filter without its optional dependencies
├── ServerError ........................... a server cannot take this run's work
│   ├── ServerNotReady .................... never answered, or does not serve the olmocr model
│   │   └── ModelListMissing .............. (servers/client.py) no usable /v1/models on a server named explicitly
│   ├── ServerMismatch .................... answers, but cannot serve the run as configured
│   └── InternalServerError ............... internal mode: the run's own server could not start or was given up
├── TransportError ........................ no complete HTTP response (refused, reset, malformed)
│   ├── ConnectionRefused ................. nothing listens there (yet): the one start-up error worth waiting on
│   ├── NotHttp ........................... something answered, but not in HTTP: a wrong port or scheme
│   ├── RequestTimeout .................... no complete response within the request's timeout
│   ├── TlsError .......................... the certificate could not be verified, or no TLS there
│   └── ServerAborted ..................... the server left rotation; the request is resent elsewhere
├── RequestRejected ....................... a 4xx or unusable answer: a failed page attempt (``retryable``)
├── RenderError ........................... a document or page cannot be opened or rendered
│   └── RenderTimeLimit ................... (pages/render.py) a page ran past --render_timeout
└── LeaseLost ............................. another worker owns this work item now
```
"""

from __future__ import annotations

from olmocr.errors import OlmocrError


class PipelineError(OlmocrError):
    """Base of every exception the pipeline raises on purpose."""


class ConfigError(PipelineError, ValueError):
    """A setting or input the run cannot use; the message says what to fix."""


class FleetConfigError(ConfigError):
    """A server list, weight or key file that cannot be used; the message says what to fix."""


class WorkspaceError(ConfigError):
    """The workspace cannot be used (a file, read-only, no credentials, no bucket); the message says what to do."""


class NoInput(ConfigError):
    """No input could be queued and the workspace has nothing to do; the message sums up why."""


class UsageError(ConfigError):
    """A mistake in the command line or its settings, found before any work: printed as ``prog: error: ...``
    on one line, exit status 2 (:func:`olmocr.pipeline.flags.usage_exit`). ``see_help``: the message ends with
    ``(see --help)``, as argparse's own errors do."""

    def __init__(self, message: str, *, see_help: bool = False) -> None:
        super().__init__(message)
        self.see_help = see_help


class ModelAnswerError(PipelineError, ValueError):
    """An answer that came back whole but is not a usable olmOCR page (a failed page attempt, not a setting)."""


class FrontMatterError(ModelAnswerError):
    """The answer does not carry a valid olmOCR front matter."""


class FilterUnavailable(PipelineError, RuntimeError):
    """The optional filter dependencies are not installed; the message says what to install."""


class ServerError(PipelineError):
    """A server cannot take this run's work; the message is user-facing."""


class ServerNotReady(ServerError):
    """Fatal: the server never answered, or does not serve the olmocr model. Message is user-facing."""


class ServerMismatch(ServerError):
    """The server cannot serve this run as configured; the message says what to change (one line)."""


class InternalServerError(ServerError):
    """The run's server could not be started or was given up on; the message is user-facing."""


class TransportError(PipelineError):
    """The request did not get a complete HTTP response (refused, reset, timed out, malformed)."""


class ConnectionRefused(TransportError):
    """Nothing listens at the address (yet): a server still starting, or a wrong port."""


class NotHttp(TransportError):
    """The peer answered, but not with HTTP (a TLS port spoken to in plain HTTP, SSH, a database ...)."""


class RequestTimeout(TransportError):
    """No complete response within the per-request timeout."""


class TlsError(TransportError):
    """The server's certificate could not be verified (untrusted CA, wrong host name), or the handshake failed
    (https:// to a plain-HTTP port): a misconfiguration."""


class ServerAborted(TransportError):
    """A request given up because its server was taken out of rotation; it is resent elsewhere."""


class RequestRejected(PipelineError):
    """The server refused the request (4xx) or answered nothing usable: a failed attempt.

    ``retryable`` is False when sending it again cannot help (``RETRYABLE_4XX`` in the client).
    """

    def __init__(self, status: int, detail: str, *, retryable: bool = True) -> None:
        super().__init__(f"server returned {status}: {detail}")
        self.status = status
        self.retryable = retryable


class RenderError(PipelineError):
    """A document or page cannot be opened or rendered; the message is the reason shown to users."""


class LeaseLost(PipelineError):
    """Another worker took over this item (our lease expired and was claimed), or it is gone."""
