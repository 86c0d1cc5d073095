"""The work queue's cost does not grow with the workspace (issue 29), against a counting object store
(bench/scale_store.py: an in-process fake with S3's conditional-write semantics) and moto; dead workers,
stops that keep finished work, clock skew and throttling."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from bench.scale_store import CountingStore, MemoryStore, Retrying, SlowDown
from olmocr.pipeline.errors import LeaseLost
from olmocr.pipeline.workspace.queue import (
    INDEX_KEY,
    UNFINISHED_REASON,
    WorkQueue,
    done_key,
    encode_index,
    group_hash,
    load_index,
    lock_key,
    workspace_stats,
)
from olmocr.pipeline.workspace.storage import LocalStorage
from tests.standin_helpers import REPO_ROOT

pytestmark = pytest.mark.timeout(240)


def _workspace(items: int, done_share: float = 0.5) -> MemoryStore:
    """An index of ``items`` one-document items, ``done_share`` of them with done flags written directly."""
    store = MemoryStore()
    groups = {group_hash([f"s3://b/docs/{i:07d}.pdf"]): (f"s3://b/docs/{i:07d}.pdf",) for i in range(items)}
    store.put_direct(INDEX_KEY, encode_index(groups))
    for n, item_hash in enumerate(groups):
        if n < items * done_share:
            store.put_direct(done_key(item_hash), b"{}")
    return store


def _claim_costs(items: int, claims: int = 30) -> tuple[float, int, int]:
    """Mean requests, most requests and most bytes of one claim of a warm queue (index already read)."""
    store = CountingStore(_workspace(items))
    queue = WorkQueue(store, lease_seconds=300)
    # Claims probe random items, and a run of done ones costs a HEAD each: the most of 30 claims passed 10 one
    # run in ten (8 done probes in a row is 1 in 256 per claim). A fixed seed makes the bound repeatable.
    random.seed(29)
    assert queue.claim() is not None  # the first claim of a process reads the index: not measured here
    requests, most, most_bytes = [], 0, 0
    for _ in range(claims):
        store.reset()
        assert queue.claim() is not None
        requests.append(store.total)
        most = max(most, store.total)
        most_bytes = max(most_bytes, store.bytes_in + store.bytes_out)
    return sum(requests) / len(requests), most, most_bytes


def test_claim_costs_do_not_grow_with_the_index() -> None:
    small = _claim_costs(100)
    big = _claim_costs(100_000)
    # Half the items are done: a claim probes ~2 items (HEAD of the done flag, create of the lock, HEAD again).
    # ~4 on average: a probe that finds a done item costs 1 request, a claim 3 (+ an index check every 2 s).
    assert big[0] <= 5 and small[0] <= 5 and big[1] <= 10, (small, big)
    assert big[0] <= small[0] * 1.5 + 1, (small, big)  # the same at 100 and at 100,000 items
    assert big[2] <= 64 * 1024, big  # no index download, no listing of 50,000 done flags per claim


def test_a_changed_index_is_read_again_an_unchanged_one_costs_no_body() -> None:
    store = CountingStore(_workspace(1000, done_share=0.0))
    queue = WorkQueue(store)
    queue.claim()
    size = len(store.inner.read(INDEX_KEY) or b"")
    store.reset()
    queue.index.refresh()
    assert store.requests["GET"] == 1 and store.bytes_in == 0  # 304: one request, no body
    other = WorkQueue(store)
    other.populate(["s3://b/new.pdf"], page_count=lambda p: 1)
    store.reset()
    queue.index.refresh()
    assert store.bytes_in >= size  # changed: read again
    assert group_hash(["s3://b/new.pdf"]) in queue.index.spans


def test_queueing_reads_no_document(s3_server, monkeypatch: pytest.MonkeyPatch) -> None:
    """400 S3 documents are queued with one listing and the 100-document sample that sizes them (as upstream):
    never a read per document."""
    from tests.fault_proxy import FaultProxy

    client = s3_server.client()
    pdf = (REPO_ROOT / "tests").glob("*.py")  # any bytes: queueing must not look at them
    del pdf
    for i in range(400):
        client.put_object(Bucket=s3_server.bucket, Key=f"docs/{i:04d}.pdf", Body=b"%PDF-1.4 not really\n")
    seen: list[tuple[str, str]] = []
    lock = threading.Lock()

    def record(method: str, path: str) -> None:
        with lock:
            seen.append((method, path))

    with FaultProxy(s3_server.endpoint, rule=lambda m, p: record(m, p)) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        from olmocr.pipeline.workspace import inputs

        inputs._clients.clear()
        from olmocr.pipeline.runner import populate
        from olmocr.pipeline.workspace.storage import open_storage

        storage = open_storage(s3_server.url("ws"))
        # As the pipeline queues (streamed: the listing's pages go to the queue as they come).
        assert populate(WorkQueue(storage), (f"s3://{s3_server.bucket}/docs/*.pdf",), pages_per_group=50) == 400
        assert len({p for ps in load_index(storage).values() for p in ps}) == 400
        inputs._clients.clear()
    doc_reads = [p for m, p in seen if m in ("GET", "HEAD") and "/docs/" in p and "list-type" not in p]
    assert len(doc_reads) <= 100, len(doc_reads)  # the sample only: 0.25 reads per document here, 0.0001 at 1M
    listings = [p for m, p in seen if "list-type" in p and "prefix=docs" in p]
    assert len(listings) == 1


def test_clock_skew_never_takes_a_live_lease() -> None:
    """Two workers whose clocks are 4 minutes apart (one 2 min behind, one 2 min ahead): the one ahead never
    sees the other's renewed lease as over, and takes it only once it really is."""
    store = MemoryStore()
    behind = WorkQueue(store, worker_id="behind", lease_seconds=3, clock=lambda: time.time() - 120)
    ahead = WorkQueue(store, worker_id="ahead", lease_seconds=3, clock=lambda: time.time() + 120)
    behind.populate(["a.pdf"], page_count=lambda p: 1)
    item = behind.claim()
    assert item is not None
    for _ in range(4):  # 4 s of renewals every second: live all along
        time.sleep(1.0)
        behind.renew(item)
        assert ahead.claim() is None
    time.sleep(3 + 1 + 1.1)  # no renewal: over by the store's clock
    assert ahead.claim() == item
    assert store.live_lease_takeovers == 0


