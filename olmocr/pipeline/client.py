"""The client for the external vLLM server: readiness, model check, chat completions that ride out outages.

Contract:

* ``/v1/models`` must list ``olmocr`` before any work is claimed (:meth:`ServerClient.wait_ready`).
* The initial connection makes 10 attempts with exponential backoff (never more than 60 s apart).
* Every request has a timeout. A connection error, a timeout, 429 or 5xx means "restarting or busy": the
  request waits for the server (``/health`` and ``/v1/models``, backoff capped at 60 s) and is sent again;
  it does not count as a failed page attempt and no outage, however long, ends the run.
* A 200 with ``finish_reason: abort`` (vLLM cut the request short while stopping) is resent the same way.
* Other statuses (4xx) are returned to the caller, which counts a failed attempt, or, when no resend can
  change the answer (400: the request does not fit the server, 401, 413 ...), gives the page up at once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from olmocr.pipeline.http import HttpPool, RequestTimeout, TransportError
from olmocr.pipeline.server_check import ServerInfo, parse_models, parse_version_body, verify_server

logger = logging.getLogger("olmocr.pipeline")

MODEL_NAME = "olmocr"
MAX_BACKOFF_S = 60.0
INITIAL_ATTEMPTS = 10
#: After this many transient (5xx) answers in a row for one attempt while the server reports healthy, the
#: attempt counts as failed, so one poisonous page cannot loop forever. Timeouts, refusals and 429 never do.
MAX_HEALTHY_5XX_IN_A_ROW = 20
PROBE_TIMEOUT_S = 10.0
TRANSIENT_LOG_EVERY_S = 10.0
#: A request is abandoned (and resent) when the server finished *no* request for ``request_timeout`` seconds
#: while it waited -- a hung engine -- so requests merely queued on a busy server are not thrown away. As a
#: guard against lost connections, no request waits longer than ``HARD_TIMEOUT_FACTOR * request_timeout``.
HARD_TIMEOUT_FACTOR = 3.0


class ServerNotReady(Exception):
    """Fatal: the server never answered, or does not serve the olmocr model. Message is user-facing."""


#: 4xx answers that may change when the same request is sent again; any other 4xx (400 context too
#: small, 401 key, 413, 422 ...) would be refused again: the page stops trying at once. (A 404 for the
#: model is handled above as a server in the wrong state.)
RETRYABLE_4XX = frozenset({408, 409, 425})


class RequestRejected(Exception):
    """The server refused the request (4xx) or answered nothing usable: a failed attempt.

    ``retryable`` is False when sending it again cannot help (:data:`RETRYABLE_4XX`).
    """

    def __init__(self, status: int, detail: str, *, retryable: bool = True) -> None:
        super().__init__(f"server returned {status}: {detail}")
        self.status = status
        self.retryable = retryable


def aborted(data: Any) -> bool:
    """A 200 whose generation the server aborted (vLLM stopping: ``finish_reason: abort``)."""
    try:
        return data["choices"][0].get("finish_reason") == "abort"
    except (KeyError, IndexError, TypeError, AttributeError):
        return False


def normalize_base_url(url: str) -> str:
    """``http://h:p``, ``http://h:p/``, ``http://h:p/v1`` and ``http://h:p/v1/`` all give ``http://h:p``."""
    url = url.strip().rstrip("/")
    if url.endswith("/v1"):
        url = url[: -len("/v1")]
    if "://" not in url:
        url = "http://" + url
    return url


@dataclass
class ServerStats:
    requests_ok: int = 0
    transient_errors: int = 0
    timeouts: int = 0
    rejected: int = 0
    outages: int = 0
    aborted: int = 0


