"""The priority lane's compaction (olmocr/pipeline/workspace/lane_compaction.py): done items go, a concurrent
append is never lost, retries keep their lane, old jobs still read, and the service's sweep costs the same
whatever the workspace holds. Local and moto-S3 workspaces."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.scale_store import CountingStore, MemoryStore
from olmocr.pipeline.workspace.lane_compaction import LaneCompactor
from olmocr.pipeline.workspace.queue import (
    INDEX_KEY,
    PRIORITY_INDEX_KEY,
    WorkQueue,
    decode_index,
    done_key,
    encode_index,
    group_hash,
    results_key,
)
from olmocr.pipeline.workspace.storage import open_storage
from olmocr.service.jobs import Document, JobStore, new_job_id
from olmocr.service.sweep import Sweeper
from tests.pipeline_helpers import SAMPLES, StandIn
from tests.test_service import running_service


def one(path: str) -> int:
    return 1


def lane(storage: object) -> dict[str, tuple[str, ...]]:
    return decode_index(storage.read(PRIORITY_INDEX_KEY) or b"")  # type: ignore[attr-defined]


def queue_jobs(queue: WorkQueue, root: str, names: list[str]) -> list[str]:
    hashes = []
    for name in names:
        path = f"{root}/service/uploads/{name}/0-a.pdf"
        queue.populate([path], 10**12, one, priority=True)
        hashes.append(group_hash([path]))
    return hashes


def finish(queue: WorkQueue, count: int) -> list[str]:
    done = []
    for _ in range(count):
        item = queue.claim(priority_only=True)
        assert item is not None
        queue.complete(item, b"", [])
        done.append(item.hash)
    return done


class AppendsFirst:
    """The workspace, where another process appends a job to the lane just before our conditional write."""

    def __init__(self, inner: object, append: object) -> None:
        self.inner, self.append, self.writes = inner, append, []

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)

    def replace_if(self, key: str, data: bytes, tag: str) -> bool:
        if key == PRIORITY_INDEX_KEY and self.append is not None:
            append, self.append = self.append, None
            append()  # type: ignore[operator]
        ok = self.inner.replace_if(key, data, tag)  # type: ignore[attr-defined]
        self.writes.append(ok)
        return ok


def test_compaction_keeps_an_append_made_during_it(workspace: str) -> None:
    """Done items go; the job another process appends between our read and our write stays (the write
    fails its condition and is redone on the new lane)."""
    storage = open_storage(workspace)
    queue = WorkQueue(storage)
    hashes = queue_jobs(queue, workspace, [f"{n:024x}" for n in range(6)])
    done = finish(queue, 4)
    other = WorkQueue(open_storage(workspace))  # another replica, submitting a job
    late: list[str] = []
    racing = AppendsFirst(storage, lambda: late.extend(queue_jobs(other, workspace, ["f" * 24])))
    compacting = WorkQueue(racing)  # type: ignore[arg-type]
    removed = LaneCompactor(compacting, grace_s=0, min_drop=1).compact()
    assert removed == 4
    assert racing.writes == [False, True]  # the first write lost the race, the second won
    assert set(lane(storage)) == (set(hashes) - set(done)) | set(late)
    assert len(late) == 1
    # A worker still claims what is left, the late job included, and never a removed item again.
    claimed = {item.hash for item in iter(lambda: WorkQueue(storage).claim(priority_only=True), None)}
    assert claimed == (set(hashes) - set(done)) | set(late)


def test_concurrent_submits_and_compactions_lose_nothing(tmp_path: Path) -> None:
    """Eight submitters and two compacting replicas at once: every job queued is in the lane or done."""
    root = str(tmp_path / "ws")
    storage = open_storage(root)
    queue = WorkQueue(storage)
    first = queue_jobs(queue, root, [f"{n:024x}" for n in range(10)])
    finish(queue, 10)
    stop = threading.Event()

    def compacting() -> int:
        compactor = LaneCompactor(WorkQueue(open_storage(root)), grace_s=0, min_drop=1)
        total = 0
        while not stop.is_set():
            total += compactor.compact()
        return total

    def submit(n: int) -> list[str]:
        return queue_jobs(WorkQueue(open_storage(root)), root, [f"{n + 1:04x}{k:020x}" for k in range(10)])

    with ThreadPoolExecutor(10) as pool:
        compactors = [pool.submit(compacting) for _ in range(2)]
        submitted = [h for hashes in pool.map(submit, range(8)) for h in hashes]
        stop.set()
        removed = sum(c.result() for c in compactors)
    assert removed == 10  # the ten done ones, once
    assert set(lane(storage)) == set(submitted) and not set(first) & set(lane(storage))


def test_an_item_with_retryable_failures_keeps_its_retries_in_the_lane(tmp_path: Path) -> None:
    """The retries of an item follow its lane only while it is in it: it and its retry item stay, so the
    next run's re-queueing adds nothing and the main index is untouched."""
    root = str(tmp_path / "ws")
    storage = open_storage(root)
    queue = WorkQueue(storage)
    queue.populate([str(tmp_path / "batch.pdf")], page_count=one)
    main = storage.read(INDEX_KEY)
    [original, plain] = queue_jobs(queue, root, ["a" * 24, "b" * 24])
    paths = lane(storage)[original]
    item = queue.claim(priority_only=True)
    while item is not None and item.hash != original:
        queue.complete(item, b"", [])
        item = queue.claim(priority_only=True)
    assert item is not None
    queue.complete(item, b"", [{"source": paths[0], "reason": "server down", "retryable": True}])
    assert WorkQueue(storage).requeue_retryable() == 1
    [retry] = set(lane(storage)) - {original, plain}
    fresh = WorkQueue(storage)
    finish(fresh, sum(1 for h in lane(storage) if not fresh.is_done(h)))  # the retry item (and the plain one)
    assert LaneCompactor(WorkQueue(storage), grace_s=0, min_drop=1).compact() == 1  # only the plain one
    assert set(lane(storage)) == {original, retry}
    assert WorkQueue(storage).requeue_retryable() == 0
    assert storage.read(INDEX_KEY) == main