def _drain_with_errors(queue: WorkQueue, done: list[str], errors: list[str]) -> None:
    """A worker that, like the pipeline's, retries whatever failed and stops once nothing is pending or
    leased (a lease whose holder gave up expires: 2 s here)."""
    deadline = time.monotonic() + 150
    while time.monotonic() < deadline:
        try:
            item = queue.claim()
            if item is None:
                counts = queue.counts()
                if counts["pending"] <= 0 and counts["leased"] <= 0:
                    return
                time.sleep(0.3)
                continue
            queue.complete(item, json.dumps({"metadata": {"Source-File": item.paths[0],
                                                          "pdf-total-pages": 1}}).encode() + b"\n", [])
            done.append(item.hash)
        except SlowDown as exc:
            errors.append(str(exc))  # the item, if any, is redone after its lease expires


def test_throttling_loses_nothing_and_does_nothing_twice() -> None:
    """5% of requests answered SlowDown, retried twice at most (so some reach the queue's callers)."""
    inner = _workspace(300, done_share=0.0)
    store = Retrying(CountingStore(inner, slowdown=0.05, seed=7), attempts=2, base_s=0.01)
    done: list[str] = []
    errors: list[str] = []
    workers = [threading.Thread(target=_drain_with_errors, args=(WorkQueue(store, lease_seconds=2), done, errors))  # type: ignore[arg-type]
               for _ in range(12)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=200)
    assert not any(w.is_alive() for w in workers)
    assert store.inner.throttled > 0 and errors  # the faults did reach the queue
    index = load_index(inner)  # type: ignore[arg-type]
    assert all(inner.read(done_key(h)) is not None for h in index)  # nothing lost
    assert all(inner.read(f"results/output_{h}.jsonl") for h in index)
    flags = {k: n for k, n in inner.writes.items() if k.startswith("done_flags/")}
    assert len(flags) == len(index) and max(flags.values()) == 1  # no item completed twice
    # A result is written again only when the completion that wrote it failed before its done flag.
    assert sum(n - 1 for k, n in inner.writes.items() if k.startswith("results/")) <= len(errors)
    assert inner.live_lease_takeovers == 0


HOLDER = textwrap.dedent("""
    import sys, time
    from olmocr.pipeline.workspace.queue import WorkQueue
    from olmocr.pipeline.workspace.storage import LocalStorage
    queue = WorkQueue(LocalStorage(sys.argv[1]), lease_seconds=300)
    item = queue.claim()
    print(item.hash, flush=True)
    time.sleep(600)
""")


def test_a_lease_of_a_dead_process_on_this_host_is_free_at_once(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    storage = LocalStorage(ws)
    WorkQueue(storage).populate(["only.pdf"], page_count=lambda p: 1)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(ws)], stdout=subprocess.PIPE, text=True,
                              cwd=str(REPO_ROOT))
    try:
        held = (holder.stdout.readline() if holder.stdout else "").strip()
        assert held
        assert WorkQueue(storage).claim() is None  # alive: its 300 s lease is respected
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(10)
    t0 = time.monotonic()
    item = WorkQueue(storage).claim()
    assert item is not None and item.hash == held
    assert time.monotonic() - t0 < 2  # at once, not after 300 s


