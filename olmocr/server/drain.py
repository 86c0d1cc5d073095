"""How a planned stop treats requests in flight: vLLM's ``--shutdown-timeout`` inside supervisord's
``stopwaitsecs`` (pure functions; the numbers are in docs/real-vllm.md).

On SIGTERM, vLLM >= 0.32 with ``--shutdown-timeout N`` (N > 0) stops accepting requests (new ones get
HTTP 500 at once), lets the running ones finish for up to N seconds, aborts what is left (a 200 with
``finish_reason: abort`` or a 500), then exits 0. With N = 0 (vLLM's default) it aborts at once, and we
measured clients that got no answer at all until their own timeout. The pipeline resends every aborted
request, so a planned restart loses no page either way; the drain only saves the work already done.

supervisord SIGKILLs the process group ``stopwaitsecs`` after its SIGTERM: that must leave room for the
drain plus the engine's teardown (freeing GPU memory), or the drain is cut short by a kill.
"""

from __future__ import annotations

import math

from olmocr import envs

#: Seconds vLLM lets running requests finish on a planned stop (OLMOCR_SHUTDOWN_TIMEOUT).
DEFAULT_SHUTDOWN_TIMEOUT = int(envs.default("OLMOCR_SHUTDOWN_TIMEOUT"))  # type: ignore[call-overload]
#: Seconds after the drain for vLLM to tear its engine down (a 7B model frees GPU memory in a few
#: seconds; the tiny CPU model in ~2 s). stopwaitsecs = shutdown timeout + this = the config's 60.
TEARDOWN_S = 30
#: Less than this between the drain's end and supervisord's SIGKILL and the drain is shortened.
MIN_TEARDOWN_S = 10
#: After stopwaitsecs, how long the manager still gives supervisord to stop its other programs and exit
#: before it kills the process group itself.
SUPERVISORD_EXIT_S = 30


def stopwaitsecs_for(shutdown_timeout: float) -> int:
    """The supervisord ``stopwaitsecs`` that lets a drain of ``shutdown_timeout`` seconds end cleanly."""
    return int(math.ceil(max(0.0, shutdown_timeout) + TEARDOWN_S))


def fit_shutdown_timeout(shutdown_timeout: int, stopwaitsecs: int | None) -> int:
    """``shutdown_timeout``, shortened so that supervisord's SIGKILL never lands inside the drain."""
    if stopwaitsecs is None:
        return shutdown_timeout
    return max(0, min(shutdown_timeout, int(stopwaitsecs) - MIN_TEARDOWN_S))


def manager_stop_budget(shutdown_timeout: float) -> int:
    """Seconds ``python -m olmocr.vllm_server_manager`` may take to stop after SIGTERM: supervisord's
    ``stopwaitsecs`` plus its own exit. A container runtime's grace period (Kubernetes'
    ``terminationGracePeriodSeconds``, systemd's ``TimeoutStopSec``) must be at least this."""
    # The manager never renders a stopwaitsecs below the default one (60 s).
    return max(stopwaitsecs_for(DEFAULT_SHUTDOWN_TIMEOUT), stopwaitsecs_for(shutdown_timeout)) + SUPERVISORD_EXIT_S
