"""What the status service's ``/livez`` and ``/readyz`` answer: probes with Kubernetes semantics (pure).

The kubelet acts on them differently, so they ask different questions:

- **liveness** (``/livez``): *should this pod be replaced?* Only when the deployment cannot recover by
  itself: the manager gave up (the crash-loop limit, or supervisord's FATAL), or the status service has
  had no reading of supervisord for ``stale_after`` seconds (supervisord wedged, or the reading thread
  stuck). A crash, a hang or a model load is *not* a liveness failure: the health listener restarts the
  server inside the pod in seconds, and a kubelet restart on top would throw away the loaded weights.
- **readiness** (``/readyz``): *may this pod get requests?* Only while the server is running and its
  last health probes (real completions, not vLLM's ``/health``) passed; not while the model loads, while
  the server restarts or drains, nor while supervisord cannot be read. A not-ready pod leaves the
  headless Service's DNS answer, so the pipeline's ``dns+http://`` discovery stops sending to it.

Both are answered from the service's latest reading (one XML-RPC multicall every poll interval in a
background thread), never with a round trip per probe: a probe's cost does not depend on supervisord.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

#: A reading of supervisord older than this many poll intervals (and at least MIN_STALE_S) means the
#: status service is stuck.
STALE_POLLS = 10
MIN_STALE_S = 30.0


@dataclass(frozen=True)
class ProbeAnswer:
    ok: bool
    reason: str

    @property
    def http_status(self) -> int:
        return 200 if self.ok else 503


def stale_after(poll_interval: float) -> float:
    """Seconds without a reading of supervisord after which ``/livez`` fails."""
    return max(MIN_STALE_S, STALE_POLLS * poll_interval)


def _gave_up(status: Mapping[str, Any]) -> str | None:
    """The reason the manager gave up, if it did (the box as a whole, or any one of its servers)."""
    entries = [status, *(s for s in status.get("servers") or () if isinstance(s, Mapping))]
    for entry in entries:
        if entry.get("gave_up") or entry.get("state") == "FATAL":
            return str(entry.get("last_failure_reason") or f"the server is {entry.get('state') or 'stopped'}")
    return None


def liveness(status: Mapping[str, Any], reachable: bool, seconds_since_good_reading: float,
             seconds_since_reading: float, stale_limit: float) -> ProbeAnswer:
    """``/livez``: fails only when the pod should be replaced (see the module docstring).

    ``status`` is the latest reading's status JSON; ``seconds_since_good_reading`` is the age of the last
    reading that reached supervisord (or of the service, before the first); ``seconds_since_reading`` the
    age of the latest reading of any kind.
    """
    if seconds_since_reading > stale_limit:
        return ProbeAnswer(False, f"status service stuck: no reading of supervisord for {seconds_since_reading:.0f} s")
    if not reachable and seconds_since_good_reading > stale_limit:
        # Not the error itself: it names the socket, and these answers are open without the token.
        return ProbeAnswer(False, f"supervisord unreachable for {seconds_since_good_reading:.0f} s")
    if reachable:
        reason = _gave_up(status)
        if reason is not None:
            return ProbeAnswer(False, f"gave up: {reason}")
    return ProbeAnswer(True, "ok")


def readiness(status: Mapping[str, Any], reachable: bool) -> ProbeAnswer:
    """``/readyz``: ok only while the server is running and healthy (see the module docstring)."""
    if not reachable:
        return ProbeAnswer(False, "not ready: supervisord unreachable (or not read yet)")
    if status.get("healthy"):
        return ProbeAnswer(True, "ok")
    reason = _gave_up(status)
    if reason is not None:
        return ProbeAnswer(False, f"not ready: gave up: {reason}")
    # A box of several servers (one per GPU): describe the first one that is not healthy.
    servers = [s for s in status.get("servers") or () if isinstance(s, Mapping) and not s.get("healthy")]
    entry = servers[0] if servers else status
    state = entry.get("state") or "unknown"
    phase = entry.get("health_phase")
    if state == "RUNNING" and phase in (None, "starting"):
        what = "the model is loading"
    elif state == "RUNNING":
        what = f"health {phase}"
    elif state in ("STARTING", "BACKOFF", "EXITED"):
        what = "the server is restarting" if entry.get("restart_count") else "the server is starting"
    elif state in ("STOPPING", "STOPPED"):
        what = "the server is stopping"
    else:
        what = "the server is not running"
    return ProbeAnswer(False, f"not ready: {what} (state {state}"
                              f"{', health ' + str(phase) if phase else ''})")
