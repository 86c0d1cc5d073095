"""Balancing across servers: each server's learned capacity, the choice of server for a request, and which
queued requests to move when one server falls behind (work stealing). Pure logic over :class:`Server`.

A request goes to the server that would finish it soonest, ``(outstanding + 1) / capacity``. Capacity is
learned (:class:`RateMeter`: answers per second of time the server had work, i.e. concurrency / latency by
Little's law); weights given with the URL (``URL#weight=2``) replace it.
"""

from __future__ import annotations

import asyncio
import enum
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from olmocr.pipeline.servers.client import ServerClient

#: Answers a capacity estimate needs before it is trusted, and the (shortest) time constant of its average.
RATE_MIN_SAMPLES = 5
RATE_WINDOW_S = 20.0
#: Requests a server may hold before it has answered ``RATE_MIN_SAMPLES``: a pipeline that can render its
#: whole batch in seconds would otherwise split it evenly before knowing which server is faster.
WARMUP_CAP = 16
#: Work stealing: a server's newest queued request moves to the least loaded one when it would finish there
#: sooner by this factor and margin (hysteresis, so that balanced servers never trade requests).
STEAL_FACTOR = 1.5
STEAL_MARGIN_S = 1.0
STEAL_BATCH = 16


class RateMeter:
    """Answers per second of *busy* time (time with at least one request out), exponentially weighted.

    While a server has work queued this is its capacity (Little's law: concurrency / latency); idle time
    does not dilute it. The time constant is at least ``RATE_WINDOW_S`` and five typical latencies, so that
    answers arriving in waves (a batch finishing together) average out. O(1) per event.
    """

    def __init__(self, window_s: float = RATE_WINDOW_S) -> None:
        self.window_s = window_s
        self.answers = 0  # since the last reset
        self._weighted_answers = 0.0
        self._weighted_busy = 0.0
        self._latency = 0.0  # moving average of request latency, seconds
        self._busy = False
        self._last = time.monotonic()

    def _advance(self, now: float) -> None:
        dt = max(0.0, now - self._last)
        self._last = now
        tau = max(self.window_s, 5 * self._latency)
        decay = math.exp(-dt / tau)
        self._weighted_answers *= decay
        self._weighted_busy = self._weighted_busy * decay + (tau * (1 - decay) if self._busy else 0.0)

    def set_busy(self, busy: bool, now: float) -> None:
        self._advance(now)
        self._busy = busy

    def answered(self, now: float, latency: float) -> None:
        self._advance(now)
        self.answers += 1
        self._weighted_answers += 1
        self._latency = latency if self.answers == 1 else 0.9 * self._latency + 0.1 * latency

    def rate(self) -> float | None:
        """Pages/s, or None before ``RATE_MIN_SAMPLES`` answers."""
        self._advance(time.monotonic())
        if self.answers < RATE_MIN_SAMPLES or self._weighted_busy <= 0:
            return None
        return self._weighted_answers / self._weighted_busy

    def reset(self) -> None:
        self.answers = 0
        self._weighted_answers = self._weighted_busy = 0.0


class ServerState(str, enum.Enum):
    """Where a server stands in the fleet's rotation (a ``str`` so that it reads as its value in JSON)."""

    STARTING = "starting"  # not verified yet
    UP = "up"  # in rotation
    DOWN = "down"  # out of rotation (ejected, or unreachable at start), probed until it is back
    EXCLUDED = "excluded"  # misconfigured (wrong model, context too small): never gets work
    DRAINING = "draining"  # its address left a dns+ name: no new requests, in-flight ones finish or are resent

    def __str__(self) -> str:
        return self.value