def test_a_reused_pid_does_not_keep_a_dead_lease(tmp_path: Path) -> None:
    """The lock names a live process (our parent) but another start time: that pid was reused."""
    from olmocr.pipeline.workspace import queue as queue_module

    storage = LocalStorage(tmp_path / "ws")
    q = WorkQueue(storage)
    q.populate(["only.pdf"], page_count=lambda p: 1)
    item_hash = group_hash(["only.pdf"])
    record = json.loads(q._lease_record("x"))
    parent_start = queue_module.process_start_time(os.getppid())
    storage.write(lock_key(item_hash), json.dumps({**record, "pid": os.getppid(), "pid_start": parent_start}).encode())
    assert WorkQueue(storage).claim() is None  # that process is alive and is the one that took the lease
    storage.write(lock_key(item_hash), json.dumps({**record, "pid": os.getppid(),
                                                   "pid_start": (parent_start or 0) - 3600}).encode())
    taken = WorkQueue(storage).claim()
    assert taken is not None and taken.hash == item_hash


def test_a_stop_keeps_finished_documents_and_hands_back_the_rest(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "ws")
    paths = [f"d{i:02d}.pdf" for i in range(40)]
    first = WorkQueue(storage)
    first.populate(paths, pages_per_group=100, page_count=lambda p: 1)
    item = first.claim()
    assert item is not None and len(item.paths) == 40
    finished = list(item.paths[:25])
    results = b"".join(json.dumps({"metadata": {"Source-File": p, "pdf-total-pages": 1}}).encode() + b"\n"
                       for p in finished[:-1])
    failed = [{"source": finished[-1], "reason": "server unavailable", "retryable": True}]
    rest_hash = first.complete_partial(item, results, failed, item.paths[25:])
    assert rest_hash is not None
    assert load_index(storage)[rest_hash] == tuple(item.paths[25:])  # queued at once, for the running workers
    # A new run (its first claim re-queues retryable failures): the failed document comes back on its own,
    # the handed-back documents are not queued a second time.
    later = WorkQueue(storage)
    claimed = [later.claim(), later.claim()]
    assert later.claim() is None
    assert sorted(c.paths for c in claimed if c) == sorted([tuple(item.paths[25:]), (finished[-1],)])
    assert WorkQueue(storage).requeue_retryable() == 0
    index = load_index(storage)
    queued = [p for h, ps in index.items() if h != item.hash for p in ps]
    assert sorted(queued) == sorted(item.paths[24:])  # each unfinished or failed document queued once
    stats = workspace_stats(storage)
    assert UNFINISHED_REASON not in json.dumps(stats["failed_documents"])  # handed back is not failed


def test_a_worker_whose_lease_ran_out_writes_no_done_flag() -> None:
    """A slow worker (its renewals throttled, say) finishing after its lease ended must not complete the
    item another worker took over: complete() checks the lease is good for a third of its length, renewing
    it when it is not, before the results and again before the done flag."""
    store = MemoryStore()
    slow = WorkQueue(store, worker_id="slow", lease_seconds=2)
    other = WorkQueue(store, worker_id="other", lease_seconds=2)
    slow.populate(["a.pdf", "b.pdf"], pages_per_group=1, page_count=lambda p: 1)
    first = slow.claim()
    second = slow.claim()
    assert first is not None and second is not None
    time.sleep(2 + 1 + 1.2)  # both leases over by the store's clock
    taken = other.claim()
    assert taken is not None
    late = first if taken == first else second
    with pytest.raises(LeaseLost):
        slow.complete(late, b'{"id": "late"}\n', [])
    assert store.read(done_key(late.hash)) is None
    assert store.writes.get(f"results/output_{late.hash}.jsonl", 0) == 0  # nothing written at all
    # The other one, not taken by anybody: its lease is renewed, then it completes.
    kept = second if late == first else first
    slow.complete(kept, b'{"id": "kept"}\n', [])
    assert store.read(done_key(kept.hash)) is not None
    other.complete(taken, b'{"id": "taken"}\n', [])
    assert store.live_lease_takeovers == 0 and max(store.writes.values()) == 1


def test_a_nearly_finished_workspace_is_listed_not_probed_item_by_item() -> None:
    """3,000 items, 99% done: a new process claims the last 30 with a few listings of the done flags, not
    a HEAD per done item (probing is the cheaper way only while most items are not done)."""
    store = CountingStore(_workspace(3000, done_share=0.99))
    queue = WorkQueue(store)
    claimed = 0
    while queue.claim() is not None:
        claimed += 1
    assert claimed == 30
    assert store.requests["LIST"] >= 3 and store.total < 400, dict(store.requests)
