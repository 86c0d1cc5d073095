"""What makes olmocr-service keep up with the batch pipeline (bench/service.py): jobs' items claimed many at
a time, submits sharing one write of the priority lane, completions waking their converts, and an
interactive page going first at every gate a batch keeps full (page slots, request slots, render turns).

Real processes where a user has them: the service as users run it, the stand-in server, pdfium rendering in
the render pool."""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from olmocr.pipeline.gates import PriorityGate, interactive_reserve
from olmocr.pipeline.workspace.queue import PRIORITY_INDEX_KEY, WorkItem, decode_index, done_key
from olmocr.pipeline.workspace.storage import LocalStorage
from olmocr.service.lane import ServiceQueue
from tests.pipeline_helpers import launch_standin
from tests.sample_docs import write_text_pdf
from tests.test_service import one_page_pdfs, running_service
from tests.waiting import wait_for

# ---- the gates --------------------------------------------------------------------------------------------


@pytest.fixture
def render_pool() -> Iterator[None]:
    """A render pool in this process starts multiprocessing's resource tracker: stop it afterwards if this
    test started it (tests that check for stray child processes may share this process)."""
    from multiprocessing import resource_tracker

    tracker = resource_tracker._resource_tracker
    running = tracker._pid is not None
    yield
    if not running and tracker._pid is not None:
        tracker._stop()


def test_the_reserve_never_exceeds_a_small_cap_a_user_set() -> None:
    """--max_concurrent_requests 1 (a provider's quota) stays 1 for interactive pages too; the default 1,600
    gets 16 more, 1 %."""
    assert [interactive_reserve(cap) for cap in (1, 99, 100, 1600, 100_000)] == [0, 0, 1, 16, 16]


def _recording_gate(reserve: int) -> tuple[PriorityGate, dict[str, bool], list[str],
                                           Callable[[str, float], Awaitable[None]]]:
    """A one-slot gate with ``reserve``, its urgency switch, the order slots were taken in, and ``take(name,
    hold)``: hold a slot for ``hold`` seconds, noting the name when it is had."""
    urgent = {"now": False}
    gate = PriorityGate(1, lambda: urgent["now"], reserve=reserve)
    order: list[str] = []

    async def take(name: str, hold: float) -> None:
        async with gate:
            order.append(name)
            await asyncio.sleep(hold)

    return gate, urgent, order, take


def test_an_urgent_waiter_borrows_a_slot_of_the_reserve_when_the_gate_is_full() -> None:
    """A gate full of batch pages: an interactive page takes a reserve slot at once (it queues at the server,
    which schedules by priority, not behind a batch page); a third urgent waiter beyond the reserve waits;
    slots freed pay the reserve back before a batch waiter gets one, so the gate's total stays bounded."""

    async def scenario() -> list[str]:
        gate, urgent, order, take = _recording_gate(reserve=2)
        await gate.acquire()  # a batch page holds the one slot
        batch = asyncio.create_task(take("batch", 0))
        await asyncio.sleep(0)
        urgent["now"] = True
        jobs = [asyncio.create_task(take(f"job-{i}", 0.05)) for i in range(3)]
        await asyncio.sleep(0)
        urgent["now"] = False
        assert order == ["job-0", "job-1"], order  # two borrowed at once, the third waits
        gate.release()  # the batch page finishes: its slot goes to the third job, not to the batch waiter
        await asyncio.sleep(0)
        assert order == ["job-0", "job-1", "job-2"], order
        await asyncio.gather(*jobs, batch)
        assert not gate.locked() and gate.waiting == 0
        return order

    assert asyncio.run(scenario()) == ["job-0", "job-1", "job-2", "batch"]

    async def behind_a_queue() -> list[str]:
        """Batch waiters always queued: the reserve is paid back all the same, so the next job borrows again."""
        gate, urgent, order, take = _recording_gate(reserve=1)
        await gate.acquire()
        batch = [asyncio.create_task(take(f"batch-{i}", 0.2)) for i in range(3)]
        await asyncio.sleep(0)
        urgent["now"] = True
        await asyncio.create_task(take("job-0", 0))  # borrowed, done: the slot goes back to the reserve
        urgent["now"] = True
        second = asyncio.create_task(take("job-1", 0))
        await asyncio.sleep(0)
        urgent["now"] = False
        seen = list(order)
        gate.release()
        await asyncio.gather(second, *batch)
        return seen

    assert asyncio.run(behind_a_queue()) == ["job-0", "job-1"]