@dataclass(eq=False)
class Server:
    """A server in the fleet. The counters are plain attributes, read by the progress line and metrics."""

    client: ServerClient
    weight: float | None = None
    state: ServerState = ServerState.STARTING
    reason: str = ""  # why it is down or excluded
    pages: int = 0  # answers (HTTP 200) received
    in_flight: int = 0  # requests sent and not answered yet
    reserved: int = 0  # requests chosen for this server whose page is being rendered
    errors: int = 0  # refusals, timeouts, 429 and 5xx
    timeouts: int = 0
    rejected: int = 0  # non-retryable answers (a failed page attempt)
    ejections: int = 0
    failures_in_a_row: int = 0
    down_since: float | None = None
    meter: RateMeter = field(default_factory=RateMeter)
    observe_request: Callable[[float], None] | None = None  # request-latency hook (metrics)
    # Requests out to this server, oldest first; setting one's event abandons it (it is resent elsewhere).
    requests: dict[int, asyncio.Event] = field(default_factory=dict)
    # Rate limits (olmocr.pipeline.servers.pacing): no request before ``retry_until`` (a Retry-After), and
    # requests spaced by the configured requests/tokens per minute (``pacer``).
    retry_until: float = 0.0
    throttled: int = 0  # answers 429/503 with Retry-After
    pacer: Any = None
    # Usage and cost (answers' ``usage``; prices per million tokens from the server's options).
    input_tokens: int = 0
    output_tokens: int = 0
    price_in: float | None = None
    price_out: float | None = None

    @property
    def cost(self) -> float:
        """Dollars spent on this server's answers so far (0 without prices)."""
        return (self.input_tokens * (self.price_in or 0.0) + self.output_tokens * (self.price_out or 0.0)) / 1e6

    def ready_at(self) -> float:
        """When (monotonic) this server may be given another request: after any Retry-After, and when its
        pacer has no request already waiting for its turn."""
        paced = self.pacer.ready_at() if self.pacer is not None else 0.0
        return max(self.retry_until, paced)

    def abandon_all(self) -> None:
        for event in self.requests.values():
            event.set()
        self.requests.clear()

    def abandon_newest(self) -> None:
        self.requests.pop(next(reversed(self.requests))).set()

    @property
    def url(self) -> str:
        return self.client.name

    def describe(self) -> str:
        state = self.state
        if self.down_since is not None:
            state = f"down {time.monotonic() - self.down_since:.0f}s"
        rate = self.meter.rate()
        learned = f", ~{rate:.1f} pages/s" if rate is not None else ""
        tokens = f", {self.input_tokens + self.output_tokens} tokens" if self.input_tokens or self.output_tokens else ""
        cost = f", ${self.cost:.4f}" if self.price_in or self.price_out else ""
        throttled = f", {self.throttled} rate-limited" if self.throttled else ""
        return (f"{state}, {self.pages} pages, {self.in_flight} in flight, {self.errors} errors{throttled}{learned}"
                f"{tokens}{cost}")

    def as_dict(self) -> dict[str, Any]:
        return {"url": self.url, "state": self.state, "reason": self.reason, "pages": self.pages,
                "in_flight": self.in_flight, "errors": self.errors, "timeouts": self.timeouts,
                "rejected": self.rejected, "ejections": self.ejections, "weight": self.weight,
                "capacity": self.meter.rate(), "throttled": self.throttled,
                "model": self.client.model, "model_card": self.client.model_card,
                "input_tokens": self.input_tokens, "output_tokens": self.output_tokens,
                "cost": round(self.cost, 6) if self.price_in or self.price_out else None}


def capacities(servers: Sequence[Server]) -> list[float]:
    """Each server's capacity for balancing: fixed weights if any were given, else the learned rate.

    A server not yet measured gets the median of the measured ones (1.0 when none is): it is neither
    starved nor flooded before it has shown what it can do.
    """
    if any(s.weight is not None for s in servers):
        return [s.weight if s.weight is not None else 1.0 for s in servers]
    rates = [s.meter.rate() for s in servers]
    known = [r for r in rates if r is not None]
    prior = statistics.median(known) if known else 1.0
    return [r if r is not None else prior for r in rates]


def choose(servers: Sequence[Server]) -> Server | None:
    """The server in rotation that would finish one more request soonest: min (in_flight + 1) / capacity.

    None when no server is in rotation, or every one is still warming up with ``WARMUP_CAP`` requests (only
    when capacities are learned, not with fixed weights).
    """
    best: Server | None = None
    best_score = float("inf")
    now = time.monotonic()
    learned = all(s.weight is None for s in servers)
    for server, capacity in zip(servers, capacities(servers), strict=True):
        if server.state != ServerState.UP or server.ready_at() > now:
            continue
        load = server.in_flight + server.reserved
        if learned and server.meter.answers < RATE_MIN_SAMPLES and load >= WARMUP_CAP:
            continue
        score = (load + 1) / max(capacity, 1e-9)
        if score < best_score:
            best, best_score = server, score
    return best


def plan_steals(servers: Sequence[Server]) -> list[Server]:
    """Work stealing: the servers whose newest sent request should move, one entry per request.

    A request moves from the server furthest behind (sent requests / capacity) to the one that would finish
    it soonest when it would be done there sooner by ``STEAL_FACTOR`` and ``STEAL_MARGIN_S``; at most
    ``STEAL_BATCH`` at a time. Only requests already sent move (never one being rendered); a target's load
    counts both. The newest requests are the ones still waiting in the busy server's queue.
    """
    up = [s for s in servers if s.state == ServerState.UP]
    if len(up) < 2:
        return []
    caps = dict(zip(servers, capacities(servers), strict=True))
    learned = all(s.weight is None for s in servers)
    load = {s: s.in_flight + s.reserved for s in up}
    sent = {s: s.in_flight for s in up}
    stealable = {s: len(s.requests) for s in up}
    moves: list[Server] = []
    for _ in range(STEAL_BATCH):
        open_ = [s for s in up if not (learned and s.meter.answers < RATE_MIN_SAMPLES and load[s] >= WARMUP_CAP)]
        if not open_:
            break
        target = min(open_, key=lambda s: (load[s] + 1) / max(caps[s], 1e-9))
        busiest = max((s for s in up if stealable[s] > 0), key=lambda s: sent[s] / max(caps[s], 1e-9), default=None)
        if busiest is None or busiest is target:
            break
        behind = sent[busiest] / max(caps[busiest], 1e-9)
        there = (load[target] + 1) / max(caps[target], 1e-9)
        if behind <= STEAL_FACTOR * there + STEAL_MARGIN_S:
            break
        moves.append(busiest)
        load[busiest] -= 1
        sent[busiest] -= 1
        stealable[busiest] -= 1
        load[target] += 1
    return moves
