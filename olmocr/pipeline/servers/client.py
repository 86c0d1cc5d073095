"""The client for one vLLM server: start-up verification, probes, and one watched chat-completion request.

Contract (the retry policy across servers lives in :mod:`olmocr.pipeline.servers.fleet`):

* ``/v1/models`` must list ``olmocr`` before any work is claimed (:meth:`ServerClient.wait_ready`).
* The initial connection makes 10 attempts with exponential backoff (never more than 60 s apart), but only
  for answers that may change (connection refused, reset, timeout, 5xx); a definite one (not HTTP, not
  vLLM's API, TLS mismatch, rejected key) fails at once.
* Every request has a timeout (:meth:`ServerClient.post_chat`): a request is abandoned when the server has
  finished no request for ``request_timeout`` seconds (a hung engine).
* :meth:`ServerClient.probe` is the re-admission check: ``/health``, the model list and, optionally, one
  tiny completion (only a real request proves a server makes progress).
* A 200 with ``finish_reason: abort`` (vLLM cut the request short while stopping) is resent like a 5xx.
* A 4xx that no resend can change (400: the request does not fit the server, 401, 413 ...) is a
  :class:`RequestRejected` with ``retryable`` False: the page gives up at once instead of using its attempts.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time

from olmocr.envs import SERVED_MODEL_NAME
from olmocr.pipeline import defaults
from olmocr.pipeline.errors import (
    ConnectionRefused,
    NotHttp,
    RequestTimeout,
    ServerAborted,
    ServerNotReady,
    TlsError,
    TransportError,
)
from olmocr.pipeline.servers.checks import (
    ServerInfo,
    parse_models,
    parse_version_body,
    read_server_info,
    start_up_delays,
)
from olmocr.pipeline.servers.http import HttpPool, Response

logger = logging.getLogger("olmocr.pipeline")

MODEL_NAME = SERVED_MODEL_NAME
MAX_BACKOFF_S = 60.0
PROBE_TIMEOUT_S = 10.0
#: A request is abandoned (and resent) when the server finished *no* request for ``request_timeout`` seconds
#: while it waited -- a hung engine -- so requests merely queued on a busy server are not thrown away. As a
#: guard against lost connections, no request waits longer than ``HARD_TIMEOUT_FACTOR * request_timeout``.
HARD_TIMEOUT_FACTOR = 3.0


def ready_wait_bound(max_wait_s: float | None = None) -> float:
    """The longest :meth:`ServerClient.wait_ready` waits for a server that is not up (its pauses' sum)."""
    return sum(start_up_delays(max_wait_s))


def url_problem(url: str) -> str | None:
    """What is wrong with a server URL as given (no host, a port that is not a number 1-65535), or None."""
    from urllib.parse import urlsplit

    text = url.strip()
    parts = urlsplit(text if "://" in text else "http://" + text)
    if not parts.hostname:
        return "no host name (e.g. http://127.0.0.1:30024)"
    try:
        port = parts.port
    except ValueError:
        return f"the port is not a number 1-65535 ({parts.netloc.rpartition(':')[2]!r})"
    if port == 0:
        return "the port is not a number 1-65535 (0)"
    return None


def normalize_base_url(url: str) -> str:
    """``http://h:p``, ``http://h:p/``, ``http://h:p/v1`` and ``http://h:p/v1/`` all give ``http://h:p``."""
    url = url.strip().rstrip("/")
    if url.endswith("/v1"):
        url = url[: -len("/v1")]
    if "://" not in url:
        url = "http://" + url
    return url


def display_url(url: str) -> str:
    """The URL as logged: without any ``user:password@`` part."""
    scheme, sep, rest = url.partition("://")
    host, slash, path = rest.partition("/")
    return scheme + sep + host.rpartition("@")[2] + slash + path


class ServerClient:
    """One vLLM server: a keep-alive connection pool, its API key, and the progress clock of its requests."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        request_timeout: float = defaults.REQUEST_TIMEOUT_S,
        max_concurrent_requests: int = defaults.MAX_CONCURRENT_REQUESTS,
        ca_bundle: str | None = None,
    ) -> None:
        self.base_url = normalize_base_url(base_url)
        self.name = display_url(self.base_url)
        self.request_timeout = request_timeout
        self._pool = HttpPool(self.base_url, max_idle=max(8, min(max_concurrent_requests, 2048)), ca_bundle=ca_bundle)
        self._auth = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._last_success = float("-inf")
        self.info: ServerInfo | None = None

    # ------------------------------------------------------------------ probes

    async def _get(self, path: str, auth: bool) -> tuple[int, bytes]:
        resp = await self._pool.request("GET", path, headers=self._auth if auth else None, timeout=PROBE_TIMEOUT_S)
        return resp.status, resp.body

    async def list_models(self) -> list[str]:
        """Model ids from ``/v1/models``; raises TransportError / ServerNotReady on a bad answer."""
        return list(await self.model_lengths())

    async def model_lengths(self) -> dict[str, int | None]:
        """``/v1/models`` as {model id: max_model_len or None}; TransportError / ServerNotReady on a bad answer."""
        status, body = await self._get("/v1/models", auth=True)
        if status in (401, 403):
            raise ServerNotReady(
                f"The vLLM server at {self.name} rejected the API key (HTTP {status}) on /v1/models. "
                "Give the server's key in OLMOCR_API_KEY / VLLM_API_KEY or a --api_key_file."
            )
        if status >= 500:  # a proxy in front of a server that is still starting, or an engine restarting
            raise TransportError(f"/v1/models answered HTTP {status}")
        if status != 200:
            raise ServerNotReady(
                f"{self.name} answered HTTP {status} on /v1/models: it is not an OpenAI-compatible vLLM server. "
                "Check the host and port in --vllm-url (vLLM's own default port is 8000, olmocr-serve's 30024)."
            )
        try:
            return parse_models(body)
        except ValueError:
            raise ServerNotReady(
                f"{self.name} answered /v1/models with something that is not a model list: it is not an "
                "OpenAI-compatible vLLM server. Check the host and port in --vllm-url."
            ) from None

    async def server_version(self) -> str | None:
        """``/version`` (vLLM's own version string), or None if the server has none."""
        try:
            status, body = await self._get("/version", auth=False)
        except TransportError:
            return None
        return parse_version_body(status, body)

    async def wait_ready(self, *, max_wait_s: float | None = None) -> ServerInfo:
        """Initial connection, then the model check (:func:`read_server_info`). Raises :class:`ServerNotReady`.

        Only an answer that may change is waited for: nothing listening yet (connection refused), a reset or
        a timeout (a server still loading), a 5xx (a proxy before a starting server). A definite answer --
        not HTTP, not vLLM's API (``/v1/models`` 404, not a model list), TLS that cannot work, a rejected
        key -- fails at once: no retry can change it. The wait's schedule is :func:`start_up_delays`
        (``max_wait_s`` None: 10 attempts over 243 s; larger, extended; smaller, cut).
        """
        delays = start_up_delays(max_wait_s)
        attempts = len(delays) + 1
        start = time.monotonic()
        deadline = start + sum(delays)  # attempts that take time themselves (timeouts) do not stretch the wait
        last = ""
        for attempt in range(1, attempts + 1):
            try:
                await self.list_models()
                break
            except TlsError as exc:
                untrusted = "not trusted" in str(exc)
                raise ServerNotReady(
                    f"TLS connection to the vLLM server at {self.name} failed: {exc}"
                    + (". If it uses a private CA, pass its certificate with --ca_bundle (or OLMOCR_CA_BUNDLE)."
                       if untrusted else ".")
                ) from None
            except NotHttp as exc:
                raise ServerNotReady(f"{self.name} is not a vLLM server: {exc}; check --vllm-url.") from None
            except TransportError as exc:
                last = str(exc)
                if attempt == 1 and not isinstance(exc, ConnectionRefused | RequestTimeout):
                    tls_hint = await self._tls_answer()
                    if tls_hint:
                        raise ServerNotReady(f"{self.name} is not a vLLM server over http: {tls_hint}; "
                                             "check --vllm-url.") from None
            if attempt == attempts or time.monotonic() >= deadline:
                raise ServerNotReady(
                    f"Cannot reach the vLLM server at {self.name} after {attempt} attempts over "
                    f"{time.monotonic() - start:.0f}s (last error: {last}). Check that it is running "
                    "(`supervisorctl status` / its log), that --vllm-url is right, and try again "
                    "(--max_server_ready_timeout to wait longer)."
                )
            delay = delays[attempt - 1]
            if attempt == 1:
                logger.warning(
                    "waiting for the vLLM server at %s (%s): it may still be loading its model (vLLM refuses "
                    "connections until it is loaded); up to %d attempts over %.0fs (--max_server_ready_timeout "
                    "to change it)", self.name, last, attempts, sum(delays))
            else:
                logger.info("vLLM server at %s not reachable yet (%s); attempt %d/%d, retrying in %.0fs",
                            self.name, last, attempt, attempts, delay)
            await asyncio.sleep(max(0.0, min(delay, deadline - time.monotonic())))
        try:
            self.info = await read_server_info(self)
        except TransportError as exc:
            raise ServerNotReady(f"The vLLM server at {self.name} stopped answering during the model "
                                 f"check ({exc}); check its log and try again.") from None
        logger.info("vLLM server at %s is ready and serves '%s' (vLLM %s, max_model_len %s)", self.name,
                    MODEL_NAME, self.info.version or "version unknown", self.info.max_model_len or "not reported")
        return self.info

    async def _tls_answer(self) -> str | None:
        """For an ``http://`` server that closed the connection without an answer: a hint if the port speaks
        TLS (a TLS server drops plain HTTP without a word), else None."""
        if self._pool.tls:
            return None
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        try:
            async with asyncio.timeout(3.0):
                _, writer = await asyncio.open_connection(self._pool.host, self._pool.port, ssl=context)
        except (OSError, TimeoutError):
            return None
        writer.close()
        return "the port speaks TLS: use https://"

    async def completion_probe(self, priority: int | None = None, timeout: float = PROBE_TIMEOUT_S) -> Response:
        """One tiny text completion (``max_tokens`` 1): the only proof that the engine makes progress."""
        body: dict = {"model": MODEL_NAME, "max_tokens": 1, "messages": [{"role": "user", "content": "ping"}]}
        if priority is not None:
            body["priority"] = priority
        return await self._pool.request("POST", "/v1/chat/completions", body=[json.dumps(body).encode()],
                                        headers=self._auth, timeout=timeout)

    async def probe(self, *, completion: bool, priority: int | None = None) -> str | None:
        """Re-admission check; None when healthy, else a one-line reason."""
        try:
            status, _ = await self._get("/health", auth=False)
            if status != 200:
                return f"/health answered HTTP {status}"
            if MODEL_NAME not in await self.list_models():
                return f"/v1/models does not list '{MODEL_NAME}'"
            if completion:
                resp = await self.completion_probe(priority, timeout=max(PROBE_TIMEOUT_S, self.request_timeout))
                if resp.status != 200:
                    return f"a test completion answered HTTP {resp.status}"
                self._last_success = time.monotonic()
        except (TransportError, ServerNotReady) as exc:
            return str(exc)
        return None

    # ------------------------------------------------------------------ completions

    async def post_chat(self, body: list[bytes], abort: asyncio.Event | None = None) -> Response:
        """POST a chat completion with a progress-aware timeout (see :data:`HARD_TIMEOUT_FACTOR`).

        Raises :class:`RequestTimeout` for a hung server, :class:`TransportError` for a failed connection
        and :class:`ServerAborted` when ``abort`` is set first (the server was ejected: resend elsewhere).
        """
        started = time.monotonic()
        hard = self.request_timeout * HARD_TIMEOUT_FACTOR
        task = asyncio.ensure_future(
            self._pool.request("POST", "/v1/chat/completions", body=body, headers=self._auth, timeout=hard)
        )
        aborted = asyncio.ensure_future(abort.wait()) if abort is not None else None
        try:
            while True:
                quiet_since = max(started, self._last_success)
                wait = quiet_since + self.request_timeout - time.monotonic()
                if wait > 0:
                    done, _ = await asyncio.wait({task} | ({aborted} if aborted else set()), timeout=wait,
                                                 return_when=asyncio.FIRST_COMPLETED)
                    if task in done:
                        resp = task.result()
                        if resp.status == 200:
                            self._last_success = time.monotonic()
                        return resp
                    if aborted is not None and aborted in done:
                        raise ServerAborted("the server was taken out of rotation")
                    continue
                task.cancel()
                raise RequestTimeout(
                    f"no answer within {time.monotonic() - started:.0f}s and no other request finished for "
                    f"{self.request_timeout:g}s"
                )
        finally:
            if aborted is not None:
                aborted.cancel()
            if not task.done():
                task.cancel()
            elif not task.cancelled():
                task.exception()  # retrieved: we were cancelled as it failed; no "never retrieved" noise

    def close(self) -> None:
        self._pool.close()