def test_a_done_item_within_its_grace_stays(tmp_path: Path) -> None:
    storage = open_storage(str(tmp_path / "ws"))
    queue = WorkQueue(storage)
    queue_jobs(queue, str(tmp_path / "ws"), ["c" * 24, "d" * 24])
    finish(queue, 2)
    assert LaneCompactor(queue, grace_s=600, min_drop=1).compact() == 0
    assert len(lane(storage)) == 2


def test_an_old_job_reads_done_after_its_item_left_the_lane(workspace: str, standin: StandIn,
                                                            tmp_path: Path) -> None:
    """A finished job's item removed from the lane: its status and results read as before, and reading it
    does not queue it again."""
    with running_service(workspace, standin, tmp_path / "service.log") as svc:
        job = svc.submit(SAMPLES.guide).json()
        before = svc.wait_state(job["id"])
        result = svc.get(f"/v1/jobs/{job['id']}/result?format=pages").json()
        storage = open_storage(workspace)
        assert LaneCompactor(WorkQueue(storage), grace_s=0, min_drop=1).compact() == 1  # another replica
        assert lane(storage) == {}
        later = svc.submit(SAMPLES.letter).json()  # the service's copy of the lane is the compacted one now
        svc.wait_state(later["id"])
        assert svc.get(f"/v1/jobs/{job['id']}").json() == before
        assert svc.get(f"/v1/jobs/{job['id']}/result?format=pages").json() == result
        assert before["id"] not in str(lane(storage)) and len(lane(storage)) == 1  # not queued again


def test_a_sweep_costs_the_same_whatever_the_batch_workspace_holds() -> None:
    """The sweep lists the service's prefix only: 50,000 batch items cost it no request."""

    def cost(batch_items: int) -> int:
        store = MemoryStore()
        store.url = "s3://b/ws"  # type: ignore[attr-defined]
        groups = {group_hash([f"s3://b/docs/{i}.pdf"]): (f"s3://b/docs/{i}.pdf",) for i in range(batch_items)}
        store.put_direct(INDEX_KEY, encode_index(groups))
        for item_hash in groups:
            store.put_direct(done_key(item_hash), b"{}")
            store.put_direct(results_key(item_hash), b"")
        counting = CountingStore(store)
        jobs = JobStore(counting, WorkQueue(counting))  # type: ignore[arg-type]
        for _ in range(20):
            job_id = new_job_id()
            key = jobs.upload_key(job_id, 0, "a.pdf")
            counting.write(key, b"%PDF-1.4")
            jobs.submit(job_id, [Document("a.pdf", key, "pdf", 1)], "anonymous", "upload")
        sweeper = Sweeper(jobs, ttl_s=3600, compactor=LaneCompactor(WorkQueue(counting)))  # type: ignore[arg-type]
        sweeper.sweep()
        counting.reset()
        sweeper.sweep()
        return counting.total

    small, big = cost(10), cost(50_000)
    print(f"sweep requests: {small} (10 batch items), {big} (50,000)")
    assert small == big, (small, big)
    assert big <= 2 + 1 + 20, big  # two listings, the lane's conditional GET, a HEAD per job not done


def test_the_page_counts_of_removed_items_leave_the_pages_file(tmp_path: Path) -> None:
    """Every job's item gets its page count in ``work_index_pages.json`` once done; the compaction that removes
    the items from the lane removes their counts too (the file is read and rewritten whole at each progress
    refresh: it must not grow with every job ever run). A batch item's count stays."""
    from olmocr.pipeline.workspace.totals import load_pages

    storage = open_storage(str(tmp_path / "ws"))
    queue = WorkQueue(storage)
    queue.populate([str(tmp_path / "batch.pdf")], 500, lambda p: 7)
    batch = queue.claim()
    assert batch is not None and not batch.priority
    queue.complete(batch, b"", [{"source": batch.paths[0], "reason": "bad", "retryable": False}])
    queue_jobs(queue, str(tmp_path / "ws"), ["e" * 24, "f" * 24, "0" * 24])
    done = finish(queue, 2)
    queue.flush_page_counts()
    assert set(load_pages(storage)) == {batch.hash, *done}
    assert LaneCompactor(queue, grace_s=0, min_drop=1).compact() == 2
    assert set(load_pages(storage)) == {batch.hash}
