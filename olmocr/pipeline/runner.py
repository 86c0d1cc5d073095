"""Orchestration: populate the queue, check the server, run workers that claim items and write results."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from olmocr.exit_codes import STATUS_BUDGET, STATUS_OK
from olmocr.pipeline import defaults
from olmocr.pipeline.errors import LeaseLost, NoInput, ServerNotReady
from olmocr.pipeline.gates import PriorityGate, interactive_reserve
from olmocr.pipeline.job_cancel import watch as watch_cancel
from olmocr.pipeline.pages.documents import DocOutcome, DocumentProcessor, failure
from olmocr.pipeline.pages.output import dolma_jsonl, markdown_files
from olmocr.pipeline.pages.page import INTERACTIVE, MAX_TOKENS, PageProcessor, PageSettings, admission_priority
from olmocr.pipeline.pages.render import DEFAULT_RENDER_TIMEOUT_S, Renderer, default_render_processes
from olmocr.pipeline.progress import FailFast, Progress, refresh_totals, refresh_totals_forever, report_progress
from olmocr.pipeline.servers.balance import ServerState
from olmocr.pipeline.servers.checks import DEFAULT_READY_WAIT_S, STRUCTURED_OUTPUTS, start_up_delays
from olmocr.pipeline.servers.discovery import LookupFailed, default_resolver, refresh_interval, system_resolve
from olmocr.pipeline.servers.fleet import LOG_MOVED, Fleet
from olmocr.pipeline.servers.serverlist import DnsName, ServerSpec
from olmocr.pipeline.stats import SERVER_STATS_DIR, run_id, server_stats_record
from olmocr.pipeline.stopping import DEFAULT_STOP_TIMEOUT_S, StopRequest
from olmocr.pipeline.workspace import page_cache
from olmocr.pipeline.workspace.inputs import InputProblem, is_archive, iter_inputs, set_input_profile
from olmocr.pipeline.workspace.queue import (
    AGE_RESOLUTION_S,
    WorkItem,
    WorkQueue,
    describe_lease_holders,
    retry_hash,
)
from olmocr.pipeline.workspace.storage import Storage, open_storage

logger = logging.getLogger(__name__)

#: Pause after a work item failed as a whole (e.g. the workspace is unreachable) before claiming again.
ERROR_PAUSE_S = 5.0
#: An idle pipeline says who holds the items it waits for at most this often.
IDLE_LOG_EVERY_S = 30.0
#: Longest pause between claim attempts while the workspace keeps failing.
MAX_CLAIM_BACKOFF_S = 30.0
#: Log lines tests match (with tests.pipeline_helpers.log_line, not with a copy of the text).
LOG_CLAIMED = "worker %d claimed work item %s (%d documents)"
LOG_STOPPED = "stopped on request (%s): %d work items completed, %d handed back unfinished for other workers"
#: A lease given up while it is still ours (renewals failing, #29): the finished documents are kept.
LOG_GIVE_UP_KEEP = ("could not renew the lease on work item %s for %.0fs (%s); giving it up while it is still ours: "
                    "its finished documents are kept, the rest is queued again")


def keep_by(renewed_at: float, lease: float) -> float:
    """The last moment (monotonic) a worker whose renewals fail may give its item up and keep the finished
    documents: WorkQueue.complete writes only while a third of the lease is left (else it renews, which
    fails here), and the writes get a twelfth of the lease on top (25 s of the default 300 s lease)."""
    margin = min(5.0, lease / 10) + AGE_RESOLUTION_S  # WorkQueue._hold_for's margin
    return renewed_at + lease - lease / 3 - margin - lease / 12


#: --follow: priority-lane items (olmocr-service jobs) the lane worker runs side by side, at most.
LANE_ITEMS = 64
#: What a claim that failed (and paused) returns.
CLAIM_FAILED = object()


@dataclass(frozen=True)
class PipelineConfig:
    workspace: str
    servers: tuple[ServerSpec, ...]
    pdfs: tuple[str, ...] = ()
    dns: tuple[DnsName, ...] = ()  # dns+http://NAME:PORT servers (olmocr.pipeline.servers.discovery)
    workers: int = defaults.WORKERS
    pages_per_group: int = defaults.PAGES_PER_GROUP
    max_page_retries: int = defaults.MAX_PAGE_RETRIES
    max_page_error_rate: float = defaults.MAX_PAGE_ERROR_RATE
    max_concurrent_requests: int = defaults.MAX_CONCURRENT_REQUESTS
    target_longest_image_dim: int = defaults.LONGEST_IMAGE_DIM
    max_model_len: int = defaults.MAX_MODEL_LEN
    markdown: bool = False
    guided_decoding: bool = False
    request_timeout: float = defaults.REQUEST_TIMEOUT_S
    max_server_ready_timeout: float | None = None  # None: the default wait (checks.ready_delays)
    lease_seconds: float = defaults.LEASE_SECONDS
    progress_interval: float = defaults.PROGRESS_INTERVAL_S
    render_processes: int | None = None
    render_timeout: float | None = DEFAULT_RENDER_TIMEOUT_S
    stop_timeout: float = DEFAULT_STOP_TIMEOUT_S
    metrics_port: int | None = None  # --metrics_port: serve /metrics while running (olmocr.pipeline.metrics)
    metrics_host: str = defaults.METRICS_HOST
    metrics_token: str | None = field(default=None, repr=False)
    ca_bundle: str | None = None
    max_cost: float | None = None  # dollars (--max_cost): the run stops gracefully once it would be exceeded
    priority: int | None = None
    apply_filter: bool = False
    workspace_profile: str | None = None
    pdf_profile: str | None = None
    # ---- --follow (olmocr.service): keep running and take new items as they arrive
    follow: bool = False
    #: Set by whoever adds priority items in this process (olmocr-service): the lane worker claims at once
    #: instead of polling. The lane worker clears it before each claim round (a job added meanwhile is not lost).
    follow_wake: asyncio.Event | None = field(default=None, compare=False, repr=False)
    # ---- end --follow
    #: --wait_for_queue: seconds to wait for another process to fill an empty workspace's queue (0: do not wait)
    wait_for_queue: float = 0.0


def populate(queue: WorkQueue, specs: tuple[str, ...], pages_per_group: int) -> int:
    """Queue the documents ``specs`` name, streamed as they are listed; returns how many paths they named."""
    named = 0

    class Logged(list):  # each problem is logged as it is found: listing ten million paths takes a while
        def append(self, problem: InputProblem) -> None:
            if problem.path is None:
                logger.error("input %s: %s", problem.spec, problem.reason)
            else:
                logger.warning("input %s: %s (it will be recorded as a failed document)", problem.path,
                               problem.reason)

    def paths() -> Iterator[str]:
        nonlocal named
        for path in iter_inputs(specs, Logged()):
            named += 1
            yield path

    added = queue.populate(paths(), pages_per_group)
    logger.info("found %d documents; %d new work items added to the queue", named, added)
    return named


class Runner:
    """The running pipeline: shared renderer, server fleet, page slots and counters."""

    def __init__(self, config: PipelineConfig, storage: Storage, queue: WorkQueue, fleet: Fleet,
                 stop: StopRequest | None = None, max_tokens: int = MAX_TOKENS,
                 guided_field: str = STRUCTURED_OUTPUTS) -> None:
        self.config = config
        self.stop = stop or StopRequest()
        self.released = 0  # items handed back unfinished (graceful stop, errors)
        self.gave_up = 0  # items abandoned because their lease could not be renewed
        self.storage = storage
        self.queue = queue
        self.fleet = fleet
        self.progress = Progress(fail_fast=FailFast.from_env(), on_fail_fast=self._fail_fast)
        self.failing = asyncio.Event()  # set when nearly every early page failed the same way (FailFast)
        self.failure: str | None = None  # why the run failed (exit 1), one line
        # svc-perf (#32): an interactive item's renders and pages go before queued batch ones (gates.py)
        self.renderer = Renderer(config.render_processes, config.render_timeout, urgent=INTERACTIVE.get)
        self.stop.on_hard_exit(self.renderer.kill_now)
        settings = PageSettings(config.target_longest_image_dim, config.max_page_retries, config.max_model_len,
                                config.guided_decoding, priority=config.priority, max_tokens=max_tokens,
                                guided_field=guided_field)
        pages = PageProcessor(self.renderer, fleet, settings, self.progress)
        # Pages in flight: enough to keep every request slot busy plus a render lookahead.
        cap = config.max_concurrent_requests + 4 * self.renderer.processes
        page_slots = PriorityGate(cap, INTERACTIVE.get, reserve=interactive_reserve(cap))
        self.documents = DocumentProcessor(self.renderer, pages, page_slots, config.max_page_error_rate,
                                           config.apply_filter, storage=storage)
        self.active: set[str] = set()
        self.item_finished = asyncio.Event()

    def _fail_fast(self, reason: str) -> None:
        self.failure = reason
        self.failing.set()

    async def _process_doc(self, source: str) -> list[DocOutcome]:
        """One input's outcomes: one document, or each member of a tarball (queue-scale, #29)."""
        try:
            if is_archive(source):
                return await self.documents.process_archive(source)
            return [await self.documents.process(source)]
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - one bad document must not take the item down
            logger.exception("unexpected error on %s", source)
            return [failure(source, f"internal error: {type(exc).__name__}: {exc}", retryable=True)]

    async def _process_item(self, item: WorkItem, finished: dict[str, list[DocOutcome]] | None = None) -> None:
        pages = self.progress.open_item()  # its pages count in the progress as they are answered
        INTERACTIVE.set(item.priority)  # service2 (#32): this task's pages carry the interactive priority
        cancel = watch_cancel(self.storage, item.paths)  # svc-jobs (#32): a cancelled job's pages not started drop
        done = False
        try:
            with self.renderer.interactive() if item.priority else contextlib.nullcontext():  # svc-perf (#32)
                await self._do_item(item, {} if finished is None else finished)
            done = True
        finally:
            cancel.cancel()
            self.progress.close_item(pages, done=done)

    async def _do_item(self, item: WorkItem, finished: dict[str, list[DocOutcome]]) -> None:
        # --- queue-scale (#29): ``finished`` collects each document's outcome as it ends (kept on a stop) ---
        self.documents.cached.update(await asyncio.to_thread(page_cache.load, self.storage, item.hash))

        async def one(path: str) -> list[DocOutcome]:
            finished[path] = outcomes = await self._process_doc(path)
            return outcomes

        outcomes = [o for outs in await asyncio.gather(*(one(path) for path in item.paths)) for o in outs]
        for path in item.paths:
            self.documents.cached.pop(path, None)
        # --- end queue-scale ---
        docs = [o.doc for o in outcomes if o.doc is not None]
        failed = [o.failure for o in outcomes if o.failure is not None]
        if self.config.markdown:
            for key, data in markdown_files(docs):  # as python -m olmocr.pipeline.export writes them
                await asyncio.to_thread(self.storage.write, key, data)
        await asyncio.to_thread(self.queue.complete, item, dolma_jsonl(docs), failed)
        self.progress.docs_done += len(docs)
        skipped = sum(1 for f in failed if f.get("filtered"))
        self.progress.docs_filtered += skipped
        self.progress.docs_failed += len(failed) - skipped
        self.progress.docs_retryable += sum(1 for f in failed if f.get("retryable"))
        self.progress.items_done += 1
        logger.info("work item %s done: %d documents written, %d failed%s", item.hash, len(docs),
                    len(failed) - skipped, f", {skipped} skipped by the filter" if skipped else "")

    async def _renew_until_done(self, item: WorkItem, work: asyncio.Task[None]) -> bool:
        """Renew every third of the lease. A renewal that fails (storage errors, after the S3 client's own
        retries) is tried again sooner; if none succeeds in time, the item is given up: its work is cancelled.
        Given up while the lease still has time for the writes (:func:`keep_by`), it returns True: the
        caller keeps the finished documents and hands the rest back, as a stop does. Later (a renewal that
        hung, a short lease) it is given up before the lease would expire and nothing is kept, since
        another worker may own the item by then; nor after a lost lease (LeaseLost)."""
        lease = self.config.lease_seconds
        interval = max(1.0, lease / 3)
        retry_after = max(0.5, min(5.0, interval / 4))
        margin = min(5.0, lease / 10)  # clock skew between machines comparing expiry times
        renewed_at = item.leased_at or time.monotonic()
        next_at = renewed_at + interval
        while not work.done():
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            if work.done():
                return False
            started = time.monotonic()
            deadline, keep_until = renewed_at + lease - margin, keep_by(renewed_at, lease)
            until = keep_until if started < keep_until else deadline  # a hung renewal must not use up the time
            try:                                                      # left to keep the finished documents
                await asyncio.wait_for(asyncio.to_thread(self.queue.renew, item), max(0.1, until - started))
                renewed_at, next_at = started, started + interval
                continue
            except LeaseLost:
                logger.error("lost the lease on work item %s (another worker took it); abandoning it", item.hash)
                work.cancel()
                return False
            except Exception as exc:  # noqa: BLE001 - storage errors and timeouts: retry until the deadline
                problem = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            now = time.monotonic()
            if started < keep_until <= now + retry_after:  # the last chance to keep the finished documents (#29)
                logger.error(LOG_GIVE_UP_KEEP, item.hash, now - renewed_at, problem)
                self.gave_up += 1
                work.cancel()
                return True
            if now >= deadline:
                logger.error("could not renew the lease on work item %s for %.0fs (%s); giving it up before it "
                             "expires (its work is dropped and never marked done by this worker)", item.hash,
                             time.monotonic() - renewed_at, problem)
                self.gave_up += 1
                work.cancel()
                await asyncio.to_thread(self._release_quietly, item)
                return False
            logger.warning("could not renew the lease on %s (%s); retrying in %.1fs", item.hash, problem,
                           retry_after)
            next_at = time.monotonic() + retry_after

    async def _claim(self) -> WorkItem | None | bool:
        """A claimed item, None if nothing is claimable now, False if there is nothing left to do."""
        item = await asyncio.to_thread(self.queue.claim)
        if item is not None:
            return item
        counts = await asyncio.to_thread(self.queue.counts)
        others = counts.get("leased", 0) - len(self.active)
        if counts.get("pending", 0) <= 0 and others <= 0 and not self.config.follow:  # --follow: wait for more
            return False
        return None

    async def _pause(self, seconds: float, wake_on_item: bool = False, wake_on_new: bool = False) -> None:
        """Sleep ``seconds``, or less if a stop is requested (or, optionally, one of our items finishes, or
        ``follow_wake`` says priority items were added in this process: the lane worker)."""
        waits = [asyncio.ensure_future(self.stop.event.wait())]
        if wake_on_item:
            self.item_finished.clear()
            waits.append(asyncio.ensure_future(self.item_finished.wait()))
        if wake_on_new and self.config.follow_wake is not None:
            waits.append(asyncio.ensure_future(self.config.follow_wake.wait()))
        try:
            await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()

    def _idle_wait(self) -> float:
        return min(10.0, max(1.0, self.config.lease_seconds / 4))

    async def _claim_or_pause(self, worker_id: int, claim: Callable[[], Awaitable[Any]],
                              errors_in_a_row: int) -> tuple[Any, int]:
        """``(claim(), 0)``; or, when the workspace failed beyond the S3 client's retries, ``(CLAIM_FAILED,
        errors in a row)`` after saying so and pausing longer each time in a row."""
        try:
            return await claim(), 0
        except Exception as exc:  # noqa: BLE001 - retried after the pause
            errors_in_a_row += 1
            pause = min(MAX_CLAIM_BACKOFF_S, 2.0 ** errors_in_a_row)
            logger.warning("worker %d: cannot claim work (%s: %s); retrying in %.0fs", worker_id,
                           type(exc).__name__, exc, pause)
            await self._pause(pause)
            return CLAIM_FAILED, errors_in_a_row

    async def _worker(self, worker_id: int) -> None:
        errors_in_a_row = 0
        while not self.stop.requested:
            item, errors_in_a_row = await self._claim_or_pause(worker_id, self._claim, errors_in_a_row)
            if item is CLAIM_FAILED:
                continue
            if item is False:
                return
            if item is None:
                # Items leased by other (possibly dead) workers: wait until one of ours finishes, or poll again
                # (a dead worker's item becomes claimable when its lease expires).
                if not self.active:
                    await self._say_why_idle()
                await self._pause(self._idle_wait(), wake_on_item=True)
                continue
            assert isinstance(item, WorkItem)
            if self.stop.requested:  # the stop came while we were claiming: hand it straight back
                await asyncio.to_thread(self._release_quietly, item)
                return
            await self._run_own(worker_id, item)

    async def _run_own(self, worker_id: int, item: WorkItem, wake_workers: bool = True) -> None:
        self.active.add(item.hash)
        try:
            await self._run_item(worker_id, item)
        finally:
            self.active.discard(item.hash)
            if wake_workers:  # idle workers waiting for one of ours (not for the lane worker's jobs)
                self.item_finished.set()

    # --- svc-perf (#32): the lane worker claims every free priority item in one round ---
    async def _lane_worker(self, worker_id: int) -> None:
        """``--follow``: the priority lane's items (olmocr-service jobs, a page or a few each) are claimed as
        many at a time as are free, up to :data:`LANE_ITEMS` in progress, and run side by side. One item per
        worker left jobs queued behind busy workers (50 clients, 20 workers), and every idle worker raced for
        each new job."""
        running: set[asyncio.Task[None]] = set()
        errors_in_a_row = 0
        try:
            while not self.stop.requested:
                if len(running) >= LANE_ITEMS:
                    await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                    continue
                if self.config.follow_wake is not None:
                    self.config.follow_wake.clear()  # set again by a job added from now on
                items, errors_in_a_row = await self._claim_or_pause(
                    worker_id, lambda: asyncio.to_thread(self._claim_lane, LANE_ITEMS - len(running)), errors_in_a_row)
                if items is CLAIM_FAILED:
                    continue
                for item in items:
                    if self.stop.requested:  # the stop came while we were claiming: hand it straight back
                        await asyncio.to_thread(self._release_quietly, item)
                        continue
                    task = asyncio.create_task(self._run_own(worker_id, item, wake_workers=False))
                    running.add(task)
                    task.add_done_callback(running.discard)
                if not items:
                    await self._pause(self._idle_wait(), wake_on_new=True)
            if running:  # a graceful stop: they finish (or are cancelled below, and hand their work back)
                await asyncio.wait(running)
        finally:
            for task in running:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)

    def _claim_lane(self, limit: int) -> list[WorkItem]:
        """One claim round of the priority lane: up to ``limit`` items. The lane is read at most every
        INDEX_CHECK_SECONDS; the service's own submits are in its cache already (it shares this queue)."""
        items: list[WorkItem] = []
        while len(items) < limit and (item := self.queue.claim(priority_only=True)) is not None:
            items.append(item)
        return items
    # --- end svc-perf ---

    async def _say_why_idle(self) -> None:
        """With nothing of its own in progress, the pipeline says who holds the items it waits for (at most
        every IDLE_LOG_EVERY_S): "pages 0/0" alone does not tell a user why nothing happens."""
        now = time.monotonic()
        if now - getattr(self, "_idle_logged_at", float("-inf")) < IDLE_LOG_EVERY_S:
            return
        self._idle_logged_at = now
        try:
            held = await asyncio.to_thread(self.queue.lease_holders)
        except Exception as exc:  # noqa: BLE001 - only an explanation
            logger.debug("could not list lease holders: %s", exc)
            return
        if held:
            logger.info("%s", describe_lease_holders(held, self.queue.clock()))

    async def _run_item(self, worker_id: int, item: WorkItem) -> None:
        logger.info(LOG_CLAIMED, worker_id, item.hash, len(item.paths))
        finished: dict[str, list[DocOutcome]] = {}
        work = asyncio.create_task(self._process_item(item, finished))
        renewer = asyncio.create_task(self._renew_until_done(item, work))
        try:
            await asyncio.wait({work})
        except asyncio.CancelledError:
            # Stop: keep the finished documents, hand the rest back so another worker can take it at once. An
            # early stop (nearly every page failed the same way) keeps nothing: those outcomes are the broken
            # server's, and the whole item waits for the run after the fix.
            work.cancel()
            # svc-perf (#32): let the cancel reach every page first; a page answered meanwhile is then in its
            # document's partial pages (kept), not lost between the snapshot below and the cancel.
            await asyncio.wait({work}, timeout=5)
            if self.failing.is_set():
                await asyncio.to_thread(self._release_quietly, item)
            else:
                await asyncio.to_thread(self._hand_back, item, dict(finished))  # queue-scale (#29)
            raise
        finally:
            renewer.cancel()
        if work.cancelled():
            if renewer.done() and not renewer.cancelled() and renewer.result():  # given up in time (#29)
                await asyncio.to_thread(self._hand_back, item, dict(finished))
            return  # lease lost or given up; whoever owns it next does the rest
        exc = work.exception()
        if exc is not None:
            logger.error("work item %s failed (%s: %s); releasing it for a retry", item.hash,
                         type(exc).__name__, exc)
            await asyncio.to_thread(self._release_quietly, item)
            await self._pause(ERROR_PAUSE_S)

    # --- queue-scale (#29): a stop keeps the item's finished documents ---
    def _hand_back(self, item: WorkItem, finished: dict[str, list[DocOutcome]]) -> None:
        """Write the finished documents of ``item`` as its results and queue the rest as a new item
        (WorkQueue.complete_partial); with nothing finished, or without the lease, just release it."""
        try:
            in_flight = any(r is not None for p in item.paths for r in self.documents.partial.get(p) or [])
            if not (finished or in_flight) or not self.queue.holds(item):
                self._release_quietly(item)
                return
            outcomes = [o for outs in finished.values() for o in outs]
            docs = [o.doc for o in outcomes if o.doc is not None]
            failed = [o.failure for o in outcomes if o.failure is not None]
            unfinished = [p for p in item.paths if p not in finished]
            # The finished pages of documents in flight, for whoever does them next (before they are queued).
            partial, cached = self.documents.partial, self.documents.cached
            pages = {p: [r for r in partial[p] if r is not None] if p in partial else list(cached.get(p, {}).values())
                     for p in unfinished}
            kept = page_cache.save(self.storage, retry_hash(item.hash, unfinished), pages) if unfinished else 0
            if self.config.markdown:
                for key, data in markdown_files(docs):  # as python -m olmocr.pipeline.export writes them
                    self.storage.write(key, data)
            self.queue.complete_partial(item, dolma_jsonl(docs), failed, unfinished)
            if kept:
                logger.info("work item %s: %d finished pages of documents in flight kept", item.hash, kept)
            self.progress.docs_done += len(docs)
            self.released += 1
        except Exception as exc:  # noqa: BLE001 - the lease expires by itself; the item is then redone
            logger.warning("could not hand back the finished documents of work item %s: %s", item.hash, exc)
            self._release_quietly(item)
    # --- end queue-scale ---

    def _release_quietly(self, item: WorkItem) -> None:
        try:
            if self.queue.release(item):
                self.released += 1
        except Exception as exc:  # noqa: BLE001
            logger.warning("could not release work item %s: %s", item.hash, exc)

    async def run(self) -> int:
        """Run the workers until the queue is done or a stop; 1 when the run failed (:attr:`failure`), else 0."""
        exporter = None
        if self.config.metrics_port:
            from olmocr.pipeline.metrics import start_for_runner

            try:
                exporter = await start_for_runner(self)
            except BaseException:
                self.renderer.close()
                raise
        totals = asyncio.create_task(refresh_totals_forever(self.progress, self.queue.page_totals,
                                                            self.config.progress_interval))
        reporter = asyncio.create_task(report_progress(
            self.progress, lambda: (self._server_state(), self.fleet.in_flight), self.config.progress_interval,
            detail=self._server_detail))
        workers = [asyncio.create_task(self._worker(i)) for i in range(max(1, self.config.workers))]
        if self.config.follow:  # service2 (#32): one more worker, for the priority lane only (jobs never wait
            # for a batch item to finish); it runs many lane items at once (svc-perf)
            workers.append(asyncio.create_task(self._lane_worker(len(workers))))
        try:
            stop_wait = asyncio.create_task(self.stop.event.wait())
            fail_wait = asyncio.create_task(self.failing.wait())
            running = set(workers)
            while running and not stop_wait.done() and not fail_wait.done():
                # Only the workers still running: a finished one in the set would make every wait return at
                # once (a busy loop for the rest of the run).
                _, running = await asyncio.wait([*running, stop_wait, fail_wait],
                                                return_when=asyncio.FIRST_COMPLETED)
                running -= {stop_wait, fail_wait}
            stop_wait.cancel()
            fail_wait.cancel()
            # Doomed (FailFast): no graceful wait; the finally below hands every item in progress back at once.
            if self.stop.requested and not self.failing.is_set():
                await self._stop_gracefully(workers)
            for w in workers:
                if w.done() and not w.cancelled() and w.exception() is not None:
                    raise w.exception()  # type: ignore[misc]
        finally:
            for w in workers:
                w.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
            totals.cancel()
            await asyncio.gather(totals, return_exceptions=True)
            await refresh_totals(self.progress, self.queue.page_totals, timeout=10)  # final totals: bar, line
            reporter.cancel()
            await asyncio.gather(reporter, return_exceptions=True)  # the bar is closed before the summary
            self.renderer.close()
            if exporter is not None:
                await exporter.close()
            await self._record_server_stats()
        logger.info("%s", self.progress.line(self._server_state(), self.fleet.in_flight))
        logger.info("%s", self.progress.summary())
        if not self.fleet.single:
            for server in self.fleet.servers:
                logger.info("server %s: %s, %d ejections", server.url, server.describe(), server.ejections)
            logger.info(LOG_MOVED, self.fleet.moved)
        if self.stop.requested:
            logger.warning(LOG_STOPPED, self.stop.signal_name, self.progress.items_done, self.released)
        elif self.failure is None and self.progress.docs_done == 0 and self.progress.docs_retryable > 0:
            # Only failures a fix can change: a run given nothing but corrupt files did what it could.
            self.failure = (f"nothing written: all {self.progress.docs_failed} documents this run finished failed, "
                            f"{self.progress.docs_retryable} for a reason a rerun may fix (their reasons are in the "
                            "workspace's failed/ and in --stats); fix the cause and run again: those are retried")
        if self.failure is not None:
            logger.error("%s", self.failure)
            return 1
        return 0

    def _server_state(self) -> str:
        """For the progress line, short whatever the number of servers: the server's state, or ``7/8 up``."""
        return self.fleet.describe_state()

    def _server_detail(self) -> tuple[str, bool] | None:
        """Each server's counters, a line of its own after the progress line (None with one server), and
        whether it matters now (a server is not up: shown; else only in the --disk_logging file)."""
        if self.fleet.single:
            return None
        detail = "servers: " + "; ".join(f"{s.url}: {s.describe()}" for s in self.fleet.servers)
        return detail, any(s.state != ServerState.UP for s in self.fleet.servers)

    async def _record_server_stats(self) -> None:
        """Per-server counters of this run, kept in the workspace for ``--stats`` (best effort)."""
        try:
            await asyncio.to_thread(self.storage.write, f"{SERVER_STATS_DIR}/{run_id()}.json",
                                    server_stats_record(self.fleet))
        except Exception as exc:  # noqa: BLE001 - statistics must never fail a run
            logger.warning("could not record per-server statistics: %s", exc)

    async def _stop_gracefully(self, workers: list[asyncio.Task[None]]) -> None:
        busy = [w for w in workers if not w.done()]
        if busy and self.active:
            logger.warning("stop: waiting up to %gs for %d work items in progress", self.config.stop_timeout,
                           len(self.active))
        if busy:
            _, busy_set = await asyncio.wait(busy, timeout=self.config.stop_timeout)
            busy = list(busy_set)
        if busy:
            if self.active:
                logger.warning("stop: abandoning %d work items still in progress and releasing their leases",
                               len(self.active))
            for w in busy:
                w.cancel()
            await asyncio.gather(*busy, return_exceptions=True)