def test_an_urgent_waiter_goes_before_every_queued_one() -> None:
    """A gate full of batch work: the urgent waiter that comes last gets the next free slot; a cancelled
    waiter's turn is not lost."""

    async def scenario() -> list[str]:
        urgent = {"now": False}
        gate = PriorityGate(1, lambda: urgent["now"])
        order: list[str] = []

        async def take(name: str) -> None:
            async with gate:
                order.append(name)
                await asyncio.sleep(0.01)

        await gate.acquire()  # held: everyone below queues
        batch = [asyncio.create_task(take(f"batch-{i}")) for i in range(5)]
        await asyncio.sleep(0)
        doomed = asyncio.create_task(take("cancelled"))
        await asyncio.sleep(0)
        urgent["now"] = True
        job = asyncio.create_task(take("job"))
        await asyncio.sleep(0)
        urgent["now"] = False
        doomed.cancel()
        gate.release()
        await asyncio.gather(job, *batch, doomed, return_exceptions=True)
        assert not gate.locked() and gate.waiting == 0
        return order

    assert asyncio.run(scenario()) == ["job", *(f"batch-{i}" for i in range(5))]


def test_while_held_only_urgent_waiters_get_a_slot() -> None:
    """``hold()`` (an interactive item in progress): a batch waiter waits even for a free slot, a job's goes
    at once; on ``resume()`` the batch waiter gets its slot."""

    async def scenario() -> list[str]:
        held, urgent = {"on": True}, {"now": False}
        gate = PriorityGate(2, lambda: urgent["now"], hold=lambda: held["on"])
        order: list[str] = []

        async def take(name: str) -> None:
            async with gate:
                order.append(name)

        batch = asyncio.create_task(take("batch"))
        await asyncio.sleep(0.05)
        assert order == []
        urgent["now"] = True
        job = asyncio.create_task(take("job"))
        await asyncio.sleep(0)
        urgent["now"] = False
        await asyncio.wait_for(job, 5)
        held["on"] = False
        gate.resume()
        await asyncio.wait_for(batch, 5)
        return order

    assert asyncio.run(scenario()) == ["job", "batch"]


def test_no_batch_render_starts_while_an_interactive_item_runs(tmp_path: Path, render_pool: None) -> None:
    """The renderer holds batch renders back while an interactive item is in progress, and lets them go
    when it ends."""
    from olmocr.pipeline.pages.render import Renderer

    book = write_text_pdf(tmp_path / "book.pdf", ["Batch page one", "Batch page two"])

    async def scenario() -> None:
        renderer = Renderer(1)
        try:
            await renderer.render(str(book), "pdf", 1, 400)  # the worker is up
            with renderer.interactive():
                batch = asyncio.create_task(renderer.render(str(book), "pdf", 2, 400))
                await asyncio.sleep(1.5)
                assert not batch.done()
            await asyncio.wait_for(batch, 60)
        finally:
            renderer.close()

    asyncio.run(scenario())


def test_an_interactive_page_renders_before_queued_batch_renders(tmp_path: Path, render_pool: None) -> None:
    """One render process, 12 batch pages queued: a job's page (urgent) starts as soon as the process is
    free, not after the 12 (the pool's own queue is first come, first served)."""
    from olmocr.pipeline.pages.render import Renderer

    book = write_text_pdf(tmp_path / "book.pdf", [f"Batch page {i}" for i in range(12)])
    job = write_text_pdf(tmp_path / "job.pdf", ["The job's page"])

    async def scenario() -> tuple[list[str], int]:
        urgent = {"now": False}
        renderer = Renderer(1, urgent=lambda: urgent["now"])
        finished: list[str] = []
        before = 0
        try:
            await renderer.render(str(book), "pdf", 1, 400)  # the worker is up

            async def render(path: Path, page: int, name: str) -> None:
                await renderer.render(str(path), "pdf", page, 1288)
                finished.append(name)

            batch = [asyncio.create_task(render(book, p, f"batch-{p}")) for p in range(1, 13)]
            await asyncio.sleep(0.05)
            before = len(finished)
            urgent["now"] = True
            mine = asyncio.create_task(render(job, 1, "job"))
            await asyncio.sleep(0)
            urgent["now"] = False
            await asyncio.gather(mine, *batch)
        finally:
            renderer.close()
        return finished, before

    finished, before = asyncio.run(scenario())
    # Of the batch pages not finished when the job's page came, at most the one rendering and the one handed
    # to the pool after it go first.
    assert before < 8 and finished.index("job") - before <= 2, (before, finished)


# ---- the priority lane, many jobs at once -----------------------------------------------------------------


