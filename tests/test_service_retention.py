"""The service's sweep over real HTTP (olmocr/service/sweep.py): a finished job older than
OLMOCR_SERVICE_JOB_TTL is removed with its uploads and its own results, a running one is kept, orphan uploads
past their grace are deleted, and nothing of the batch workspace is touched. Local and moto-S3 workspaces."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from olmocr.pipeline.workspace.queue import done_key, results_key
from olmocr.pipeline.workspace.storage import open_storage
from olmocr.service.jobs import JOBS, UPLOADS, new_job_id
from olmocr.service.sweep import ORPHAN_GRACE_S
from tests.pipeline_helpers import SAMPLES, StandIn
from tests.test_service import running_service
from tests.waiting import wait_for


@pytest.mark.slow
def test_expired_jobs_and_orphan_uploads_are_swept(workspace: str, standin: StandIn, tmp_path: Path) -> None:
    storage = open_storage(workspace)
    old_orphan = f"{UPLOADS}{new_job_id(time.time() - ORPHAN_GRACE_S - 60)}/0-a.pdf"  # killed mid-submit
    new_orphan = f"{UPLOADS}{new_job_id()}/0-a.pdf"  # a submit in progress: its record comes next
    batch_result, batch_done = results_key("b" * 40), done_key("b" * 40)
    for key in (old_orphan, new_orphan, batch_result, batch_done):
        storage.write(key, b"%PDF-1.4 kept?")
    env = {"OLMOCR_SERVICE_JOB_TTL": "2", "OLMOCR_SERVICE_SWEEP_INTERVAL": "0.5"}
    standin.control(latency=4.0)
    with running_service(workspace, standin, tmp_path / "service.log", env=env) as svc:
        job = svc.submit(SAMPLES.letter).json()
        item = json.loads(storage.read(f"{JOBS}{job['id']}.json") or b"{}")["item"]
        svc.wait_state(job["id"], ("running",), timeout=30)
        time.sleep(2.5)  # older than the TTL, swept several times, still running: kept
        assert svc.get(f"/v1/jobs/{job['id']}").json()["state"] == "running"
        wait_for(lambda: storage.read(results_key(item)) is not None, 30, "the job's result")
        wait_for(lambda: svc.get(f"/v1/jobs/{job['id']}").status_code == 404, 30, "the finished job swept")
        assert "expired jobs removed" in svc.output()
    assert storage.list(f"{UPLOADS}{job['id']}/") == []
    assert storage.read(results_key(item)) is None
    assert storage.read(done_key(item)) is not None  # the done flag stays: nobody redoes the item
    assert storage.list("service/inflight/") == [] and storage.list("service/cancelled/") == []
    assert storage.read(old_orphan) is None
    assert storage.read(new_orphan) is not None
    assert storage.read(batch_result) is not None and storage.read(batch_done) is not None