#: Internal mode: ``server(work, stop)`` starts the server ``config.servers`` names, runs ``work()``, and stops
#: the server afterwards; returns the exit status.
ServerProvider = Callable[[Callable[[], Awaitable[int]], StopRequest], Awaitable[int]]


async def run_pipeline(config: PipelineConfig, stop: StopRequest | None = None,
                       server: ServerProvider | None = None, queue: WorkQueue | None = None) -> int:
    """Run to completion (or until ``stop`` is requested: then exit 0); returns the process exit status.
    With ``server``, the server is started by it, only once there is work to do (internal mode). ``queue``:
    the workspace's queue, shared with the caller (olmocr-service: its submits are claimable at once, and
    it sees its jobs' items completed); by default one of its own."""
    stop = stop or StopRequest()
    # Storage calls (claims, lease renewals, result uploads) run in threads; give them enough that a slow
    # upload never delays a lease renewal.
    asyncio.get_running_loop().set_default_executor(
        ThreadPoolExecutor(max_workers=max(32, config.workers * 2 + 8), thread_name_prefix="olmocr-io")
    )
    set_input_profile(config.pdf_profile)
    if queue is None:
        queue = WorkQueue(open_storage(config.workspace, profile=config.workspace_profile),
                          lease_seconds=config.lease_seconds)
    storage = queue.storage
    found = None
    if config.pdfs:
        found = await asyncio.to_thread(populate, queue, config.pdfs, config.pages_per_group)
    else:
        await asyncio.to_thread(queue.requeue_retryable)
    counts = await asyncio.to_thread(queue.counts)
    if not config.pdfs and counts.get("total", 0) == 0 and config.wait_for_queue > 0:  # another process fills it
        from olmocr.pipeline.workspace.queue_wait import wait_for_queue

        if not await wait_for_queue(storage, config.workspace, config.wait_for_queue, stop):
            return STATUS_OK  # stopped while waiting: nothing was claimed
        counts = await asyncio.to_thread(queue.counts)
    if counts.get("pending", 0) == 0 and counts.get("leased", 0) == 0 and not config.follow:  # --follow: wait
        if found == 0:  # every --pdfs spec was a mistake: `pipeline && next-step` must not carry on
            raise NoInput(
                f"nothing to do: no document could be queued from --pdfs ({len(config.pdfs)} given; see the "
                f"errors above) and the workspace has no work left ({counts.get('done', 0)} of "
                f"{counts.get('total', 0)} work items done); check the paths, globs and credentials")
        if not config.pdfs and counts.get("total", 0) == 0:  # as `--stats` on a missing workspace answers
            raise NoInput(f"workspace {config.workspace}: no work items (nothing has been queued there yet); give "
                          "the documents with --pdfs PATH/GLOB/LIST.txt")
        logger.info("no work to do: %d of %d work items are done", counts.get("done", 0), counts.get("total", 0))
        return STATUS_OK
    logger.info("work items: %s", ", ".join(f"{n} {state}" for state, n in counts.items()))
    if server is not None:
        return await server(lambda: _run_on(config, storage, queue, stop), stop)
    return await _run_on(config, storage, queue, stop)


