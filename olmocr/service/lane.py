"""The service's queue: one :class:`WorkQueue` for the routes and the embedded workers of one process.

Two things a plain queue does per call, this one does per process (measured in bench/service.py, 50
clients converting one-page documents):

* **Submits that arrive together share one write of the priority lane** (a group commit). Each submit
  appends its item to ``work_index_priority.csv.zstd`` with a compare-and-swap; 50 at once were 50 writers
  of one object, each losing one re-reading, re-encoding and sleeping (up to a second) before the next try,
  each holding one of the event loop's threads meanwhile: a submit took 0.33 s at the median and 3.6 s at
  p90. Here a submit waits for the round in progress, then the next round writes every submit that came
  meanwhile in one compare-and-swap. Other processes (replicas, pipelines) still append with their own
  compare-and-swap: nothing changes in the workspace.
* **A round appends one zstd frame to the lane** (``append_lane``): its CPU is that of the new lines, where
  decoding and re-encoding the whole lane grew with every job in it (12.8 % of the service's CPU at 500 jobs).
  An item is known by its hash: a job's documents are its own uploads, never queued under another item.
* **An item completed here wakes its waiters at once** (``POST /v1/convert``), instead of at their next
  poll of the done flag. Items completed by other processes are still found by polling.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from olmocr.pipeline.workspace.queue import (
    PRIORITY_INDEX_KEY,
    WorkItem,
    WorkQueue,
    _new_groups,  # the grouping the queue's own priority populate uses
    append_lane,
)

logger = logging.getLogger(__name__)


@dataclass
class _Submit:
    paths: list[str]
    pages_per_group: int
    count: Callable[[str], int]
    added: int = 0
    error: BaseException | None = None
    groups: dict[str, tuple[str, ...]] = field(default_factory=dict)


class ServiceQueue(WorkQueue):
    """A :class:`WorkQueue` whose priority populates are group-committed and whose completions are watched."""

    def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003 - WorkQueue's
        super().__init__(*args, **kwargs)
        self._round = threading.Lock()  # one lane write at a time in this process
        self._waiting_lock = threading.Lock()
        self._waiting: list[_Submit] = []
        self._watchers: dict[str, list[Callable[[], None]]] = {}
        self._watchers_lock = threading.Lock()
        self.lane_writes = 0  # compare-and-swap rounds of the lane made here (tests, the bench)

    def populate(self, paths: Iterable[str], pages_per_group: int = 500,
                 page_count: Callable[[str], int] | None = None,
                 sample_count: Callable[[str], int] | None = None, priority: bool = False) -> int:
        if not priority:
            return super().populate(paths, pages_per_group, page_count, sample_count)
        mine = _Submit(sorted(set(paths)), pages_per_group, page_count or (lambda p: 1))
        with self._waiting_lock:
            self._waiting.append(mine)
        with self._round:
            with self._waiting_lock:
                batch, self._waiting = self._waiting, []
            if batch:  # empty: an earlier round took ours
                self._commit(batch)
        if mine.error is not None:
            raise mine.error
        return mine.added

    def _commit(self, batch: list[_Submit]) -> None:
        merged: dict[str, tuple[str, ...]] = {}
        for submit in batch:
            submit.groups = _new_groups({}, submit.paths, submit.pages_per_group, submit.count)
            merged.update(submit.groups)
        try:
            added = append_lane(self.storage, merged, self.priority_index, PRIORITY_INDEX_KEY)
        except Exception as exc:  # noqa: BLE001 - every submit of the round gets the error
            for submit in batch:
                submit.error, submit.added = exc, 0
            return
        for submit in batch:
            submit.added = sum(1 for h in submit.groups if h in added)
        self.lane_writes += 1
        logger.debug("work queue: %d new priority items (%d submits in one write)", len(added), len(batch))

    # ---- completions --------------------------------------------------------------------------------

    def watch(self, item_hash: str, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback`` (from the completing thread) once ``item_hash`` is completed in this process;
        returns the function that stops watching."""
        with self._watchers_lock:
            self._watchers.setdefault(item_hash, []).append(callback)

        def unwatch() -> None:
            with self._watchers_lock:
                callbacks = self._watchers.get(item_hash, [])
                if callback in callbacks:
                    callbacks.remove(callback)
                if not callbacks:
                    self._watchers.pop(item_hash, None)

        return unwatch

    def complete(self, item: WorkItem, results: bytes, failed: list[dict]) -> None:
        super().complete(item, results, failed)
        with self._watchers_lock:
            callbacks = list(self._watchers.get(item.hash, ()))
        for callback in callbacks:
            callback()