def test_submits_that_arrive_together_share_one_write_of_the_lane(tmp_path: Path) -> None:
    """20 submits while a lane write is in progress: the next round writes all 20 in one compare-and-swap;
    each submit's item is in the lane once and each submit is told it added one item."""
    storage = LocalStorage(str(tmp_path / "ws"))
    queue = ServiceQueue(storage)
    paths = [f"/uploads/{i:02d}.pdf" for i in range(20)]
    with queue._round:  # a round in progress
        with ThreadPoolExecutor(20) as pool:
            futures = [pool.submit(queue.populate, [p], 10**12, lambda p: 1, None, True) for p in paths]
            wait_for(lambda: len(queue._waiting) == 20, 30, "20 submits waiting")
            queue._round.release()
            try:
                added = [f.result(timeout=60) for f in futures]
            finally:
                queue._round.acquire()
    assert added == [1] * 20
    assert queue.lane_writes == 1
    lane = decode_index(storage.read(PRIORITY_INDEX_KEY) or b"")
    assert sorted(p for group in lane.values() for p in group) == paths


def test_a_completion_in_this_process_wakes_its_watchers(tmp_path: Path) -> None:
    """The queue the service shares with its workers calls the item's watchers when it completes it."""
    storage = LocalStorage(str(tmp_path / "ws"))
    queue = ServiceQueue(storage)
    queue.populate(["/uploads/a.pdf"], 10**12, lambda p: 1, priority=True)
    item = queue.claim(priority_only=True)
    assert isinstance(item, WorkItem)
    woken = threading.Event()
    other = queue.watch("0" * 40, lambda: None)
    queue.watch(item.hash, woken.set)
    queue.complete(item, b"", [])
    assert woken.is_set()
    other()  # unwatching is harmless
    assert storage.stat(done_key(item.hash)) is not None


def test_the_lane_worker_runs_many_jobs_at_once_each_exactly_once(tmp_path: Path) -> None:
    """12 converts at once against a server that takes 2 s a page, with one embedded batch worker: the lane
    worker claims them together and runs them side by side (one worker per job: about 12 s), and each job's
    item is claimed, worked and completed exactly once."""
    standin = launch_standin(tmp_path, env={"OLMOCR_STANDIN_LATENCY": "2"})
    docs = one_page_pdfs(tmp_path / "docs", 12)
    env = {"OLMOCR_SERVICE_MAX_JOBS_IN_FLIGHT": "100"}
    try:
        with running_service(tmp_path / "ws", standin, tmp_path / "service.log", "--workers", "1", env=env) as svc:
            wait_for(lambda: svc.get("/readyz").status_code == 200, 60, "the service ready")
            started = time.monotonic()
            with ThreadPoolExecutor(12) as pool:
                answers = list(pool.map(lambda d: svc.submit(d, path="/v1/convert?format=dolma&timeout=120"), docs))
            elapsed = time.monotonic() - started
            log = svc.output()
    finally:
        standin.stop()
    for doc, r in zip(docs, answers, strict=True):
        assert r.status_code == 200, f"{doc.name}: {r.status_code} {r.text}"
        (line,) = r.text.splitlines()
        assert json.loads(line)["metadata"]["Source-File"].endswith(f"-{doc.name}")
    records = [json.loads(p.read_text()) for p in (tmp_path / "ws" / "service" / "jobs").glob("*.json")]
    items = {r["item"] for r in records}
    assert len(items) == 12
    claimed = re.findall(r"claimed work item (\w+)", log)
    done = re.findall(r"work item (\w+) done", log)
    assert sorted(claimed) == sorted(items) and sorted(done) == sorted(items), (claimed, done)
    for item in items:
        results = (tmp_path / "ws" / "results" / f"output_{item}.jsonl").read_text().splitlines()
        assert len(results) == 1
    assert elapsed < 9, f"12 jobs took {elapsed:.1f}s: not run side by side"
    print(f"12 two-second jobs at once: {elapsed:.1f}s")


def test_the_in_flight_count_reads_jobs_only_at_the_limit(tmp_path: Path) -> None:
    """Fewer markers than the limit: counted from one listing (stale ones stay); at the limit each job is
    read and the markers of finished (here: unknown) jobs are removed, so the 429 counts live jobs only."""
    from olmocr.service.jobs import INFLIGHT, JobStore

    storage = LocalStorage(str(tmp_path / "ws"))
    store = JobStore(storage, ServiceQueue(storage))
    storage.write(f"{INFLIGHT}anonymous/{'1' * 24}", b"")
    assert len(store.in_flight("anonymous", 2)) == 1  # below the limit: not read, kept
    storage.write(f"{INFLIGHT}anonymous/{'2' * 24}", b"")
    assert store.in_flight("anonymous", 2) == []  # at the limit: read; neither job exists
    assert storage.list(f"{INFLIGHT}anonymous/") == []


