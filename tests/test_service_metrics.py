"""olmocr-service's /metrics counts the jobs that exist: a job the sweep removed (OLMOCR_SERVICE_JOB_TTL) leaves
``olmocr_service_jobs{state}`` at the next watch round, on the replica that swept and on one that did not."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.pipeline_helpers import SAMPLES, StandIn
from tests.test_service import Service, running_service
from tests.waiting import wait_for


def jobs_gauge(svc: Service) -> dict[str, float]:
    text = svc.get("/metrics").text
    return {m[1]: float(m[2]) for m in re.finditer(r'^olmocr_service_jobs\{state="(\w+)"\} (\S+)$', text, re.M)}


@pytest.mark.slow
def test_removed_jobs_leave_the_per_state_gauge(standin: StandIn, tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    # A TTL of 8 s: both replicas (watching every 2 s) see the job done before it is removed.
    sweeping = {"OLMOCR_SERVICE_JOB_TTL": "8", "OLMOCR_SERVICE_SWEEP_INTERVAL": "0.5"}
    with (running_service(ws, standin, tmp_path / "a.log", env=sweeping) as a,
          running_service(ws, None, tmp_path / "b.log") as b):  # b keeps jobs forever: only a removes them
        job = a.submit(SAMPLES.letter).json()
        for svc in (a, b):
            wait_for(lambda svc=svc: jobs_gauge(svc).get("done") == 1, 60, "the done job counted")
        wait_for(lambda: a.get(f"/v1/jobs/{job['id']}").status_code == 404, 40, "the job swept")
        for svc in (a, b):
            wait_for(lambda svc=svc: jobs_gauge(svc).get("done") == 0, 15, "the removed job no longer counted")
            assert set(jobs_gauge(svc).values()) == {0.0}, jobs_gauge(svc)
