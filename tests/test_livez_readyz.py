"""/livez and /readyz decisions (olmocr.server.livez_readyz), row by row, and the status service's clocks."""

from __future__ import annotations

import pytest

from olmocr.server.livez_readyz import liveness, readiness, stale_after
from olmocr.server.status_service import ServiceSettings, Snapshot, StatusService

HEALTHY = {"healthy": True, "state": "RUNNING", "health_phase": "healthy", "restart_count": 0}
UNREACHABLE = {"healthy": False, "error": "supervisord unreachable at unix:///x: refused"}

READINESS_ROWS = [
    # status, reachable, ok, words in the reason
    (HEALTHY, True, True, "ok"),
    ({"healthy": False, "state": "STARTING", "restart_count": 0}, True, False, "the server is starting"),
    ({"healthy": False, "state": "RUNNING", "health_phase": "starting"}, True, False, "the model is loading"),
    ({"healthy": False, "state": "RUNNING", "health_phase": "unhealthy"}, True, False, "health unhealthy"),
    ({"healthy": False, "state": "STARTING", "restart_count": 2}, True, False, "restarting"),
    ({"healthy": False, "state": "BACKOFF", "restart_count": 1}, True, False, "restarting"),
    ({"healthy": False, "state": "EXITED", "restart_count": 1}, True, False, "restarting"),
    ({"healthy": False, "state": "STOPPING"}, True, False, "stopping"),
    ({"healthy": False, "state": "STOPPED", "gave_up": True, "last_failure_reason": "crash loop: x"}, True, False,
     "gave up: crash loop: x"),
    ({"healthy": False, "state": "FATAL"}, True, False, "gave up"),
    (UNREACHABLE, False, False, "supervisord unreachable"),
    # a box of several servers (OLMOCR_GPUS): ready only when the box is healthy
    ({"healthy": False, "servers": [HEALTHY, {"healthy": False, "state": "BACKOFF", "restart_count": 1}]}, True,
     False, "not ready: the server is restarting (state BACKOFF)"),
]


@pytest.mark.parametrize(("status", "reachable", "ok", "words"), READINESS_ROWS)
def test_readiness(status, reachable, ok, words):
    answer = readiness(status, reachable)
    assert answer.ok is ok and answer.http_status == (200 if ok else 503)
    assert words in answer.reason


LIVENESS_ROWS = [
    # status, reachable, seconds since a good reading, since any reading, ok, words
    (HEALTHY, True, 0.5, 0.5, True, "ok"),
    # a crash, a hang, a restart or a model load is the manager's to fix: alive
    ({"healthy": False, "state": "STARTING", "restart_count": 3}, True, 1, 1, True, "ok"),
    ({"healthy": False, "state": "RUNNING", "health_phase": "unhealthy"}, True, 1, 1, True, "ok"),
    ({"healthy": False, "state": "BACKOFF"}, True, 1, 1, True, "ok"),
    # the manager gave up: the pod must be replaced
    ({"healthy": False, "state": "STOPPED", "gave_up": True, "last_failure_reason": "crash loop: 10 times"}, True,
     1, 1, False, "gave up: crash loop: 10 times"),
    ({"healthy": False, "state": "FATAL"}, True, 1, 1, False, "gave up"),
    ({"healthy": False, "state": "RUNNING", "servers": [HEALTHY, {"state": "STOPPED", "gave_up": True}]}, True,
     1, 1, False, "gave up"),
    # supervisord unreachable: briefly is fine, past the limit it is not
    (UNREACHABLE, False, 5, 1, True, "ok"),
    (UNREACHABLE, False, 31, 1, False, "supervisord unreachable for 31 s"),
    # the reading itself is stuck (a hung XML-RPC call): the status service is stuck
    (HEALTHY, True, 40, 40, False, "status service stuck"),
]


@pytest.mark.parametrize(("status", "reachable", "since_good", "since_any", "ok", "words"), LIVENESS_ROWS)
def test_liveness(status, reachable, since_good, since_any, ok, words):
    answer = liveness(status, reachable, since_good, since_any, stale_limit=30)
    assert answer.ok is ok, answer
    assert words in answer.reason


def test_stale_limit_follows_the_poll_interval():
    assert stale_after(1.0) == 30.0
    assert stale_after(10.0) == 100.0


def test_service_judges_staleness_by_its_own_readings():
    clock = {"t": 100.0}
    service = StatusService(ServiceSettings(poll_interval=1.0), read=lambda: None, clock=lambda: clock["t"])
    # Before the first reading: not ready, alive until the limit passes.
    assert not service.readiness().ok and service.liveness().ok
    service.update(Snapshot(HEALTHY, info={}, stats={}, settings={}))
    assert service.readiness().ok and service.liveness().ok
    clock["t"] += 29
    assert service.liveness().ok
    clock["t"] += 2  # no reading for 31 s: the poller is stuck
    assert not service.liveness().ok and "stuck" in service.liveness().reason
    service.update(Snapshot(HEALTHY, info={}, stats={}, settings={}))  # the poller is back
    assert service.liveness().ok
    clock["t"] += 5
    service.update(Snapshot(UNREACHABLE))  # readings, but supervisord does not answer them
    assert service.liveness().ok and not service.readiness().ok
    clock["t"] += 26
    service.update(Snapshot(UNREACHABLE))
    assert not service.liveness().ok and "unreachable" in service.liveness().reason
