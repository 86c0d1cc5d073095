"""One pipeline across many vLLM servers: start-up verification, rotation and health per server, and the
retry policy of a request across them. A single ``--vllm-url`` is the one-server case of the same code.
The server list is parsed by :mod:`olmocr.pipeline.servers.serverlist`; the choice of server by
:mod:`olmocr.pipeline.servers.balance`.

* **Verification.** Every server is checked at start-up by :func:`admit_for_run` (one function, so the
  checks are the same for each). A misconfigured server (wrong model, rejected key, untrusted certificate,
  no priority scheduling when ``--priority`` is used) is left out with a one-line reason. The run starts as
  soon as one server is usable; servers still unreachable a few seconds later join when they come up. If
  none is usable the run fails before claiming work.
  The model list and ``/version`` also give each server's ``max_model_len`` (``max_tokens`` is capped so
  every request fits every server in rotation; a server whose context cannot hold a useful page is left
  out) and the request field that constrains output (:mod:`olmocr.pipeline.servers.checks`).
* **Balancing.** A request goes to the server that would finish it soonest relative to its learned capacity
  (:func:`~olmocr.pipeline.servers.balance.choose`); a server that falls behind has its newest queued requests moved
  (:func:`~olmocr.pipeline.servers.balance.plan_steals`).
* **Health.** ``EJECT_AFTER`` refusals / 5xx in a row, or one no-progress timeout (no request finished for
  ``--request_timeout`` s: a hung engine), take a server out of rotation. Its in-flight requests are abandoned
  and resent to the others without using page attempts. It is probed in the background (``/health``, the model
  list and one tiny completion) and re-admitted after ``READMIT_AFTER`` good probes in a row. With every server
  out, requests wait (and the log says so) -- no outage ends the run.
* **Membership.** ``dns+http://NAME:PORT`` servers come and go with the name's addresses
  (:mod:`olmocr.pipeline.servers.membership`): a new one is verified before it gets work, a vanished one is
  drained (state ``draining``: no new requests, in-flight ones finish or are resent) and then retired.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from contextvars import ContextVar
from typing import Any

from olmocr.pipeline import defaults
from olmocr.pipeline.errors import (
    FleetConfigError,
    RequestRejected,
    ServerMismatch,
    ServerNotReady,
    TransportError,
)
from olmocr.pipeline.gates import PriorityGate, interactive_reserve
from olmocr.pipeline.servers.balance import Server, ServerState, choose, plan_steals
from olmocr.pipeline.servers.checks import DEFAULT_MAX_TOKENS, STRUCTURED_OUTPUTS, plan_max_tokens
from olmocr.pipeline.servers.client import MAX_BACKOFF_S, MODEL_NAME, ServerClient, answering_model
from olmocr.pipeline.servers.discovery import DEFAULT_REFRESH_S, Resolver
from olmocr.pipeline.servers.membership import Membership
from olmocr.pipeline.servers.outcome import Classified, Outcome, Problem, classify
from olmocr.pipeline.servers.pacing import make_pacer
from olmocr.pipeline.servers.serverlist import DnsName, Options, ServerSpec

logger = logging.getLogger(__name__)
# --- service2 (#32): interactive before batch ---
#: True inside the task working a priority-lane item (an olmocr-service job; set by the runner per item):
#: its pages carry the interactive priority (pages/page.py) and render through a gate of their own, never
#: behind the batch's queued renders.
INTERACTIVE: ContextVar[bool] = ContextVar("olmocr_interactive_item", default=False)
# --- end service2 ---

#: Refusals / 5xx answers in a row (no success in between) that take a server out of rotation.
EJECT_AFTER = 3
#: Good background probes in a row that bring it back.
READMIT_AFTER = 2
#: Longest pause between background probes of a server out of rotation.
PROBE_INTERVAL_MAX_S = 10.0
#: After the first server is verified, how long the others may take before the run starts without them.
STARTUP_GRACE_S = 5.0
#: After this many 5xx answers in a row for one attempt, the attempt counts as failed, so one poisonous page
#: cannot loop forever. Timeouts, refusals and 429 never do.
MAX_5XX_IN_A_ROW = 20
TRANSIENT_LOG_EVERY_S = 10.0
ALL_DOWN_LOG_EVERY_S = 30.0
#: Work stealing runs at most this often (by then the requests it moved have been sent again).
REBALANCE_EVERY_S = 0.25
ABANDONED = "abandoned: its server was taken out of rotation or was too far behind"

# Log lines operators read, grep and alert on: their wording is a contract. One home here, used by the code
# and by the tests that assert them (logging %-style arguments).
LOG_LEFT_OUT = "vLLM server %s left out: %s"
LOG_NOT_REACHABLE = "vLLM server %s is not reachable yet; starting without it (it joins when it answers)"
LOG_IN_ROTATION = "%d of %d vLLM servers in rotation: %s"
LOG_EJECTED = ("vLLM server unavailable: %s taken out of rotation (%s); %d other server(s) in rotation; probing it "
               "in the background")
LOG_READMITTED = "vLLM server is back: %s re-admitted after %.0fs (%s)"
LOG_PAUSED = "vLLM server unavailable (%s); pausing requests until it is healthy again"  # the only server
LOG_RESUMED = "vLLM server is back after %.0fs; resuming (%s)"  # the only server
LOG_ALL_DOWN = "all vLLM servers are out of rotation (down %.0fs: %s); requests wait for one to come back"
LOG_MOVED = "%d requests moved to a less loaded server"  # the run's summary (work stealing)
LOG_OTHER_MODEL = "vLLM server %s taken out of rotation for good: %s (its answers are not written)"
LOG_NO_RIGHT_MODEL = "no server answers with the right model: %s; stopping (the pages left stay queued)"
LOG_RATE_LIMITED = "%s rate-limited the pipeline (%s): no request to it for %.1fs"
#: While every server in rotation is rate-limited or paced, how often the wait for one looks again at least.
PACED_RECHECK_S = 0.05
LOG_BUDGET = ("the cost budget --max_cost $%.2f is reached ($%.4f spent, $%.4f more in flight); stopping: work in "
              "progress finishes, the rest stays queued")


# ---------------------------------------------------------------------------------------------- verification


async def admit_for_run(client: ServerClient, *, max_wait_s: float, priority: int | None,
                        longest_dim: int = defaults.LONGEST_IMAGE_DIM) -> int:
    """Start-up checks for one server; returns the ``max_tokens`` its context allows for a page rendered
    at ``longest_dim``. Raises :class:`ServerNotReady` with a one-line reason.

    Reachable, serves ``olmocr`` (:meth:`ServerClient.wait_ready`), has room in its context for a useful
    answer (:func:`~olmocr.pipeline.servers.checks.plan_max_tokens`); with ``--priority``, accepts a request
    carrying a priority (vLLM answers 400 unless started with ``--scheduling-policy priority``).
    """
    info = await client.wait_ready(max_wait_s=max_wait_s)
    try:
        max_tokens = plan_max_tokens(info.max_model_len, longest_dim)
    except ServerMismatch as exc:
        raise ServerNotReady(f"{exc} ({client.name})") from None
    if client.model_unlisted:
        await check_unlisted_model(client)
    if priority is not None:
        try:
            resp = await client.completion_probe(priority, timeout=max(10.0, client.request_timeout))
        except TransportError as exc:
            raise ServerNotReady(f"the vLLM server at {client.name} did not answer a test request: {exc}") from None
        if 400 <= resp.status < 500 and resp.status != 429:
            detail = resp.body[:200].decode("utf-8", "replace").replace("\n", " ")
            raise ServerNotReady(
                f"the vLLM server at {client.name} refused a request with priority {priority} (HTTP "
                f"{resp.status}: {detail}). Start it with --scheduling-policy priority (olmocr-serve: "
                "--scheduling-policy priority or OLMOCR_SCHEDULING_POLICY=priority), or drop --priority."
            )
    return max_tokens


async def check_unlisted_model(client: ServerClient) -> None:
    """A model accepted without a model list must answer one tiny completion under its name: the only proof
    that the URL (and its path) reaches a server of that model. Raises :class:`ServerNotReady`."""
    try:
        resp = await client.completion_probe(timeout=max(10.0, client.request_timeout))
    except TransportError as exc:
        raise ServerNotReady(f"{client.name} did not answer a test request: {exc}") from None
    if resp.status != 200:
        raise ServerNotReady(
            f"{client.name} answered HTTP {resp.status} on {client.api}/chat/completions (and has no model list): "
            "check the URL's path (a provider's API root, e.g. https://host/v1/openai) and --model")
    answered = answering_model(resp.body)
    if answered is not None and answered != client.model:
        raise ServerNotReady(f"{client.name} answered a test request with model {answered!r}, not {client.model!r}")


# ---------------------------------------------------------------------------------------------- the fleet


class Fleet:
    """The servers of one run, one cap on concurrent requests, and the retry policy across them."""

    def __init__(self, specs: Sequence[ServerSpec], *, request_timeout: float = defaults.REQUEST_TIMEOUT_S,
                 max_concurrent_requests: int = defaults.MAX_CONCURRENT_REQUESTS, ca_bundle: str | None = None,
                 priority: int | None = None, render_lookahead: int = 8, longest_dim: int = defaults.LONGEST_IMAGE_DIM,
                 dns: Sequence[DnsName] = (), resolver: Resolver | None = None,
                 dns_refresh_s: float = DEFAULT_REFRESH_S, max_cost: float | None = None) -> None:
        if not specs and not dns:
            raise FleetConfigError("no vLLM server given: pass --vllm-url (or set OLMOCR_VLLM_URL)")
        per_pool = max(8, min(max_concurrent_requests, 2048))

        def new_server(url: str, key: str | None, weight: float | None, options: Options) -> Server:
            client = ServerClient(url, api_key=key, request_timeout=request_timeout, max_concurrent_requests=per_pool,
                                  ca_bundle=ca_bundle, model=options.model or MODEL_NAME,
                                  model_explicit=options.model is not None)
            return Server(client, weight=weight, pacer=make_pacer(options.rpm, options.tpm),
                          price_in=options.price_in, price_out=options.price_out)

        self._new_server = new_server
        self.servers = [new_server(s.url, s.api_key, s.weight, s.options) for s in specs]
        #: Dollars after which no new page request is sent (``--max_cost``): the run stops gracefully.
        self.max_cost = max_cost
        self.budget_reached = False
        #: Set when no server can answer with the right model (every one answered with another): the run
        #: stops with this one line and exit status 1. ``on_fatal`` / ``on_budget`` are the runner's hooks.
        self.fatal: str | None = None
        self.on_fatal: Callable[[str], None] | None = None
        self.on_budget: Callable[[str], None] | None = None
        #: The servers behind ``dns+`` names (None without one): they join and leave through it.
        self.membership = Membership(self, dns, resolver=resolver, refresh_s=dns_refresh_s) if dns else None
        self.planned_max_tokens: int | None = None  # fixed by request_plan(); later servers must fit it
        self.retired: list[Server] = []  # servers drained away (kept for the run's per-server stats)
        self.on_new_server: Callable[[Server], None] | None = None  # metrics hooks for servers that join mid-run
        self.priority = priority
        self.longest_dim = longest_dim
        self.max_tokens: dict[Server, int] = {}  # what each verified server's context allows
        self._slots = PriorityGate(max_concurrent_requests, INTERACTIVE.get,
                                   reserve=interactive_reserve(max_concurrent_requests))  # svc-perf (#32): interactive first
        self._render_gate = asyncio.Semaphore(max(1, render_lookahead))
        self._interactive_gate = asyncio.Semaphore(max(1, render_lookahead))  # service2 (#32)
        self._changed = asyncio.Event()  # set whenever a server joins the rotation
        self._probers: dict[Server, asyncio.Task[None]] = {}
        self._all_down_since: float | None = None
        self._all_down_logged = float("-inf")
        self._last_transient_log = float("-inf")
        self._tokens = itertools.count()
        self._last_rebalance = float("-inf")
        self.moved = 0  # requests moved to a less loaded server (work stealing)

    @property
    def single(self) -> bool:
        return len(self.servers) == 1

    @property
    def in_flight(self) -> int:
        return sum(s.in_flight for s in self.servers)

    # ------------------------------------------------------------------ start-up

    async def start(self, max_wait_s: float = defaults.SERVER_READY_TIMEOUT_S) -> None:
        """Verify every server; raises :class:`ServerNotReady` if none is usable (before any work is claimed)."""
        if self.membership is not None:
            await self.membership.start(max_wait_s)
        tasks = {asyncio.create_task(self.verify(s, max_wait_s)): s for s in self.servers}
        pending = set(tasks)
        grace_until: float | None = None
        try:
            while pending:
                timeout = None if grace_until is None else max(0.0, grace_until - time.monotonic())
                done, pending = await asyncio.wait(pending, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    server = tasks[task]
                    exc = task.exception()
                    if exc is None:
                        self.admit_verified(server, task.result(), "verified at start-up")
                    elif isinstance(exc, ServerNotReady):
                        self.leave_out(server, str(exc), log=not self.single)
                    else:
                        raise exc
                if grace_until is None and any(s.state == ServerState.UP for s in self.servers):
                    grace_until = time.monotonic() + STARTUP_GRACE_S
                if not done and grace_until is not None:
                    break
        finally:
            for task in pending:
                task.cancel()
        usable = [s for s in self.servers if s.state == ServerState.UP]
        if not usable:
            if self.single:
                raise ServerNotReady(self.servers[0].reason)
            raise ServerNotReady(f"none of the {len(self.servers)} vLLM servers is usable: " + "; ".join(
                f"{s.url}: {s.reason}" for s in self.servers))
        for task in pending:
            server = tasks[task]
            logger.warning(LOG_NOT_REACHABLE, server.url)
            self._eject(server, "not reachable at start-up", count=False)
        if not self.single:
            logger.info(LOG_IN_ROTATION, len(usable), len(self.servers), ", ".join(s.url for s in usable))

    def request_plan(self) -> tuple[int, str]:
        """``max_tokens`` and the guided-decoding field for every page request, from the verified servers.

        Requests may go to any server, so ``max_tokens`` fits the smallest context. Servers of different
        vLLM versions that disagree on the field get ``structured_outputs`` (every vLLM since 0.11.0).
        """
        max_tokens = min(self.max_tokens.values(), default=DEFAULT_MAX_TOKENS)
        self.planned_max_tokens = max_tokens
        fields = {i.guided_field for i in self._infos()}
        if len(fields) > 1:
            logger.warning("the vLLM servers differ in version: guided decoding uses %r, which servers older "
                           "than vLLM 0.11.0 ignore", STRUCTURED_OUTPUTS)
        return max_tokens, fields.pop() if len(fields) == 1 else STRUCTURED_OUTPUTS

    def _infos(self) -> list[Any]:
        return [s.client.info for s in self.max_tokens if s.client.info is not None]

    def smallest_context(self) -> int | None:
        """The smallest ``max_model_len`` among the verified servers (None if none reported one)."""
        return min((i.max_model_len for i in self._infos() if i.max_model_len), default=None)

    def versions(self) -> list[str]:
        """The distinct vLLM versions of the verified servers, sorted."""
        return sorted({i.version for i in self._infos() if i.version})

    # ------------------------------------------------------------------ rotation

    def _admit(self, server: Server, why: str, *, quiet: bool = False) -> None:
        if not quiet:
            down = time.monotonic() - server.down_since if server.down_since is not None else 0.0
            if self.single:
                logger.info(LOG_RESUMED, down, why)
            else:
                logger.info(LOG_READMITTED, server.url, down, why)
        server.state, server.reason, server.down_since = ServerState.UP, "", None
        server.failures_in_a_row = 0
        server.meter.reset()
        self._all_down_since = None
        self._changed.set()
        self._rebalance(now=True)  # take queued requests off the busiest servers now, not only new ones

    def _eject(self, server: Server, reason: str, *, count: bool = True) -> None:
        if server.state != ServerState.UP and server.state != ServerState.STARTING:
            return
        server.state, server.reason, server.down_since = ServerState.DOWN, reason, time.monotonic()
        server.ejections += int(count)
        server.abandon_all()  # its in-flight requests are resent elsewhere now
        if count:
            if self.single:
                logger.warning(LOG_PAUSED, reason)
            else:
                others = sum(1 for s in self.servers if s.state == ServerState.UP)
                logger.warning(LOG_EJECTED, server.url, reason, others)
        self._probers[server] = asyncio.create_task(self._probe_until_back(server))

    async def _probe_until_back(self, server: Server) -> None:
        delay = 1.0
        good = 0
        last_logged = time.monotonic()
        while True:
            await asyncio.sleep(delay)
            problem = await server.client.probe(completion=True, priority=self.priority)
            if problem is None:
                good += 1
                if good >= READMIT_AFTER:
                    self._admit(server, f"{good} good probes in a row")
                    return
                delay = 1.0
                continue
            good = 0
            server.reason = problem
            delay = min(delay * 2, PROBE_INTERVAL_MAX_S)
            if time.monotonic() - last_logged >= ALL_DOWN_LOG_EVERY_S:
                last_logged = time.monotonic()
                if self.single:
                    logger.info("still waiting for the vLLM server (down %.0fs: %s)",
                                time.monotonic() - (server.down_since or time.monotonic()), problem)
                else:
                    logger.info("vLLM server %s still out of rotation (%s)", server.url, problem)

    # ------------------------------------------------------------------ membership (servers that join and leave)

    def add_server(self, url: str, api_key: str | None, weight: float | None, options: Options) -> Server:
        """A server that joins mid-run (a new address of a ``dns+`` name): in the fleet, not yet in rotation."""
        server = self._new_server(url, api_key, weight, options)
        self.servers.append(server)
        if self.on_new_server is not None:
            self.on_new_server(server)
        return server

    async def verify(self, server: Server, max_wait_s: float) -> int:
        """:func:`admit_for_run` with this run's settings."""
        return await admit_for_run(server.client, max_wait_s=max_wait_s, priority=self.priority,
                                   longest_dim=self.longest_dim)

    def admit_verified(self, server: Server, max_tokens: int, why: str) -> None:
        self.max_tokens[server] = max_tokens
        self._admit(server, why, quiet=True)

    def leave_out(self, server: Server, reason: str, *, log: bool = True) -> None:
        """Misconfigured: out of rotation for the run."""
        server.state, server.reason = ServerState.EXCLUDED, reason
        if log:
            logger.error(LOG_LEFT_OUT, server.url, reason)

    def stop_probing(self, server: Server) -> None:
        prober = self._probers.pop(server, None)
        if prober is not None:
            prober.cancel()

    def retire(self, server: Server) -> None:
        """Out of the fleet (drained); its counters stay in :attr:`retired` for the run's stats."""
        if server in self.servers:
            self.servers.remove(server)
        self.max_tokens.pop(server, None)
        self.retired.append(server)
        server.client.close()

    # ------------------------------------------------------------------ balancing

    def _rebalance(self, *, now: bool = False) -> None:
        """Work stealing: move the newest requests of the server furthest behind to the one that would finish
        them soonest (a server back in rotation, or one that turned out faster than assumed while warming up).

        The newest requests are the ones still waiting in the busy server's queue, so little work is lost;
        they are resent without using a page attempt. Runs at most every ``REBALANCE_EVERY_S`` (by then the
        requests it moved have been sent again, so it never counts one twice).
        """
        clock = time.monotonic()
        if self.single or (not now and clock - self._last_rebalance < REBALANCE_EVERY_S):
            return
        self._last_rebalance = clock
        for server in plan_steals(self.servers):
            server.abandon_newest()
            self.moved += 1

    async def _wait_for_rotation(self) -> None:
        """Return once some server can take a request (cheap when one can): waits while all are out."""
        if choose(self.servers) is None:
            await self._pick()

    async def _pick(self) -> Server:
        """A server in rotation; waits (and says so) while there is none."""
        while True:
            server = choose(self.servers)
            if server is not None:
                return server
            self._changed.clear()
            if self.fatal is not None:
                await asyncio.Event().wait()  # no server may be used: the run is stopping (cancelled then)
            up = [s for s in self.servers if s.state == ServerState.UP]
            if up:  # all warming up, rate-limited or paced: wait for an answer or for the first to be ready
                soonest = min(s.ready_at() for s in up)
                # A limited server (ready_at > 0) may have become ready since choose() ran: look again soon.
                timeout = max(soonest - time.monotonic(), PACED_RECHECK_S) if soonest > 0 else None
                try:
                    await asyncio.wait_for(self._changed.wait(), timeout)
                except TimeoutError:
                    pass
                continue
            now = time.monotonic()
            if self._all_down_since is None:
                self._all_down_since = now
            if not self.single and now - self._all_down_logged >= ALL_DOWN_LOG_EVERY_S:
                self._all_down_logged = now
                logger.warning(LOG_ALL_DOWN, now - self._all_down_since,
                               "; ".join(f"{s.url}: {s.reason}" for s in self.servers))
            if self.membership is None and not any(s.state in (ServerState.DOWN, ServerState.STARTING) for s in self.servers):
                raise ServerNotReady("no vLLM server left: every one was excluded as misconfigured")
            try:
                await asyncio.wait_for(self._changed.wait(), ALL_DOWN_LOG_EVERY_S)
            except TimeoutError:
                pass

    def _note_transient(self, server: Server, label: str, problem: str) -> None:
        """Log transient failures without flooding: the first one, then a summary at most every 10 s."""
        now = time.monotonic()
        where = "" if self.single else f" on {server.url}"
        if now - self._last_transient_log >= TRANSIENT_LOG_EVERY_S:
            self._last_transient_log = now
            logger.warning("request for %s failed%s (%s); it will be resent (errors so far: %d, timeouts: %d)",
                           label, where, problem, sum(s.errors for s in self.servers),
                           sum(s.timeouts for s in self.servers))
        else:
            logger.debug("request for %s failed%s (%s); it will be resent", label, where, problem)

    # ------------------------------------------------------------------ requests

    async def chat(self, make_body: Callable[[], Awaitable[list[bytes]]], label: str) -> dict[str, Any]:
        """POST a chat completion built by ``make_body`` to the best server; returns the parsed JSON answer.

        ``make_body`` runs while a request slot is held, and again for every resend: the body (a rendered
        page image) is dropped as soon as it has been sent. Refusals, timeouts, 429 and 5xx are resent (to
        another server when there is one) and never count as a failed attempt. Raises
        :class:`RequestRejected` for an answer that should count as a failed attempt.
        """
        errors_5xx_in_a_row = 0
        transient_in_a_row = 0
        while True:
            async with self._slots:
                # The server is chosen (and reserved) when the page's render starts, and renders are limited to
                # ``render_lookahead`` at a time: the choice is made with fresh counts (not before a long render
                # queue), and requests waiting for a server hold no page image.
                await self._wait_for_rotation()
                async with self._interactive_gate if INTERACTIVE.get() else self._render_gate:
                    server = await self._pick()
                    server.reserved += 1
                    try:
                        body = await make_body()
                    finally:
                        server.reserved -= 1
                if server.state != ServerState.UP:  # it left the rotation during the render
                    server = await self._pick()
                await self._wait_turn(server)  # its Retry-After and pace (rate-limited providers)
                while server.state != ServerState.UP:  # it left the rotation while the request waited
                    server = await self._pick()
                    await self._wait_turn(server)
                server.in_flight += 1
                sent_at = time.monotonic()
                server.meter.set_busy(True, sent_at)
                token = next(self._tokens)
                abandon = server.requests[token] = asyncio.Event()
                resp, failure = None, None
                try:
                    resp = await server.client.post_chat(body, abandon)
                except TransportError as exc:  # timeouts and ServerAborted included
                    failure = exc
                finally:
                    server.requests.pop(token, None)
                    if server.observe_request is not None:
                        server.observe_request(time.monotonic() - sent_at)
                    server.in_flight -= 1
                    if server.in_flight == 0:
                        server.meter.set_busy(False, time.monotonic())
                    self._changed.set()
                    self._rebalance()
            result = classify(resp, failure, model=server.client.model)
            if result.outcome is Outcome.SUCCESS:
                server.pages += 1
                server.failures_in_a_row = 0
                now = time.monotonic()
                server.meter.answered(now, now - sent_at)
                assert result.data is not None
                self._count_usage(server, result.data)
                return result.data
            if result.outcome is Outcome.REJECTED:
                server.rejected += 1
                raise RequestRejected(result.status or 0, result.detail, retryable=result.retryable)
            if result.outcome is Outcome.RESEND:
                continue  # moved to another server (ejected, or rebalanced): no error, no pause
            errors_5xx_in_a_row, transient_in_a_row = await self._after_transient(
                server, label, result, errors_5xx_in_a_row, transient_in_a_row)

    async def _after_transient(self, server: Server, label: str, result: Classified, errors_5xx_in_a_row: int,
                               transient_in_a_row: int) -> tuple[int, int]:
        """Book-keeping after a TRANSIENT outcome: count it, eject the server when it keeps failing, give
        the page one failed attempt after ``MAX_5XX_IN_A_ROW`` server errors, pause before the resend."""
        problem = result.problem
        assert problem is not None
        if problem is Problem.RATE_LIMITED:
            assert result.retry_after is not None
            self._hold(server, result.retry_after, result.detail)
            return errors_5xx_in_a_row, transient_in_a_row  # the server's pace decides; no attempt, no error
        if problem is Problem.OTHER_MODEL:
            server.errors += 1
            self._exclude_for_model(server, result.detail)
            return errors_5xx_in_a_row, transient_in_a_row
        if problem is Problem.TIMEOUT:
            server.timeouts += 1
        server.errors += 1
        transient_in_a_row += 1
        self._note_transient(server, label, result.detail)
        errors_5xx_in_a_row = errors_5xx_in_a_row + 1 if problem.is_server_error else 0
        if server.state == ServerState.UP and problem.counts_against_server:
            server.failures_in_a_row += 1
            if problem.ejects_at_once:
                self._eject(server, f"no request finished for {server.client.request_timeout:g}s (hung?)")
            elif server.failures_in_a_row >= EJECT_AFTER:
                self._eject(server, f"{server.failures_in_a_row} failures in a row, last: {result.detail}")
        if errors_5xx_in_a_row >= MAX_5XX_IN_A_ROW:
            server.rejected += 1
            raise RequestRejected(result.status or 500, f"{errors_5xx_in_a_row} server errors in a row")
        if server.state == ServerState.UP:
            # Still in rotation but the request failed (busy, 429, one error): back off a little, with jitter.
            await asyncio.sleep(min(MAX_BACKOFF_S, 0.25 * 2 ** min(transient_in_a_row, 8)) * random.uniform(0.5, 1.0))
        return errors_5xx_in_a_row, transient_in_a_row

    # ------------------------------------------------------------------ rate limits, identity, cost

    async def _wait_turn(self, server: Server) -> None:
        """Wait out the server's Retry-After and its pace (requests/tokens per minute) before sending."""
        now = time.monotonic()
        turn = server.pacer.take(now) if server.pacer is not None else now
        turn = max(turn, server.retry_until)
        while turn > time.monotonic():
            await asyncio.sleep(turn - time.monotonic())
            turn = max(turn, server.retry_until)  # a Retry-After that came while we waited

    def _hold(self, server: Server, seconds: float, detail: str) -> None:
        """A 429/503 with Retry-After: no request to ``server`` before it has passed."""
        server.throttled += 1
        until = time.monotonic() + seconds
        if until > server.retry_until:
            server.retry_until = until
            if server.pacer is not None:
                server.pacer.hold(until)
            now = time.monotonic()
            if now - self._last_transient_log >= TRANSIENT_LOG_EVERY_S:
                self._last_transient_log = now
                logger.warning(LOG_RATE_LIMITED, server.url, detail, seconds)

    def _exclude_for_model(self, server: Server, detail: str) -> None:
        """An answer from another model: the server leaves the rotation for good (never probed back: a
        provider that silently serves another model does not say when it stops); with none left, the
        run stops (:attr:`fatal`)."""
        if server.state == ServerState.EXCLUDED:
            return
        server.state, server.reason, server.down_since = ServerState.EXCLUDED, detail, None
        server.ejections += 1
        server.abandon_all()
        self.stop_probing(server)
        logger.error(LOG_OTHER_MODEL, server.url, detail)
        usable = [s for s in self.servers if s.state != ServerState.EXCLUDED]
        if not usable and self.fatal is None:
            self.fatal = LOG_NO_RIGHT_MODEL % "; ".join(f"{s.url}: {s.reason}" for s in self.servers)
            if self.on_fatal is not None:
                self.on_fatal("no server answers with the right model")  # the full line ends the run
        self._changed.set()

    def _count_usage(self, server: Server, data: dict[str, Any]) -> None:
        usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
        try:
            prompt, completion = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
        except (TypeError, ValueError):
            prompt = completion = 0
        server.input_tokens += prompt
        server.output_tokens += completion
        if server.pacer is not None:
            server.pacer.answered(prompt + completion)
        if self.max_cost is not None and not self.budget_reached:
            spent = self.cost()
            in_flight = sum(s.in_flight * self._cost_per_request(s) for s in self.servers)
            if spent + in_flight + self._cost_per_request(server) > self.max_cost:
                self.budget_reached = True
                logger.warning(LOG_BUDGET, self.max_cost, spent, in_flight)
                if self.on_budget is not None:
                    self.on_budget("cost budget reached")

    @staticmethod
    def _cost_per_request(server: Server) -> float:
        return server.cost / server.pages if server.pages else 0.0

    def all_servers(self) -> list[Server]:
        return [*self.servers, *self.retired]

    def cost(self) -> float:
        """Dollars spent so far over every server (0 when no server has a price)."""
        return sum(s.cost for s in self.all_servers())

    def tokens(self) -> tuple[int, int]:
        """(input, output) tokens of the answers so far."""
        servers = self.all_servers()
        return sum(s.input_tokens for s in servers), sum(s.output_tokens for s in servers)

    def priced(self) -> bool:
        return any(s.price_in or s.price_out for s in self.all_servers())

    def usage_line(self) -> str:
        """Tokens and cost so far, and cost per million pages, for the progress line and the final line."""
        tokens_in, tokens_out = self.tokens()
        pages = sum(s.pages for s in self.all_servers())
        line = f"tokens {tokens_in} in / {tokens_out} out"
        if self.priced():
            per_million = self.cost() / pages * 1e6 if pages else 0.0
            line += f", cost ${self.cost():.4f} (${per_million:,.0f} per million pages)"
        return line

    # ------------------------------------------------------------------ visibility

    def describe_state(self) -> str:
        """For the progress line: the server's state (one server) or how many are up, and the cost when priced."""
        usage = f"; {self.usage_line()}" if self.priced() else ""  # providers: tokens and cost so far
        if self.single:
            s = self.servers[0]
            return (f"down {time.monotonic() - s.down_since:.0f}s" if s.down_since is not None else str(s.state)) + usage
        # Short whatever the number of servers: each server's counters go on a line of their own (runner).
        up = sum(1 for s in self.servers if s.state == ServerState.UP)
        return f"{up}/{len(self.servers)} up{usage}"

    async def close(self) -> None:
        if self.membership is not None:
            await self.membership.close()
        tasks = list(self._probers.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for s in self.servers:
            s.client.close()
