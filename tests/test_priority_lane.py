"""The queue's priority lane (olmocr-service's jobs before batch items): on a real local workspace, the
service end to end with the stand-in (under ``--scheduling-policy priority``), and the service's own cost
(a submit or a status read: a fixed number of requests whatever the workspace's size)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import requests

from bench.scale_store import CountingStore, MemoryStore
from olmocr.pipeline.pages.page import INTERACTIVE_PRIORITY_STEP
from olmocr.pipeline.workspace.queue import (
    INDEX_KEY,
    PRIORITY_INDEX_KEY,
    WorkQueue,
    decode_index,
    done_key,
    encode_index,
    failed_key,
    group_hash,
)
from olmocr.pipeline.workspace.storage import LocalStorage
from olmocr.service.jobs import Document, JobStore, new_job_id
from tests.pipeline_helpers import launch_standin
from tests.sample_docs import write_text_pdf
from tests.standin_helpers import VLLM_FLAGS
from tests.test_service import one_page_pdfs, running_service
from tests.waiting import wait_for

pytestmark = pytest.mark.timeout(180)


def one(path: str) -> int:
    return 1


def test_a_priority_item_is_claimed_before_queued_batch_items(tmp_path: Path) -> None:
    storage = LocalStorage(str(tmp_path / "ws"))
    batch = [str(tmp_path / f"batch/{i:03d}.pdf") for i in range(60)]
    WorkQueue(storage).populate(batch, pages_per_group=1, page_count=one)
    main_before = storage.read(INDEX_KEY)
    worker = WorkQueue(storage)
    first = worker.claim()  # a warm worker: it has read the index before the job arrives
    assert first is not None and not first.priority
    job = [str(tmp_path / "service/uploads/job/0-a.pdf"), str(tmp_path / "service/uploads/job/1-b.pdf")]
    assert WorkQueue(storage).populate(job, 10**12, one, priority=True) == 1
    # The main index is untouched (upstream reads only it); the job is in the priority lane alone.
    assert storage.read(INDEX_KEY) == main_before
    assert decode_index(storage.read(PRIORITY_INDEX_KEY) or b"") == {group_hash(job): tuple(sorted(job))}
    worker.refresh_index()  # what a --follow worker woken by the service does; others look within 2 s
    item = worker.claim()
    assert item is not None and item.hash == group_hash(job) and item.priority, item
    assert item.paths == tuple(sorted(job))
    # A fresh worker too: the lane is read first, whatever the random order of the batch.
    worker.complete(item, b"", [])
    for _ in range(5):
        WorkQueue(storage).populate([str(tmp_path / f"svc/{_}.pdf")], 10**12, one, priority=True)
    fresh = WorkQueue(storage)
    claimed = [fresh.claim() for _ in range(8)]
    assert [c.priority for c in claimed if c is not None] == [True] * 5 + [False] * 3
    counts = fresh.counts()
    assert counts["total"] == 60 + 1 + 5 and counts["done"] == 1, counts


def test_retries_and_hand_backs_of_a_priority_item_stay_in_its_lane(tmp_path: Path) -> None:
    storage = LocalStorage(str(tmp_path / "ws"))
    WorkQueue(storage).populate([str(tmp_path / "batch.pdf")], page_count=one)
    main_before = storage.read(INDEX_KEY)
    paths = [str(tmp_path / f"svc/{n}.pdf") for n in range(3)]
    queue = WorkQueue(storage)
    queue.populate(paths, 10**12, one, priority=True)
    item = queue.claim()
    assert item is not None and item.priority
    # A stop hands back the documents not reached: into the priority lane.
    new = queue.complete_partial(item, b"", [{"source": paths[0], "reason": "broken", "retryable": True}],
                                 paths[1:])
    lane = decode_index(storage.read(PRIORITY_INDEX_KEY) or b"")
    assert new in lane and lane[new] == tuple(paths[1:])
    # The next run's re-queueing of the retryable failure: into the priority lane too.
    assert WorkQueue(storage).requeue_retryable() == 1
    lane = decode_index(storage.read(PRIORITY_INDEX_KEY) or b"")
    assert len(lane) == 3 and (paths[0],) in lane.values(), lane
    assert storage.read(INDEX_KEY) == main_before


@pytest.mark.slow
def test_a_service_job_overtakes_a_running_batch_and_its_pages_go_sooner(tmp_path: Path) -> None:
    """Two 300-page batch documents (an item each) queued before the service starts; one embedded batch
    worker; a stand-in that serves one request at a time, 0.2 s each, by priority. A job submitted while the
    batch item is in progress is claimed at once by the priority-lane worker; its page is rendered through a
    gate of its own (not behind the batch's ~300 queued renders), and sent with the run's ``--priority``
    minus INTERACTIVE_PRIORITY_STEP it is served before the batch pages waiting at the server: the job is
    done while a few batch pages are answered, long before the first batch item."""
    ws = tmp_path / "ws"
    (tmp_path / "batch").mkdir()
    batch = [write_text_pdf(tmp_path / "batch" / f"big{i}.pdf", 300) for i in range(2)]
    WorkQueue(LocalStorage(str(ws))).populate([str(p) for p in batch], pages_per_group=300, page_count=lambda p: 300)
    s = launch_standin(tmp_path, env={"OLMOCR_STANDIN_LATENCY": "0.2", "OLMOCR_STANDIN_CONCURRENCY": "1"},
                       extra_args=(*VLLM_FLAGS, "--scheduling-policy", "priority"))
    job_doc = one_page_pdfs(tmp_path / "job", 1)[0]

    def batch_pages_answered() -> int:
        return int(requests.get(f"{s.url}/admin/info", timeout=5).json()["priorities"].get("0", 0))

    try:
        with running_service(ws, s, tmp_path / "service.log", "--workers", "1", "--priority", "0") as svc:
            wait_for(lambda: batch_pages_answered() >= 1, 60, "the batch under way")
            before = requests.get(f"{s.url}/admin/info", timeout=5).json()["priorities"]  # probes included
            r = svc.submit(job_doc)
            assert r.status_code == 202, r.text
            job = svc.wait_state(r.json()["id"], timeout=60)
            done_flags = ws / "done_flags"
            batch_done = len(list(done_flags.glob("*.flag"))) - 1
            seen = requests.get(f"{s.url}/admin/info", timeout=5).json()["priorities"]
    finally:
        s.stop()
    assert job["state"] == "done", job
    assert batch_done == 0, f"the job waited for {batch_done} batch items (pages answered: {seen})"
    interactive = str(-INTERACTIVE_PRIORITY_STEP)
    assert seen.get(interactive, 0) - before.get(interactive, 0) == 1, (before, seen)  # the job's one page
    assert set(seen) == {"0", interactive}, seen  # batch pages: the run's --priority 0
    print("batch pages answered while the job ran:", seen["0"] - before["0"])
    assert seen["0"] - before["0"] <= 10, (before, seen)  # not behind the batch's queued renders and requests


# ---- the service's own cost -------------------------------------------------------------------------------


def _big_workspace(items: int) -> CountingStore:
    store = MemoryStore()
    store.url = "s3://b/ws"  # type: ignore[attr-defined]
    groups = {group_hash([f"s3://b/docs/{i:07d}.pdf"]): (f"s3://b/docs/{i:07d}.pdf",) for i in range(items)}
    store.put_direct(INDEX_KEY, encode_index(groups))
    for n, item_hash in enumerate(groups):
        if n % 2:
            store.put_direct(done_key(item_hash), b"{}")
        if n % 100 == 1:  # a finished batch item with a failed document (final)
            store.put_direct(failed_key(item_hash), b'{"source": "x", "reason": "bad", "retryable": false}\n')
    counting = CountingStore(store)
    counting.url = "s3://b/ws"  # type: ignore[attr-defined]
    return counting


def _costs(items: int) -> tuple[int, int, int, int]:
    """Requests and bytes of the 5th submit and of a status read, with a long-lived queue."""
    store = _big_workspace(items)
    jobs = JobStore(store, WorkQueue(store))  # type: ignore[arg-type]
    records = []
    for _ in range(5):
        job_id = new_job_id()
        key = jobs.upload_key(job_id, 0, "a.pdf")
        store.write(key, b"%PDF-1.4")
        store.reset()
        records.append(jobs.submit(job_id, [Document("a.pdf", key, "pdf", 1)], "anonymous", "upload"))
    submit = (store.total, store.bytes_in + store.bytes_out)
    jobs.status(records[0])
    store.reset()
    status = jobs.status(records[-1])
    assert status["state"] == "queued", status
    return (*submit, store.total, store.bytes_in + store.bytes_out)


def test_a_submit_and_a_status_read_cost_the_same_whatever_the_workspace_size() -> None:
    small, big = _costs(10), _costs(50_000)
    assert big[0] == small[0] and big[2] == small[2], (small, big)  # requests: the same count
    assert big[0] <= 8 and big[2] <= 8, big
    assert big[1] <= 16 * 1024 and big[3] <= 16 * 1024, big  # no index download (50,000 items: ~1 MB)


def test_a_status_read_of_a_job_queued_by_another_replica_finds_its_item(tmp_path: Path) -> None:
    storage = LocalStorage(str(tmp_path / "ws"))
    a, b = JobStore(storage, WorkQueue(storage)), JobStore(storage, WorkQueue(storage))
    b.status  # noqa: B018 - replica b has read nothing yet
    job_id = new_job_id()
    key = a.upload_key(job_id, 0, "a.pdf")
    storage.write(key, b"%PDF-1.4")
    record = a.submit(job_id, [Document("a.pdf", key, "pdf", 1)], "anonymous", "upload")
    lane = storage.read(PRIORITY_INDEX_KEY)
    assert b.status(record)["state"] == "queued"
    assert storage.read(PRIORITY_INDEX_KEY) == lane  # found, not queued a second time
    assert json.loads(storage.read(f"service/jobs/{job_id}.json") or b"{}")["item"] in decode_index(lane or b"")


def test_a_page_of_recent_jobs_lists_only_the_time_bucket_that_holds_it() -> None:
    """GET /v1/jobs (newest first, paged with ``before``) lists the jobs of the hours around the page, not every
    job kept: 3,000 jobs over 30 days and 30 in the last hour, a page of 20 costs one LIST request. Every page
    is the one a listing of every job gives, across buckets too."""
    import random

    from olmocr.service.jobs import JOBS

    store = MemoryStore()
    store.url = "s3://b/ws"  # type: ignore[attr-defined]
    now = 1.8e9
    rng = random.Random(7)
    times = [now - rng.uniform(3600, 30 * 86400) for _ in range(3000)] + [now - rng.uniform(0, 3600) for _ in range(30)]
    for t in times:
        store.put_direct(f"{JOBS}{new_job_id(t)}.json", b"{}")
    counting = CountingStore(store)
    jobs = JobStore(counting, WorkQueue(counting), clock=lambda: now)  # type: ignore[arg-type]
    every = sorted((k[len(JOBS):-5] for k in store.list(JOBS)), reverse=True)
    counting.reset()
    first = jobs.list_ids(21)
    assert counting.requests["LIST"] == 1, counting.requests
    assert first == every[:21]
    before = first[19]
    for _ in range(200):  # page on, across bucket boundaries, to the end
        page = jobs.list_ids(21, before)
        assert page == [i for i in every if i < before][:21], before
        if len(page) < 21:
            break
        before = page[19]
    assert len(page) < 21
