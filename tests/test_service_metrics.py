"""olmocr-service's /metrics counts the jobs that exist: a job the sweep removed (OLMOCR_SERVICE_JOB_TTL) leaves
``olmocr_service_jobs{state}`` at the next reading of every job, on the replica that swept and on one that did
not; the rounds between read only the unfinished jobs, whatever the number of jobs kept."""

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
    # b keeps jobs forever (no TTL): only a removes them; b reads every job each 0.5 s too (the sweep's pace).
    with (running_service(ws, standin, tmp_path / "a.log", env=sweeping) as a,
          running_service(ws, None, tmp_path / "b.log", env={"OLMOCR_SERVICE_SWEEP_INTERVAL": "0.5"}) as b):
        job = a.submit(SAMPLES.letter).json()
        for svc in (a, b):
            wait_for(lambda svc=svc: jobs_gauge(svc).get("done") == 1, 60, "the done job counted")
        wait_for(lambda: a.get(f"/v1/jobs/{job['id']}").status_code == 404, 40, "the job swept")
        for svc in (a, b):
            wait_for(lambda svc=svc: jobs_gauge(svc).get("done") == 0, 15, "the removed job no longer counted")
            assert set(jobs_gauge(svc).values()) == {0.0}, jobs_gauge(svc)


def _watch_costs(finished: int) -> tuple[int, int, dict[str, float]]:
    """Requests of a first /metrics round (every job) and of the next (the unfinished ones), in a workspace
    keeping ``finished`` finished jobs and one queued job."""
    import json

    from bench.scale_store import CountingStore, MemoryStore
    from olmocr.pipeline.workspace.queue import WorkQueue, done_key, group_hash
    from olmocr.service.app import Service, ServiceConfig
    from olmocr.service.jobs import JOBS, Document, JobStore, new_job_id

    inner = MemoryStore()
    inner.url = "s3://b/ws"  # type: ignore[attr-defined]
    for i in range(finished):  # finished jobs, written directly (no requests counted)
        job_id = new_job_id(1.8e9 + i)
        item = group_hash([f"s3://b/ws/service/uploads/{job_id}/0-a.pdf"])
        record = {"id": job_id, "created": 0.0, "token": "anonymous", "source": "upload", "item": item,
                  "documents": [{"name": "a.pdf", "key": "k", "path": "p", "kind": "pdf", "pages": 1}]}
        inner.put_direct(f"{JOBS}{job_id}.json", json.dumps(record).encode())
        inner.put_direct(done_key(item), b"{}")
    store = CountingStore(inner)
    service = Service(store, WorkQueue(store), ServiceConfig(watch_all_s=3600.0))  # type: ignore[arg-type]
    jobs = JobStore(store, WorkQueue(store))  # type: ignore[arg-type]
    job_id = new_job_id()
    key = jobs.upload_key(job_id, 0, "b.pdf")
    store.write(key, b"%PDF-1.4")
    jobs.submit(job_id, [Document("b.pdf", key, "pdf", 1)], "anonymous", "upload")
    store.reset()
    service._watch_once()
    first = store.total
    store.reset()
    service._watch_once()
    return first, store.total, {s: service.jobs_gauge.labels(s)._value.get() for s in ("queued", "failed", "done")}


def test_a_metrics_round_between_two_readings_of_every_job_reads_only_the_unfinished_ones() -> None:
    """/metrics reads every job at the sweep's pace; the rounds between (every 2 s) list the in-flight markers
    and read the unfinished jobs: the same requests with 10 finished jobs kept or 3,000."""
    small, big = _watch_costs(10), _watch_costs(3000)
    assert big[1] == small[1] and big[1] <= 12, (small, big)
    assert big[0] > small[0]  # the reading of every job lists every record, 1,000 a page
    assert big[2] == {"queued": 1, "failed": 3000, "done": 0}, big[2]  # no results: each failed


def test_a_job_a_request_saw_finished_is_not_read_again_by_the_metrics_watcher() -> None:
    """A convert (or a status read) that finds its job finished notes it as the watcher would: the final state in
    /metrics, the in-flight marker gone. The watcher's next round then reads nothing of the job (it was ten
    reads a job, half of a convert's)."""
    from bench.scale_store import CountingStore, MemoryStore
    from olmocr.pipeline.workspace.queue import WorkQueue
    from olmocr.service.app import Service, ServiceConfig
    from olmocr.service.jobs import INFLIGHT, Document, JobStore, new_job_id

    inner = MemoryStore()
    inner.url = "s3://b/ws"  # type: ignore[attr-defined]
    store = CountingStore(inner)
    queue = WorkQueue(store)  # type: ignore[arg-type]
    service = Service(store, queue, ServiceConfig(watch_all_s=3600.0))  # type: ignore[arg-type]
    jobs = JobStore(store, queue)  # type: ignore[arg-type]
    job_id = new_job_id()
    key = jobs.upload_key(job_id, 0, "a.pdf")
    store.write(key, b"%PDF-1.4")
    record = jobs.submit(job_id, [Document("a.pdf", key, "pdf", 1)], "anonymous", "upload")
    service._watch_once()  # the first round: every job (this one queued)
    item = queue.claim(priority_only=True)
    assert item is not None
    queue.complete(item, b"", [{"source": item.paths[0], "reason": "broken", "retryable": False}])
    status, _ = service._report(record)
    assert status["state"] == "failed" and store.list(INFLIGHT) == []
    store.reset()
    service._watch_once()
    assert service.jobs_gauge.labels("failed")._value.get() == 1
    assert store.requests["GET"] + store.requests["HEAD"] <= 2, store.requests  # the two indexes, not the job