def test_a_lane_round_appends_one_frame_and_leaves_the_lane_before_it_as_it_was(tmp_path: Path) -> None:
    """A submit's write of the lane costs its own lines, not the lane's: the bytes before it are kept as they
    were (one more zstd frame after them), and another process reads every item, the last one included."""
    storage = LocalStorage(str(tmp_path / "ws"))
    queue = ServiceQueue(storage)
    for i in range(200):
        queue.populate([f"/uploads/{i:03d}.pdf"], 10**12, lambda p: 1, priority=True)
    before = storage.read(PRIORITY_INDEX_KEY) or b""
    assert queue.populate(["/uploads/last.pdf"], 10**12, lambda p: 1, priority=True) == 1
    after = storage.read(PRIORITY_INDEX_KEY) or b""
    assert after.startswith(before) and len(after) - len(before) < 200, (len(before), len(after))
    lane = decode_index(after)
    assert len(lane) == 201 and ("/uploads/last.pdf",) in lane.values()
    other = ServiceQueue(storage)  # another replica: reads the lane from the workspace
    other.refresh_index()
    assert sorted(other.priority_index.hashes()) == sorted(lane)
    claimed = {item.paths for _ in range(201) if (item := other.claim(priority_only=True)) is not None}
    assert len(claimed) == 201 and ("/uploads/last.pdf",) in claimed


def test_the_lane_held_in_memory_stays_true_when_a_refresh_read_our_write_first(tmp_path: Path) -> None:
    """A claim's refresh may read the lane between our write and our note of it: the note then adds nothing
    (no line twice), and a note on top of another version reads the lane written."""
    from olmocr.pipeline.workspace.queue import IndexCache, append_lane, group_hash

    storage = LocalStorage(str(tmp_path / "ws"))
    writer = IndexCache(storage, PRIORITY_INDEX_KEY)
    append_lane(storage, {group_hash(["/a.pdf"]): ("/a.pdf",)}, writer)
    base = writer.tag
    new = group_hash(["/b.pdf"])
    append_lane(storage, {new: ("/b.pdf",)}, writer)
    data = storage.read(PRIORITY_INDEX_KEY) or b""
    frame_text = writer.text[writer.spans[new][0] - 1:]
    reader = IndexCache(storage, PRIORITY_INDEX_KEY)
    reader.refresh()  # read our write already
    assert base is not None
    reader.appended(base, data, frame_text)
    assert reader.text.count(new.encode()) == 1 and reader.paths(new) == ("/b.pdf",)
    stale = IndexCache(storage, PRIORITY_INDEX_KEY)  # holds neither version: reads the one written
    stale.appended(base, data, frame_text)
    assert sorted(stale.hashes()) == sorted(writer.hashes()) and stale.paths(new) == ("/b.pdf",)


def test_the_metrics_watchers_state_of_a_job_is_its_status_state_at_every_step(tmp_path: Path) -> None:
    """JobStore.state (three reads while a job is unfinished) answers as the whole status does: queued,
    running (leased), done; cancelled; and a record whose item is missing is queued again."""
    from olmocr.pipeline.workspace.queue import WorkQueue
    from olmocr.service.jobs import Document, JobStore, new_job_id

    storage = LocalStorage(str(tmp_path / "ws"))
    store = JobStore(storage, WorkQueue(storage))

    def submitted(name: str) -> dict:
        job_id = new_job_id()
        key = store.upload_key(job_id, 0, name)
        storage.write(key, b"%PDF-1.4")
        return store.submit(job_id, [Document(name, key, "pdf", 1)], "anonymous", "upload")

    def both(record: dict) -> str:
        state = store.state(record)
        assert state == store.status(record)["state"], record["id"]
        return state

    record = submitted("a.pdf")
    assert both(record) == "queued"
    item = store.queue.claim(priority_only=True)
    assert item is not None and item.hash == record["item"]
    assert both(record) == "running"
    store.queue.complete(item, b"", [{"source": item.paths[0], "reason": "broken", "retryable": False}])
    assert both(record) == "failed"
    other = submitted("b.pdf")
    store.cancel(other)
    assert both(other) == "cancelled"
    lost = submitted("c.pdf")
    storage.delete("work_index_priority.csv.zstd")  # as if the service died before queueing it
    fresh = JobStore(storage, WorkQueue(storage))
    assert fresh.state(lost) == "queued" and fresh.queue.has_item(lost["item"])
