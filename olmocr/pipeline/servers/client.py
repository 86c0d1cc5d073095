"""The client for one vLLM server: start-up verification, probes, and one watched chat-completion request.

Contract (the retry policy across servers lives in :mod:`olmocr.pipeline.servers.fleet`):

* ``/v1/models`` must list ``olmocr`` before any work is claimed (:meth:`ServerClient.wait_ready`).
* The initial connection makes 10 attempts with exponential backoff (never more than 60 s apart).
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
import time

from olmocr.envs import SERVED_MODEL_NAME
from olmocr.pipeline.errors import (
    RequestTimeout,
    ServerAborted,
    ServerNotReady,
    TlsError,
    TransportError,
)
from olmocr.pipeline.servers.checks import ServerInfo, parse_models, parse_version_body, read_server_info
from olmocr.pipeline.servers.http import HttpPool, Response

logger = logging.getLogger("olmocr.pipeline")

MODEL_NAME = SERVED_MODEL_NAME
MAX_BACKOFF_S = 60.0
INITIAL_ATTEMPTS = 10
PROBE_TIMEOUT_S = 10.0
#: A request is abandoned (and resent) when the server finished *no* request for ``request_timeout`` seconds
#: while it waited -- a hung engine -- so requests merely queued on a busy server are not thrown away. As a
#: guard against lost connections, no request waits longer than ``HARD_TIMEOUT_FACTOR * request_timeout``.
HARD_TIMEOUT_FACTOR = 3.0


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
        request_timeout: float = 600.0,
        max_concurrent_requests: int = 1600,
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
        if status != 200:
            raise TransportError(f"/v1/models answered HTTP {status}")
        try:
            return parse_models(body)
        except ValueError as exc:
            raise TransportError(str(exc)) from None

    async def server_version(self) -> str | None:
        """``/version`` (vLLM's own version string), or None if the server has none."""
        try:
            status, body = await self._get("/version", auth=False)
        except TransportError:
            return None
        return parse_version_body(status, body)

    async def wait_ready(self, *, attempts: int = INITIAL_ATTEMPTS, max_wait_s: float = 600.0,
                         first_delay_s: float = 1.0) -> ServerInfo:
        """Initial connection, then the model check (:func:`read_server_info`). Raises :class:`ServerNotReady`."""
        delay = first_delay_s
        start = time.monotonic()
        last = ""
        for attempt in range(1, attempts + 1):
            try:
                await self.list_models()
                break
            except TlsError as exc:
                raise ServerNotReady(
                    f"TLS connection to the vLLM server at {self.name} failed: {exc}. If it uses a private CA, "
                    "pass its certificate with --ca_bundle (or OLMOCR_CA_BUNDLE)."
                ) from None
            except TransportError as exc:
                last = str(exc)
            if attempt == attempts or time.monotonic() - start + delay > max_wait_s:
                raise ServerNotReady(
                    f"Cannot reach the vLLM server at {self.name} after {attempt} attempts over "
                    f"{time.monotonic() - start:.0f}s (last error: {last}). Check that it is running "
                    "(`supervisorctl status` / its log), that --vllm-url is right, and try again."
                )
            logger.warning("vLLM server at %s not reachable (%s); attempt %d/%d, retrying in %.0fs",
                           self.name, last, attempt, attempts, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, MAX_BACKOFF_S)
        try:
            self.info = await read_server_info(self)
        except TransportError as exc:
            raise ServerNotReady(f"The vLLM server at {self.name} stopped answering during the model "
                                 f"check ({exc}); check its log and try again.") from None
        logger.info("vLLM server at %s is ready and serves '%s' (vLLM %s, max_model_len %s)", self.name,
                    MODEL_NAME, self.info.version or "version unknown", self.info.max_model_len or "not reported")
        return self.info

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
