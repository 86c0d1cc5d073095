"""The workspace work queue on a local directory and on a real S3 API (moto server on 127.0.0.1)."""

from __future__ import annotations

import json
import multiprocessing
import threading
import time
from pathlib import Path

import pytest

from olmocr.pipeline.errors import LeaseLost
from olmocr.pipeline.workspace.queue import (
    AGE_RESOLUTION_S,
    INDEX_KEY,
    WorkQueue,
    decode_index,
    format_stats,
    group_hash,
    load_index,
    workspace_stats,
)
from olmocr.pipeline.workspace.storage import LocalStorage, Storage, open_storage


def one_page(path: str) -> int:
    return 1


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def _drain(queue: WorkQueue, seen: list[str], limit: int = 1000) -> None:
    for _ in range(limit):
        item = queue.claim()
        if item is None:
            return
        seen.append(item.hash)
        queue.complete(item, json.dumps({"paths": item.paths}).encode() + b"\n", [])


def test_populate_layout_and_grouping(workspace: str) -> None:
    storage = open_storage(workspace)
    queue = WorkQueue(storage)
    pages = {"a.pdf": 300, "b.pdf": 300, "c.pdf": 100, "d.pdf": 900, "e.pdf": 1}
    assert queue.populate(list(pages), pages_per_group=500, page_count=pages.__getitem__) == 4
    index = decode_index(storage.read(INDEX_KEY) or b"")
    assert sorted(index.values()) == [("a.pdf",), ("b.pdf", "c.pdf"), ("d.pdf",), ("e.pdf",)]
    for item_hash, paths in index.items():
        assert item_hash == group_hash(paths)
    # re-populating the same paths adds nothing; new paths are added
    assert (
        queue.populate(list(pages) + ["f.pdf"], pages_per_group=500, page_count=lambda p: pages.get(p, 1))
        == 1
    )
    assert len(load_index(storage)) == 5


