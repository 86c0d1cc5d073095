"""Kubernetes-style health decisions for one server process (pure: no I/O, time is passed in).

- While the process is starting, *connection refused* means "still loading the model" until
  ``startup_timeout`` has passed since the process started; after that it is a failure.
- A server is declared unhealthy, and killed, only after ``failure_threshold`` consecutive failed
  probes; it is healthy again after ``success_threshold`` consecutive good probes.
- A configuration error (wrong served model, API key mismatch) makes it unhealthy but is not killed:
  a restart cannot fix it, and killing would only turn it into a crash loop.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace

from olmocr import envs

STARTING = "starting"
HEALTHY = "healthy"
UNHEALTHY = "unhealthy"


class KillKind(str, enum.Enum):
    """Why the health check killed a server: the ``reason`` label of ``olmocr_server_health_kills_total``
    (a short fixed set; free text would make one time series per message). Set where the failure is
    found (the probe, or :func:`apply_probe` for the startup timeout) and carried as a value."""

    STARTUP_TIMEOUT = "startup_timeout"
    COMPLETION_TIMEOUT = "completion_timeout"
    COMPLETION_ERROR = "completion_error"
    NOT_LISTENING = "not_listening"
    HEALTH_ENDPOINT = "health_endpoint"
    MODELS_ENDPOINT = "models_endpoint"
    OTHER = "other"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class ProbeResult:
    """What one probe of a server found (written by :mod:`olmocr.server.health_probe`, judged here)."""

    ok: bool
    reason: str
    latency: float  # seconds for the whole probe
    refused: bool = False  # nothing listening on the port (vLLM still loading, or dead)
    busy: bool = False  # completion timed out but tokens are being generated
    config_error: bool = False  # restarting cannot fix it (wrong model, API key mismatch)
    generation_tokens: float | None = None
    kind: KillKind = KillKind.OTHER  # what failed, if it failed


@dataclass(frozen=True)
class HealthPolicy:
    failure_threshold: int = envs.default("OLMOCR_HEALTH_FAILURE_THRESHOLD")
    success_threshold: int = envs.default("OLMOCR_HEALTH_SUCCESS_THRESHOLD")
    startup_timeout: float = envs.DEFAULT_STARTUP_TIMEOUT_S


@dataclass(frozen=True)
class HealthState:
    phase: str = STARTING
    started_at: float = 0.0  # when the current process instance entered STARTING
    ever_healthy: bool = False  # this process instance answered correctly at least once
    consecutive_failures: int = 0
    consecutive_successes: int = 0
    reason: str = "starting"


@dataclass(frozen=True)
class Decision:
    state: HealthState
    kill: bool = False
    kill_reason: str = ""
    kill_kind: KillKind = KillKind.OTHER
    loading: bool = False  # the port is still closed inside the startup grace: waiting, not failing


def process_started(now: float) -> HealthState:
    return HealthState(phase=STARTING, started_at=now)


def apply_probe(state: HealthState, result: ProbeResult, policy: HealthPolicy, now: float) -> Decision:
    if result.ok:
        successes = state.consecutive_successes + 1
        phase = state.phase
        if successes >= policy.success_threshold:
            phase = HEALTHY
        return Decision(replace(state, phase=phase, consecutive_successes=successes,
                                consecutive_failures=0, ever_healthy=state.ever_healthy or phase == HEALTHY,
                                reason=result.reason))

    loading = result.refused and not state.ever_healthy
    if loading and now - state.started_at < policy.startup_timeout:
        return Decision(replace(state, phase=STARTING, consecutive_successes=0,
                                reason=f"starting: {result.reason}"), loading=True)
    reason = result.reason
    if loading:
        reason = (f"server did not start listening within the startup timeout "
                  f"({policy.startup_timeout:g} s): {result.reason}")

    failures = state.consecutive_failures + 1
    failing = replace(state, consecutive_failures=failures, consecutive_successes=0, reason=reason)
    if failures < policy.failure_threshold:
        # Not yet unhealthy: a busy server may miss a probe or two.
        return Decision(failing)
    failing = replace(failing, phase=UNHEALTHY)
    if result.config_error:
        return Decision(failing)
    return Decision(failing, kill=True, kill_reason=f"{reason} ({failures} consecutive failed probes)",
                    kill_kind=KillKind.STARTUP_TIMEOUT if loading else result.kind)


#: Categories of kill reasons recorded by a listener from before :class:`KillKind` (it sent the text
#: only): read by the RPC extension when no kind comes with the reason; the first matching prefix wins.
KILL_CATEGORIES: tuple[tuple[str, str], ...] = (
    ("server did not start listening within the startup timeout", "startup_timeout"),
    ("completion probe timed out", "completion_timeout"),
    ("completion probe", "completion_error"),
    ("connection refused", "not_listening"),
    ("GET /health", "health_endpoint"),
    ("GET /v1/models", "models_endpoint"),
)


def kill_category(reason: str) -> str:
    """A short, fixed label for a kill reason (free text would make one time series per message)."""
    for prefix, category in KILL_CATEGORIES:
        if reason.startswith(prefix):
            return category
    return "other"
