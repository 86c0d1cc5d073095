"""Compaction of the priority lane (``work_index_priority.csv.zstd``, olmocr-service's jobs).

Every job appends one item to the lane, and every claim re-reads the lane when it changed, so a lane that
is never compacted costs every worker more with every job ever submitted. :class:`LaneCompactor` removes
the items that are done, with the queue's compare-and-swap write (a PUT ``If-Match`` the ETag read): an
append made meanwhile makes the write fail, and the pass is redone on the new lane. No append is lost.

Which items go: those whose done flag is older than ``grace_s`` (by the store's clock), except an item with
retryable failure records and the retry items that follow it (its ``failed/`` record names them): the
queue's ``requeue_retryable`` puts the retries of an item into the priority lane only while that item is in
it, and re-queues a retry item that is in no lane. A done item never becomes undone (the service's
retention keeps the done flags), so nothing removed is ever worked again.

Who and when: olmocr-service's periodic sweep (olmocr/service/sweep.py), every
``OLMOCR_SERVICE_SWEEP_INTERVAL``. Any number of replicas may run it at once: each write is conditional.
The lane is rewritten only when at least ``min_drop`` items, or half of it, can go, so the workers' copies
are not invalidated for one line.

Cost of a pass: one conditional GET of the lane (a 304 when unchanged); one HEAD of the done flag per item
not yet known done beyond its grace (the jobs queued or running, and those done within the grace), and,
once per item, a GET of its failure record (absent for almost every item); when it writes: a GET and a
conditional PUT of the lane, and the same of the page counts (``work_index_pages.json``), whose entries of
the removed items go too: every job's item gets one, and the file is read and rewritten whole at each
progress refresh. Items already judged are remembered by the process: no request for them.
"""

from __future__ import annotations

import json
import logging
import random
import time

from olmocr.pipeline.workspace.queue import (
    CAS_ATTEMPTS,
    PRIORITY_INDEX_KEY,
    WorkQueue,
    decode_index,
    done_key,
    encode_index,
    failed_key,
    retry_hash,
)
from olmocr.pipeline.workspace.totals import forget_pages

logger = logging.getLogger(__name__)

#: A done item stays in the lane this long (seconds, the store's clock) before it may be removed.
LANE_GRACE_S = 600.0
#: The lane is rewritten when at least this many items can go (or half of it).
MIN_DROP = 50


def remove_from_lane(queue: WorkQueue, drop: set[str]) -> int:
    """Remove the items ``drop`` from the priority lane by compare-and-swap; returns how many were removed.
    A concurrent write (an append) makes the conditional write fail: the lane is read again and the removal
    redone on it."""
    storage = queue.storage
    for attempt in range(CAS_ATTEMPTS):
        found = storage.read_versioned(PRIORITY_INDEX_KEY)
        if found is None:
            return 0
        current = decode_index(found[0])
        kept = {h: paths for h, paths in current.items() if h not in drop}
        removed = len(current) - len(kept)
        if removed == 0:
            return 0
        data = encode_index(kept)
        if storage.replace_if(PRIORITY_INDEX_KEY, data, found[1]):
            queue.priority_index.seen(data)
            return removed
        time.sleep(random.uniform(0.0, min(1.0, 0.01 * 2**attempt)))
    raise RuntimeError(f"could not compact {PRIORITY_INDEX_KEY} after {CAS_ATTEMPTS} attempts (heavy contention)")


def _retryable(data: bytes | None) -> list[dict]:
    """The retryable failure records of a ``failed/`` file."""
    out = []
    for line in (data or b"").decode("utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("retryable") and record.get("source"):
            out.append(record)
    return out


class LaneCompactor:
    """Removes the lane's done items (see the module docstring); call :meth:`compact` now and then."""

    def __init__(self, queue: WorkQueue, grace_s: float = LANE_GRACE_S, min_drop: int = MIN_DROP) -> None:
        self.queue = queue
        self.grace_s = grace_s
        self.min_drop = min_drop
        self._ready: set[str] = set()  # done for longer than the grace, no retryable failures
        self._kept: set[str] = set()  # done with retryable failures: they stay
        self._followers: set[str] = set()  # retry items of the kept ones: they stay too

    def _judge(self, item_hash: str) -> None:
        found = self.queue.storage.stat(done_key(item_hash))
        if found is None or found[1] < self.grace_s:
            return  # not done, or done too recently: looked at again next time
        records = _retryable(self.queue.storage.read(failed_key(item_hash)))
        if not records:
            self._ready.add(item_hash)
            return
        self._kept.add(item_hash)
        for unfinished in (True, False):  # the retry items requeue_retryable makes of them
            sources = sorted({str(r["source"]) for r in records if bool(r.get("unfinished")) == unfinished})
            if sources:
                self._followers.add(retry_hash(item_hash, sources))

    def compact(self) -> int:
        """One pass: judge the lane's items not judged yet; rewrite the lane when enough can go. Returns how
        many items were removed."""
        cache = self.queue.priority_index
        cache.refresh()
        lane = cache.hashes()
        for item_hash in lane:
            if item_hash not in self._ready and item_hash not in self._kept:
                self._judge(item_hash)
        present = set(lane)
        drop = (self._ready - self._followers) & present
        self._ready &= present  # forget what another replica removed already
        if not drop or (len(drop) < self.min_drop and 2 * len(drop) < len(lane)):
            return 0
        removed = remove_from_lane(self.queue, drop)
        if removed:
            forget_pages(self.queue.storage, drop)  # their page counts, recorded when they were done
            logger.info("priority lane: %d done items removed, %d left", removed, len(cache.spans))
        return removed