@pytest.mark.slow
def test_claim_under_thread_contention(workspace: str) -> None:
    storage = open_storage(workspace)
    paths = [f"doc{i:03d}.pdf" for i in range(24)]
    WorkQueue(storage).populate(paths, pages_per_group=1, page_count=one_page)
    seen: list[str] = []
    threads = [threading.Thread(target=_drain, args=(WorkQueue(storage), seen)) for _ in range(4)]
    shared = WorkQueue(storage)  # two more threads sharing one queue object
    threads += [threading.Thread(target=_drain, args=(shared, seen)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    assert sorted(seen) == sorted(load_index(storage))  # each item exactly once
    assert WorkQueue(storage).counts() == {"total": 24, "done": 24, "leased": 0, "pending": 0}


def _process_worker(workspace: str, out_file: str) -> None:
    seen: list[str] = []
    _drain(WorkQueue(open_storage(workspace)), seen)
    Path(out_file).write_text("\n".join(seen))


@pytest.mark.slow
def test_claim_under_process_contention(workspace: str, tmp_path: Path) -> None:
    storage = open_storage(workspace)
    WorkQueue(storage).populate([f"p{i}.pdf" for i in range(18)], pages_per_group=1, page_count=one_page)
    ctx = multiprocessing.get_context("spawn")
    outs = [tmp_path / f"out{i}.txt" for i in range(3)]
    procs = [ctx.Process(target=_process_worker, args=(workspace, str(o))) for o in outs]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join(timeout=120)
        assert all(p.exitcode == 0 for p in procs)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=10)
    seen = [h for o in outs for h in o.read_text().split()]
    assert sorted(seen) == sorted(load_index(storage))


def test_lease_expiry_takeover_and_renew(workspace: str) -> None:
    """Leases run by the store's clock (the lock's age): the workers' own clocks are far apart here and
    never matter."""
    storage = open_storage(workspace)
    ahead, behind = Clock(), Clock()
    ahead.now += 120  # two minutes ahead of the other worker: written into the records, never compared
    first = WorkQueue(storage, worker_id="first", lease_seconds=2, clock=ahead)
    second = WorkQueue(storage, worker_id="second", lease_seconds=2, clock=behind)
    first.populate(["only.pdf"], page_count=one_page)
    item = first.claim()
    assert item is not None and item.paths == ("only.pdf",)
    assert second.claim() is None  # live lease
    time.sleep(1.5)
    first.renew(item)  # the lock is rewritten: its age starts again
    time.sleep(1.5)
    assert second.claim() is None  # renewed lease still live (3 s after the claim, 1.5 s after the renewal)
    assert second.counts()["leased"] == 1
    # Whole-second ages (Date - LastModified) can read up to one second short: a lease is surely over only
    # once its length and two resolutions have passed.
    time.sleep(2 + 2 * AGE_RESOLUTION_S + 0.6)  # first crashed / stalled: lease over
    taken = second.claim()
    assert taken == item
    with pytest.raises(LeaseLost):
        first.renew(item)
    second.renew(taken)
    second.complete(taken, b"{}\n", [])
    assert second.claim() is None
    assert WorkQueue(storage).claim() is None  # done items are never claimable


def test_release_makes_item_claimable(workspace: str) -> None:
    storage = open_storage(workspace)
    q1, q2 = WorkQueue(storage), WorkQueue(storage)
    q1.populate(["x.pdf"], page_count=one_page)
    item = q1.claim()
    assert item is not None and q2.claim() is None
    q1.release(item)
    assert q2.claim() == item


class RecordingStorage(LocalStorage):
    """A real local storage that also records the order of writes."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.writes: list[str] = []

    def write(self, key: str, data: bytes) -> None:
        self.writes.append(key)
        super().write(key, data)


def test_complete_writes_results_then_failures_then_done(tmp_path: Path) -> None:
    storage = RecordingStorage(tmp_path / "ws")
    queue = WorkQueue(storage)
    queue.populate(["a.pdf", "b.pdf"], page_count=one_page)
    item = queue.claim()
    assert item is not None
    queue.complete(item, b'{"id": "x"}\n', [{"source": "b.pdf", "reason": "corrupt PDF", "retryable": False}])
    order = [k.split("/")[0] for k in storage.writes if not k.startswith("worker_locks")]
    assert order[-3:] == ["results", "failed", "done_flags"]
    assert storage.read(f"results/output_{item.hash}.jsonl") == b'{"id": "x"}\n'
    assert storage.list("worker_locks/") == []


def test_restart_does_only_what_is_not_done(workspace: str) -> None:
    storage = open_storage(workspace)
    paths = [f"r{i}.pdf" for i in range(6)]
    first = WorkQueue(storage, lease_seconds=1)
    first.populate(paths, pages_per_group=1, page_count=one_page)
    done_first: list[str] = []
    for _ in range(2):
        item = first.claim()
        assert item is not None
        first.complete(item, b"{}\n", [])
        done_first.append(item.hash)
    crashed = first.claim()  # held when the process "crashes": never released
    assert crashed is not None
    time.sleep(1 + 2 * AGE_RESOLUTION_S + 0.6)  # the crashed worker's lease is over (see the test above)
    restarted = WorkQueue(storage)
    assert restarted.populate(paths, pages_per_group=1, page_count=one_page) == 0
    seen: list[str] = []
    _drain(restarted, seen)
    assert crashed.hash in seen
    assert sorted(seen + done_first) == sorted(load_index(storage))


def test_retryable_failures_are_requeued_by_next_run(workspace: str) -> None:
    storage = open_storage(workspace)
    queue = WorkQueue(storage)
    queue.populate(["good.pdf", "flaky.pdf", "broken.pdf"], pages_per_group=100, page_count=one_page)
    item = queue.claim()
    assert item is not None and len(item.paths) == 3
    queue.complete(
        item,
        json.dumps({"metadata": {"Source-File": "good.pdf", "pdf-total-pages": 2}}).encode() + b"\n",
        [
            {
                "source": "flaky.pdf",
                "reason": "fallback pages 3/4 exceed --max_page_error_rate",
                "retryable": True,
            },
            {"source": "broken.pdf", "reason": "corrupt PDF: no /Root", "retryable": False},
        ],
    )
    assert queue.claim() is None  # not retried within the same run
    stats = workspace_stats(storage)
    assert {f["source"]: f["retryable"] for f in stats["failed_documents"]} == {
        "flaky.pdf": True,
        "broken.pdf": False,
    }

    # next run: the retryable document comes back as a new item, the bad input does not
    next_run = WorkQueue(storage)
    assert next_run.populate(["good.pdf", "flaky.pdf", "broken.pdf"], page_count=one_page) == 1
    retry = next_run.claim()
    assert retry is not None and retry.paths == ("flaky.pdf",)
    assert next_run.claim() is None
    next_run.complete(
        retry,
        json.dumps({"metadata": {"Source-File": "flaky.pdf", "pdf-total-pages": 4}}).encode() + b"\n",
        [],
    )
    # a third run without --pdfs finds nothing to do, and the retry is not re-added
    third = WorkQueue(storage)
    assert third.claim() is None
    assert third.requeue_retryable() == 0
    stats = workspace_stats(storage)
    assert [f["source"] for f in stats["failed_documents"]] == ["broken.pdf"]
    assert stats["documents"] == 2 and stats["pages"] == 6


def test_retry_item_is_queued_by_claim_without_populate(workspace: str) -> None:
    storage = open_storage(workspace)
    queue = WorkQueue(storage)
    queue.populate(["only.pdf"], page_count=one_page)
    item = queue.claim()
    assert item is not None
    queue.complete(item, b"", [{"source": "only.pdf", "reason": "server unavailable", "retryable": True}])
    again = WorkQueue(storage).claim()
    assert again is not None and again.paths == ("only.pdf",) and again.hash != item.hash


def test_concurrent_populate_loses_nothing(workspace: str) -> None:
    storage = open_storage(workspace)
    batches = [[f"m{j}-{i}.pdf" for i in range(5)] for j in range(4)]
    threads = [
        threading.Thread(
            target=WorkQueue(storage).populate,
            args=(b,),
            kwargs={"pages_per_group": 1, "page_count": one_page},
        )
        for b in batches
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    index = load_index(storage)
    assert sorted(p for ps in index.values() for p in ps) == sorted(p for b in batches for p in b)


def test_stats_over_a_workspace(workspace: str) -> None:
    storage: Storage = open_storage(workspace)
    queue = WorkQueue(storage)
    queue.populate(["a.pdf", "b.pdf", "c.pdf"], pages_per_group=1, page_count=one_page)
    item = queue.claim()
    assert item is not None
    doc = {
        "id": "x",
        "text": "hello",
        "metadata": {
            "Source-File": item.paths[0],
            "pdf-total-pages": 10,
            "total-fallback-pages": 2,
            "total-input-tokens": 100,
            "total-output-tokens": 50,
        },
    }
    queue.complete(item, (json.dumps(doc) + "\n").encode(), [])
    item2 = queue.claim()
    assert item2 is not None
    queue.complete(
        item2, b"", [{"source": item2.paths[0], "reason": "password-protected PDF", "retryable": False}]
    )
    stats = workspace_stats(storage)
    assert stats["items"] == {"total": 3, "done": 2, "leased": 0, "pending": 1}
    assert (stats["documents"], stats["pages"], stats["fallback_pages"]) == (1, 10, 2)
    text = format_stats(stats)
    assert "3 total, 2 done" in text and "password-protected PDF" in text and "2 fallback pages" in text


def test_a_failed_done_check_after_leasing_gives_the_lease_back(tmp_path: Path) -> None:
    """Found under random S3 faults: the read of the done flag failing right after the lease was taken left
    the item leased by this queue, so none of its workers ever claimed it again."""
    storage = LocalStorage(tmp_path / "ws")
    WorkQueue(storage).populate(["only.pdf"], pages_per_group=1, page_count=one_page)
    calls = {"done": 0}

    class Flaky:
        def __getattr__(self, name):  # type: ignore[no-untyped-def]
            return getattr(storage, name)

        def stat(self, key: str) -> tuple[str, float] | None:
            if key.startswith("done_flags/"):
                calls["done"] += 1
                if calls["done"] == 2:  # the probe before the lease passes; the check after it fails
                    raise ConnectionResetError("connection reset by peer")
            return storage.stat(key)

    queue = WorkQueue(Flaky())  # type: ignore[arg-type]
    with pytest.raises(ConnectionResetError):
        queue.claim()
    assert storage.list("worker_locks/") == []  # handed back at once, not left to expire
    item = queue.claim()
    assert item is not None and item.paths == ("only.pdf",)


def test_an_item_another_thread_of_this_queue_leased_is_not_watched_as_someone_elses() -> None:
    """Two threads of one queue race for one item: the loser finds the winner's lease, which is this queue's own.
    It must not count the item as another worker's (such items make every later claim list and stat every
    lock, for the length of a lease: 6 stats a job in olmocr-service, whose workers share one queue)."""
    from bench.scale_store import CountingStore, MemoryStore

    store = CountingStore(MemoryStore())
    queue = WorkQueue(store, lease_seconds=300)  # type: ignore[arg-type]
    queue.populate(["/a.pdf", "/b.pdf"], 1, one_page)
    first = queue.claim()
    assert first is not None
    assert queue._try_lease(first.hash) is None  # the racing thread, a moment after the winner
    second = queue.claim()
    assert second is not None and second.hash != first.hash
    store.reset()
    assert queue.claim() is None
    assert store.requests["LIST"] == 0, store.requests  # nothing leased by anyone else: no listing of the locks