async def _unresolvable(urls: list[str]) -> list[str]:
    """The host names among ``urls`` the resolver says do not exist (a typo such as ``locahlost``). A resolver
    that cannot answer now is not definite: those are left to the start-up wait."""
    bad: list[str] = []
    for host in dict.fromkeys(urlsplit(url).hostname for url in urls):
        try:
            if host and not await system_resolve(host):
                bad.append(host)
        except LookupFailed:
            continue
    return bad


async def _wait_for_addresses(config: PipelineConfig, max_wait_s: float) -> None:
    """With only ``dns+`` servers: wait (the start-up schedule) until a name has an address. A headless
    Service has none until its first server pod is ready, i.e. has loaded its model."""
    if config.servers or not config.dns:
        return
    resolve = default_resolver()
    delays = start_up_delays(max_wait_s)
    for attempt in range(1, len(delays) + 2):
        for name in config.dns:
            try:
                if await resolve(name.host):
                    return
            except LookupFailed:
                pass
        if attempt > len(delays):
            return  # Fleet.start says which name has no address
        if attempt == 1:
            logger.warning("waiting for a vLLM server behind %s (no address yet: no server is ready, or they still "
                           "load their model); up to %d attempts over %.0fs (--max_server_ready_timeout to change it)",
                           ", ".join(n.label for n in config.dns), len(delays) + 1, sum(delays))
        await asyncio.sleep(delays[attempt - 1])


