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
from typing import Any

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
from olmocr.pipeline.servers.urls import api_root, display_url, normalize_base_url

logger = logging.getLogger(__name__)

MODEL_NAME = SERVED_MODEL_NAME
MAX_BACKOFF_S = 60.0
PROBE_TIMEOUT_S = 10.0
#: A request is abandoned (and resent) when the server finished *no* request for ``request_timeout`` seconds
#: while it waited -- a hung engine -- so requests merely queued on a busy server are not thrown away. As a
#: guard against lost connections, no request waits longer than ``HARD_TIMEOUT_FACTOR * request_timeout``.
HARD_TIMEOUT_FACTOR = 3.0
#: How a page request (built by olmocr.pipeline.pages.page.request_template) begins.
_DEFAULT_MODEL_PREFIX = json.dumps({"model": MODEL_NAME})[:-1].encode()


class ModelListMissing(ServerNotReady):
    """``/v1/models`` is missing or unreadable on a server whose model was named explicitly (a gateway)."""


def model_cards(body: bytes | str) -> dict[str, dict[str, Any]]:
    """Each ``/v1/models`` entry reduced to what tells a reader which weights answer under that name
    (``root``, ``max_model_len``, ``owned_by``). ValueError if ``body`` is not a model list."""
    try:
        data = json.loads(body)
    except ValueError:
        raise ValueError("not a model list") from None
    if not isinstance(data, dict) or not isinstance(data.get("data", []), list):
        raise ValueError("not a model list")
    return {str(e.get("id")): {k: e[k] for k in ("root", "max_model_len", "owned_by") if e.get(k) is not None}
            for e in data.get("data", []) if isinstance(e, dict)}


def answering_model(body: bytes) -> str | None:
    """The ``model`` field of a chat-completion answer, None when there is none to read."""
    try:
        data = json.loads(body)
    except ValueError:
        return None
    model = data.get("model") if isinstance(data, dict) else None
    return str(model) if model is not None else None