class ServerClient:
    """One connection pool and one global cap on concurrent requests for the whole run."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        request_timeout: float = 600.0,
        max_concurrent_requests: int = 1600,
    ) -> None:
        self.base_url = normalize_base_url(base_url)
        self.request_timeout = request_timeout
        self._pool = HttpPool(self.base_url, max_idle=max(8, min(max_concurrent_requests, 2048)))
        self._auth = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._slots = asyncio.Semaphore(max_concurrent_requests)
        self._recovery: asyncio.Task[None] | None = None
        self.in_flight = 0
        self.stats = ServerStats()
        self.state = "starting"
        self._down_since: float | None = None
        self._last_transient_log = float("-inf")
        self._probe: asyncio.Task[bool] | None = None
        self._probe_started = float("-inf")
        self._last_success = float("-inf")
        self.info: ServerInfo | None = None
        self.observe_request: Callable[[float], None] | None = None  # request-latency hook (metrics)

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
                f"The vLLM server at {self.base_url} rejected the API key (HTTP {status}) on /v1/models. "
                "Pass the server's key with --api_key or set OLMOCR_API_KEY / VLLM_API_KEY."
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
        """Initial connection, then the model check (:func:`verify_server`). Raises :class:`ServerNotReady`."""
        delay = first_delay_s
        start = time.monotonic()
        last = ""
        for attempt in range(1, attempts + 1):
            try:
                await self.list_models()
                break
            except TransportError as exc:
                last = str(exc)
            if attempt == attempts or time.monotonic() - start + delay > max_wait_s:
                raise ServerNotReady(
                    f"Cannot reach the vLLM server at {self.base_url} after {attempt} attempts over "
                    f"{time.monotonic() - start:.0f}s (last error: {last}). Check that it is running "
                    "(`supervisorctl status` / its log), that --vllm-url is right, and try again."
                )
            logger.warning("vLLM server at %s not reachable (%s); attempt %d/%d, retrying in %.0fs",
                           self.base_url, last, attempt, attempts, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, MAX_BACKOFF_S)
        try:
            self.info = await verify_server(self)
        except TransportError as exc:
            raise ServerNotReady(f"The vLLM server at {self.base_url} stopped answering during the model "
                                 f"check ({exc}); check its log and try again.") from None
        self.state = "up"
        logger.info("vLLM server at %s is ready and serves '%s' (vLLM %s, max_model_len %s)", self.base_url,
                    MODEL_NAME, self.info.version or "version unknown", self.info.max_model_len or "not reported")
        return self.info

    async def _healthy(self) -> bool:
        try:
            status, _ = await self._get("/health", auth=False)
            if status != 200:
                return False
            return MODEL_NAME in await self.list_models()
        except (TransportError, ServerNotReady):
            return False

    async def _recover(self, reason: str) -> None:
        self.stats.outages += 1
        self._down_since = time.monotonic()
        self.state = "down"
        logger.warning("vLLM server unavailable (%s); pausing requests until it is healthy again", reason)
        delay = 1.0
        while not await self._healthy():
            await asyncio.sleep(delay)
            delay = min(delay * 2, MAX_BACKOFF_S)
            logger.info("still waiting for the vLLM server (down %.0fs)", time.monotonic() - self._down_since)
        logger.warning("vLLM server is back after %.0fs; resuming", time.monotonic() - self._down_since)
        self._down_since = None
        self.state = "up"

    async def _healthy_shared(self) -> bool:
        """One health probe at a time, its answer shared by everyone asking within a second."""
        now = time.monotonic()
        probe = self._probe
        if probe is None or (probe.done() and now - self._probe_started > 1.0):
            self._probe_started = now
            probe = self._probe = asyncio.create_task(self._healthy())
        return await asyncio.shield(probe)

    async def wait_for_server(self, reason: str) -> bool:
        """Block until the server looks healthy. Returns True if there was an outage (we had to wait)."""
        if self._recovery is None or self._recovery.done():
            if await self._healthy_shared():
                return False
            if self._recovery is None or self._recovery.done():
                self._recovery = asyncio.create_task(self._recover(reason))
        await asyncio.shield(self._recovery)
        return True

    def _note_transient(self, label: str, problem: str) -> None:
        """Log transient failures without flooding: the first one, then a summary at most every 10 s."""
        now = time.monotonic()
        if now - self._last_transient_log >= TRANSIENT_LOG_EVERY_S:
            self._last_transient_log = now
            logger.warning("request for %s failed (%s); it will be resent (transient errors so far: %d, "
                           "timeouts: %d)", label, problem, self.stats.transient_errors, self.stats.timeouts)
        else:
            logger.debug("request for %s failed (%s); it will be resent", label, problem)

    def describe_state(self) -> str:
        if self._down_since is not None:
            return f"down {time.monotonic() - self._down_since:.0f}s"
        return self.state

    # ------------------------------------------------------------------ completions

    async def _post_watched(self, body: list[bytes]) -> Any:
        """POST with a progress-aware timeout (see :data:`HARD_TIMEOUT_FACTOR`)."""
        started = time.monotonic()
        hard = self.request_timeout * HARD_TIMEOUT_FACTOR
        task = asyncio.ensure_future(
            self._pool.request("POST", "/v1/chat/completions", body=body, headers=self._auth, timeout=hard)
        )
        try:
            while True:
                quiet_since = max(started, self._last_success)
                wait = quiet_since + self.request_timeout - time.monotonic()
                if wait > 0:
                    done, _ = await asyncio.wait({task}, timeout=wait)
                    if done:
                        return task.result()
                    continue
                task.cancel()
                raise RequestTimeout(
                    f"no answer within {time.monotonic() - started:.0f}s and no other request finished for "
                    f"{self.request_timeout:g}s"
                )
        finally:
            if not task.done():
                task.cancel()
            elif not task.cancelled():
                task.exception()  # retrieved: we were cancelled as it failed; no "never retrieved" noise

    async def chat(self, make_body: Callable[[], Awaitable[list[bytes]]], label: str) -> dict[str, Any]:
        """POST a chat completion built by ``make_body``; returns the parsed JSON answer.

        ``make_body`` runs while a request slot is held, and again for every resend: the body (a rendered
        page image) is dropped as soon as it has been sent, so memory does not grow with the number of
        requests the server is working on. Retries through outages without limit (module docstring).
        Raises :class:`RequestRejected` for an answer that should count as a failed attempt; exceptions
        from ``make_body`` propagate.
        """
        transient_in_a_row = 0
        while True:
            if self._down_since is not None and self._recovery is not None:
                await asyncio.shield(self._recovery)
            async with self._slots:
                body = await make_body()
                self.in_flight += 1
                sent = time.monotonic()
                try:
                    resp = await self._post_watched(body)
                    problem = None
                except RequestTimeout as exc:
                    self.stats.timeouts += 1
                    self.state = "timeouts"
                    problem = f"timeout: {exc}"
                    resp = None
                except TransportError as exc:
                    problem = f"connection error: {exc}"
                    resp = None
                finally:
                    self.in_flight -= 1
                    if self.observe_request is not None:
                        self.observe_request(time.monotonic() - sent)
            if resp is not None:
                if resp.status == 200:
                    try:
                        data = json.loads(resp.body)
                    except ValueError:
                        self.stats.rejected += 1
                        raise RequestRejected(200, "answer is not JSON") from None
                    if aborted(data):
                        self.stats.aborted += 1
                        problem = "the server aborted the request (finish_reason abort: it is stopping)"
                    else:
                        self.stats.requests_ok += 1
                        self._last_success = time.monotonic()
                        if self.state != "up" and self._down_since is None:
                            self.state = "up"
                        return data
                elif resp.status == 429 or resp.status >= 500:
                    problem = f"HTTP {resp.status}"
                elif resp.status == 404 and b"does not exist" in resp.body:
                    # A server started with the wrong --served-model-name: not the page's fault; wait
                    # for a server that serves it (the health check looks at /v1/models).
                    problem = f"HTTP 404, model {MODEL_NAME!r} not served"
                else:
                    self.stats.rejected += 1
                    raise RequestRejected(resp.status, resp.body[:300].decode("utf-8", "replace"),
                                          retryable=resp.status in RETRYABLE_4XX)
            self.stats.transient_errors += 1
            transient_in_a_row += 1
            self._note_transient(label, problem or "error")
            had_outage = await self.wait_for_server(problem or "error")
            if had_outage:
                transient_in_a_row = 0
                continue
            if (resp is not None and (resp.status >= 500 or resp.status == 200)
                    and transient_in_a_row >= MAX_HEALTHY_5XX_IN_A_ROW):
                self.stats.rejected += 1
                raise RequestRejected(resp.status, f"{transient_in_a_row} server errors or aborts in a row while healthy")
            # Healthy but the request failed (busy, 429, hung engine): back off a little, with jitter.
            await asyncio.sleep(min(MAX_BACKOFF_S, 0.25 * 2 ** min(transient_in_a_row, 8)) * random.uniform(0.5, 1.0))

    def close(self) -> None:
        self._pool.close()