async def _start_fleet(fleet: Fleet, config: PipelineConfig, max_wait_s: float) -> None:
    """A host name that does not resolve is a definite answer (a typo): fail in seconds, not after the wait.
    Then verify the servers (:meth:`Fleet.start`)."""
    bad = await _unresolvable([s.url for s in config.servers])
    if bad:
        raise ServerNotReady(
            f"the vLLM server host name {', '.join(repr(h) for h in bad)} does not resolve: check --vllm-url "
            "(a name that appears only once its servers run, such as a Kubernetes headless Service, goes in as "
            "dns+http://NAME:PORT)")
    await _wait_for_addresses(config, max_wait_s)
    await fleet.start(max_wait_s=max_wait_s)


async def _run_on(config: PipelineConfig, storage: Storage, queue: WorkQueue, stop: StopRequest) -> int:
    fleet = Fleet(config.servers, request_timeout=config.request_timeout,
                  max_concurrent_requests=config.max_concurrent_requests, ca_bundle=config.ca_bundle,
                  priority=admission_priority(config.priority),  # service2 (#32): proves the interactive one too
                  render_lookahead=4 * (config.render_processes or default_render_processes()),
                  longest_dim=config.target_longest_image_dim, dns=config.dns,
                  dns_refresh_s=refresh_interval(os.environ), max_cost=config.max_cost)
    # providers (#31): no server with the right model, or the cost budget, stops the run gracefully
    fleet.on_fatal = fleet.on_budget = stop.request
    try:
        wait = DEFAULT_READY_WAIT_S if config.max_server_ready_timeout is None else config.max_server_ready_timeout
        ready = asyncio.create_task(_start_fleet(fleet, config, wait))
        stopped = asyncio.create_task(stop.event.wait())
        await asyncio.wait({ready, stopped}, return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        if not ready.done():
            ready.cancel()
            logger.warning("stopped on request (%s) before any work was claimed", stop.signal_name)
            return 0
        try:
            ready.result()
        except ServerNotReady as exc:
            logger.error("%s", exc)
            return 1
        max_tokens, guided_field = fleet.request_plan()
        if max_tokens < MAX_TOKENS:
            logger.warning("the smallest server max_model_len is %d: answers are capped at %d tokens (not %d)",
                           fleet.smallest_context(), max_tokens, MAX_TOKENS)
        if config.guided_decoding:
            logger.info("guided decoding: constraining the front matter with the %r request field (vLLM %s)",
                        guided_field, ", ".join(fleet.versions()) or "version unknown")
        status = await Runner(config, storage, queue, fleet, stop, max_tokens, guided_field).run()
        if fleet.fatal is not None:  # providers (#31)
            logger.error("%s", fleet.fatal)
            return 1
        if fleet.budget_reached:
            return STATUS_BUDGET
        return status
    finally:
        await fleet.close()