def ready_wait_bound(max_wait_s: float | None = None) -> float:
    """The longest :meth:`ServerClient.wait_ready` waits for a server that is not up (its pauses' sum)."""
    return sum(start_up_delays(max_wait_s))


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
        model: str = MODEL_NAME,
        model_explicit: bool = False,
    ) -> None:
        self.base_url = normalize_base_url(base_url)
        self.name = display_url(self.base_url)
        self.api = api_root(self.base_url)
        #: The name requests use and every answer's ``model`` field must carry (default ``olmocr``).
        self.model = model
        #: The user named the model (``--model`` / ``#model=``): a server without a usable ``/v1/models``
        #: is accepted (some gateways have none); every answer is still checked.
        self.model_explicit = model_explicit
        self.model_cards: dict[str, dict[str, Any]] = {}
        #: Accepted without the model in a model list: admission then asks for one tiny completion.
        self.model_unlisted = False
        self.use_model(model)
        self.request_timeout = request_timeout
        self._pool = HttpPool(self.base_url, max_idle=max(8, min(max_concurrent_requests, 2048)), ca_bundle=ca_bundle)
        self._auth = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._last_success = float("-inf")
        self.info: ServerInfo | None = None

    def use_model(self, model: str) -> None:
        self.model = model
        self._model_prefix = json.dumps({"model": model})[:-1].encode()

    @property
    def model_card(self) -> dict[str, Any]:
        """``/v1/models``' entry for :attr:`model` (``root``, ``max_model_len`` ...): the run's provenance."""
        return self.model_cards.get(self.model, {})

    # ------------------------------------------------------------------ probes

    async def _get(self, path: str, auth: bool) -> tuple[int, bytes]:
        resp = await self._pool.request("GET", path, headers=self._auth if auth else None, timeout=PROBE_TIMEOUT_S)
        return resp.status, resp.body

    async def list_models(self) -> list[str]:
        """Model ids from ``/v1/models``; raises TransportError / ServerNotReady on a bad answer."""
        return list(await self.model_lengths())

    async def model_lengths(self) -> dict[str, int | None]:
        """``/v1/models`` as {model id: max_model_len or None}; TransportError / ServerNotReady on a bad answer.

        With a model named explicitly, a missing or unreadable list is :class:`ModelListMissing` (the caller
        may go on without it); otherwise it means the URL is not an OpenAI-compatible server."""
        status, body = await self._get(f"{self.api}/models", auth=True)
        if status in (401, 403):
            raise ServerNotReady(
                f"The vLLM server at {self.name} rejected the API key (HTTP {status}) on {self.api}/models. "
                "Give the server's key in OLMOCR_API_KEY / VLLM_API_KEY or a --api_key_file."
            )
        if status >= 500:  # a proxy in front of a server that is still starting, or an engine restarting
            raise TransportError(f"{self.api}/models answered HTTP {status}")
        if status != 200:
            if self.model_explicit:
                raise ModelListMissing(f"{self.api}/models answered HTTP {status}")
            raise ServerNotReady(
                f"{self.name} answered HTTP {status} on {self.api}/models: it is not an OpenAI-compatible vLLM "
                "server. Check the host, port and path in --vllm-url (vLLM's own default port is 8000, "
                "olmocr-serve's 30024; a provider's URL ends in its API root, e.g. https://host/v1/openai)."
            )
        try:
            self.model_cards = model_cards(body)
            return parse_models(body)
        except ValueError:
            if self.model_explicit:
                raise ModelListMissing(f"{self.api}/models answered something that is not a model list") from None
            raise ServerNotReady(
                f"{self.name} answered {self.api}/models with something that is not a model list: it is not an "
                "OpenAI-compatible vLLM server. Check the host, port and path in --vllm-url."
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
            except ModelListMissing:
                break  # reachable; read_server_info says what is missing
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
        root = self.model_card.get("root")
        logger.info("vLLM server at %s is ready and serves '%s' (vLLM %s, max_model_len %s)%s", self.name,
                    self.model, self.info.version or "version unknown", self.info.max_model_len or "not reported",
                    f"; weights: {root}" if root and root != self.model else "")
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
        body: dict = {"model": self.model, "max_tokens": 1, "messages": [{"role": "user", "content": "ping"}]}
        if priority is not None:
            body["priority"] = priority
        return await self._pool.request("POST", f"{self.api}/chat/completions", body=[json.dumps(body).encode()],
                                        headers=self._auth, timeout=timeout)

    async def probe(self, *, completion: bool, priority: int | None = None) -> str | None:
        """Re-admission check; None when healthy, else a one-line reason."""
        try:
            status, _ = await self._get("/health", auth=False)
            # A provider has no /health (404 at its root): the model list and the completion decide.
            if status != 200 and not (status == 404 and self.api != "/v1"):
                return f"/health answered HTTP {status}"
            try:
                if self.model not in await self.list_models():
                    return f"{self.api}/models does not list '{self.model}'"
            except ModelListMissing:
                pass  # named explicitly: accepted without a list at admission, likewise here
            if completion:
                resp = await self.completion_probe(priority, timeout=max(PROBE_TIMEOUT_S, self.request_timeout))
                if resp.status != 200:
                    return f"a test completion answered HTTP {resp.status}"
                answered = answering_model(resp.body)
                if answered is not None and answered != self.model:
                    return f"a test completion was answered by model {answered!r}, not {self.model!r}"
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
        if self.model != MODEL_NAME and body and body[0].startswith(_DEFAULT_MODEL_PREFIX):
            # Page requests are built once for the fleet naming ``olmocr``; this server serves another name.
            body[0] = self._model_prefix + body[0][len(_DEFAULT_MODEL_PREFIX):]
        task = asyncio.ensure_future(
            self._pool.request("POST", f"{self.api}/chat/completions", body=body, headers=self._auth, timeout=hard)
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
