"""The workspace as a work queue shared by any number of pipeline processes on any number of machines.

Layout (upstream olmOCR 0.4.27's where compatible; see docs/workspace.md):

* ``work_index_list.csv.zstd`` -- zstd-compressed CSV lines ``hash,path1,path2,...``; appended to with
  compare-and-swap so concurrent populators never lose items.
* ``worker_locks/worker_<hash>.lock`` -- JSON lease ``{worker_id, lease_id, claimed_at, expires_at, ...}``;
  taken with create-if-absent, renewed and taken over (once expired) with compare-and-swap.
* ``results/output_<hash>.jsonl`` -- Dolma documents of the item, written first.
* ``failed/failed_<hash>.jsonl`` -- one JSON failure record per failed document, written second.
* ``done_flags/done_<hash>.flag`` -- written last: the item is done.

Retryable failures (``"retryable": true``) of a done item ``H`` are re-queued by the next run as a new
item whose hash is ``sha1("retry:" + H + paths)`` -- deterministic, so concurrent runs add it once.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import zstandard

from olmocr.pipeline.errors import LeaseLost
from olmocr.pipeline.workspace.storage import Storage
from olmocr.pipeline.workspace.totals import (
    PAGES_KEY,
    PageTotals,
    compute_totals,
    decode_pages,
    format_totals,
    load_pages,
    record_pages,
)

logger = logging.getLogger(__name__)

INDEX_KEY = "work_index_list.csv.zstd"
LOCKS_DIR = "worker_locks"
DONE_DIR = "done_flags"
RESULTS_DIR = "results"
FAILED_DIR = "failed"
CAS_ATTEMPTS = 100
DONE_CACHE_SECONDS = 30.0


@dataclass(frozen=True)
class WorkItem:
    """A group of documents processed together; ``hash`` names its result file."""

    hash: str
    paths: tuple[str, ...]
    #: ``time.monotonic()`` just before the lease was written (0: unknown); the lease runs from here.
    leased_at: float = field(default=0.0, compare=False)


def group_hash(paths: Iterable[str]) -> str:
    """Upstream's work-group hash: SHA-1 of the sorted paths concatenated."""
    sha1 = hashlib.sha1()
    for path in sorted(paths):
        sha1.update(path.encode("utf-8"))
    return sha1.hexdigest()


def retry_hash(original: str, paths: Iterable[str]) -> str:
    """Hash of the retry item for ``original``'s retryable failures."""
    return hashlib.sha1(("retry:" + original + "\n" + "\n".join(sorted(paths))).encode("utf-8")).hexdigest()


def results_key(item_hash: str) -> str:
    return f"{RESULTS_DIR}/output_{item_hash}.jsonl"


def failed_key(item_hash: str) -> str:
    return f"{FAILED_DIR}/failed_{item_hash}.jsonl"


def done_key(item_hash: str) -> str:
    return f"{DONE_DIR}/done_{item_hash}.flag"


def lock_key(item_hash: str) -> str:
    return f"{LOCKS_DIR}/worker_{item_hash}.lock"


def _hash_from_key(key: str, prefix: str, suffix: str) -> str | None:
    name = key.rsplit("/", 1)[-1]
    if name.startswith(prefix) and name.endswith(suffix):
        return name[len(prefix) : -len(suffix)]
    return None


def encode_index(groups: dict[str, tuple[str, ...]]) -> bytes:
    out = io.StringIO()
    lines = []
    for item_hash, paths in groups.items():
        out.seek(0)
        out.truncate()
        csv.writer(out, quoting=csv.QUOTE_MINIMAL).writerow([item_hash, *paths])
        lines.append(out.getvalue().strip())
    return zstandard.ZstdCompressor().compress("\n".join(lines).encode("utf-8"))


def decode_index(data: bytes) -> dict[str, tuple[str, ...]]:
    text = zstandard.ZstdDecompressor().decompressobj().decompress(data).decode("utf-8")
    groups: dict[str, tuple[str, ...]] = {}
    for row in csv.reader(line for line in text.splitlines() if line.strip()):
        if row:
            groups[row[0]] = tuple(row[1:])
    return groups


def load_index(storage: Storage) -> dict[str, tuple[str, ...]]:
    data = storage.read(INDEX_KEY)
    return decode_index(data) if data else {}


def append_index(
    storage: Storage, make_groups: Callable[[dict[str, tuple[str, ...]]], dict[str, tuple[str, ...]]]
) -> int:
    """Add ``make_groups(current_index)`` to the index with compare-and-swap; returns how many were added."""
    for attempt in range(CAS_ATTEMPTS):
        found = storage.read_versioned(INDEX_KEY)
        current = decode_index(found[0]) if found else {}
        new = {h: p for h, p in make_groups(current).items() if h not in current}
        if not new:
            return 0
        data = encode_index({**current, **new})
        if found is None:
            ok = storage.create(INDEX_KEY, data)
        else:
            ok = storage.replace_if(INDEX_KEY, data, found[1])
        if ok:
            return len(new)
        time.sleep(random.uniform(0.0, min(1.0, 0.01 * 2**attempt)))
    raise RuntimeError(f"could not update {INDEX_KEY} after {CAS_ATTEMPTS} attempts (heavy contention)")


def _parse_jsonl(data: bytes | None) -> list[dict]:
    records = []
    for line in (data or b"").decode("utf-8", errors="replace").splitlines():
        if line.strip():
            try:
                value = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(value, dict):
                records.append(value)
    return records


def group_paths(
    paths: list[str], pages_per_group: int, page_count: Callable[[str], int]
) -> list[tuple[str, ...]]:
    """Consecutive groups of about ``pages_per_group`` pages (a big document makes a group of its own)."""
    groups: list[tuple[str, ...]] = []
    current: list[str] = []
    pages = 0
    for path in paths:
        n = max(1, page_count(path) or 1)
        if current and pages + n > pages_per_group:
            groups.append(tuple(current))
            current, pages = [], 0
        current.append(path)
        pages += n
    if current:
        groups.append(tuple(current))
    return groups


class WorkQueue:
    """Claim/renew/complete work items stored in a workspace (see module docstring). Thread-safe."""

    def __init__(
        self,
        storage: Storage,
        *,
        worker_id: str | None = None,
        lease_seconds: float = 300.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.storage = storage
        self.worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.lease_seconds = lease_seconds
        self.clock = clock
        self._lock = threading.Lock()
        self._leases: dict[str, str] = {}  # item hash -> lease_id we hold
        self._done: set[str] = set()
        self._done_listed_at = float("-inf")
        self._requeued = False
        self._totals_cache: tuple[tuple[str | None, str | None], dict, dict[str, int]] | None = None

    # ---- populating -------------------------------------------------------------------------------

    def populate(
        self, paths: list[str], pages_per_group: int = 500, page_count: Callable[[str], int] | None = None
    ) -> int:
        """Add items for paths not already in the index; returns the number of new items.

        Also re-queues the retryable failures of earlier runs (see :meth:`requeue_retryable`).
        """
        requeued = self.requeue_retryable()
        if page_count is None:
            from olmocr.pipeline.workspace.inputs import count_pages

            page_count = count_pages
        counts: dict[str, int] = {}

        def cached_count(path: str) -> int:
            if path not in counts:
                counts[path] = page_count(path)
            return counts[path]

        wanted = sorted(set(paths))

        def make_groups(current: dict[str, tuple[str, ...]]) -> dict[str, tuple[str, ...]]:
            present = {p for h, ps in current.items() for p in ps}
            new_paths = [p for p in wanted if p not in present]
            return {group_hash(g): g for g in group_paths(new_paths, pages_per_group, cached_count)}

        added = append_index(self.storage, make_groups)
        try:
            self._record_page_counts(wanted, cached_count)
        except Exception as exc:  # noqa: BLE001 - the totals are for display: never fail the queue for them
            logger.warning("could not store the page counts of the queued items (%s); progress will estimate "
                           "the total", exc)
        logger.info("work queue: %d new items (%d retry items)", added, requeued)
        return added + requeued

    def _record_page_counts(self, wanted: list[str], count: Callable[[str], int]) -> None:
        """Store the page count of every queued item made of ``wanted`` paths that has none yet (the
        workspace's total; see olmocr.pipeline.workspace.totals). Items another populator added are
        recorded by it; items of ours counted here were counted already, so this costs no extra reads
        except for workspaces queued before page counts were kept."""
        wanted_set = set(wanted)
        index = load_index(self.storage)
        have = load_pages(self.storage)
        missing = {h: paths for h, paths in index.items() if h not in have and paths and set(paths) <= wanted_set}
        if missing:
            record_pages(self.storage, {h: sum(max(1, count(p) or 1) for p in paths) for h, paths in missing.items()})

    def page_totals(self, clock: Callable[[], float] | None = None) -> PageTotals:
        """Pages queued, done and per second for the whole workspace (all pipelines); lists, never reads flags."""
        found, pages_found = self.storage.read_versioned(INDEX_KEY), self.storage.read_versioned(PAGES_KEY)
        tags = (found[1] if found else None, pages_found[1] if pages_found else None)
        if self._totals_cache is None or self._totals_cache[0] != tags:  # decode only what changed
            self._totals_cache = (tags, decode_index(found[0]) if found else {},
                                  decode_pages(pages_found[0]) if pages_found else {})
        _, index, pages = self._totals_cache
        done_times = {h: t for k, t in self.storage.list_times(f"{DONE_DIR}/").items()
                      if (h := _hash_from_key(k, "done_", ".flag"))}
        return compute_totals(index, pages, done_times, (clock or self.clock)())

    def requeue_retryable(self) -> int:
        """Add a retry item for each done item's retryable failures not yet re-queued; returns how many."""
        self._requeued = True
        done = self._done_hashes(refresh=True)
        retry_groups: dict[str, tuple[str, ...]] = {}
        for key in self.storage.list(f"{FAILED_DIR}/"):
            original = _hash_from_key(key, "failed_", ".jsonl")
            if original is None or original not in done:
                continue  # an item not yet done may still rewrite its failure records
            sources = sorted(
                {
                    str(r["source"])
                    for r in _parse_jsonl(self.storage.read(key))
                    if r.get("retryable") and r.get("source")
                }
            )
            if sources:
                retry_groups[retry_hash(original, sources)] = tuple(sources)
        if not retry_groups:
            return 0
        added = append_index(self.storage, lambda current: retry_groups)
        if added:
            from olmocr.pipeline.workspace.inputs import count_pages

            try:
                have = load_pages(self.storage)
                record_pages(self.storage, {h: sum(max(1, count_pages(p) or 1) for p in paths)
                                            for h, paths in retry_groups.items() if h not in have})
            except Exception as exc:  # noqa: BLE001 - as in populate: display only
                logger.warning("could not store the page counts of the retry items (%s)", exc)
        return added

    # ---- claiming ---------------------------------------------------------------------------------

    def _done_hashes(self, refresh: bool = False) -> set[str]:
        now = time.monotonic()
        if refresh or now - self._done_listed_at > DONE_CACHE_SECONDS:
            listed = {_hash_from_key(k, "done_", ".flag") for k in self.storage.list(f"{DONE_DIR}/")}
            with self._lock:
                self._done |= {h for h in listed if h}
                self._done_listed_at = now
        with self._lock:
            return set(self._done)

    def is_done(self, item_hash: str) -> bool:
        if self.storage.read(done_key(item_hash)) is not None:
            with self._lock:
                self._done.add(item_hash)
            return True
        return False

    def _lease_record(self, lease_id: str, claimed_at: float | None = None) -> bytes:
        now = self.clock()
        return json.dumps(
            {
                "worker_id": self.worker_id,
                "lease_id": lease_id,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "claimed_at": claimed_at if claimed_at is not None else now,
                "renewed_at": now,
                "expires_at": now + self.lease_seconds,
            }
        ).encode()

    def _try_lease(self, item_hash: str) -> str | None:
        """Take the lease on ``item_hash`` if it is free or expired; returns our lease id."""
        lease_id = uuid.uuid4().hex
        key = lock_key(item_hash)
        found = self.storage.read_versioned(key)
        if found is None:
            return lease_id if self.storage.create(key, self._lease_record(lease_id)) else None
        data, tag = found
        try:
            expires_at = float(json.loads(data)["expires_at"])
        except (ValueError, KeyError, TypeError):
            expires_at = float("-inf")  # unreadable lock: treat as expired
        if expires_at > self.clock():
            return None
        if self.storage.replace_if(key, self._lease_record(lease_id), tag):
            logger.info("work item %s: took over an expired lease", item_hash)
            return lease_id
        return None

    def claim(self) -> WorkItem | None:
        """Atomically lease one not-done item whose lease is absent or expired; None if nothing is claimable.

        The first claim of a queue also re-queues earlier runs' retryable failures.
        """
        if not self._requeued:
            try:
                self.requeue_retryable()
            except Exception:
                logger.exception("could not re-queue retryable failures")
        index = load_index(self.storage)
        done = self._done_hashes()
        with self._lock:
            mine = set(self._leases)
        pending = [h for h in index if h not in done and h not in mine]
        random.shuffle(pending)  # spread concurrent workers over the queue
        locked = {_hash_from_key(k, "worker_", ".lock") for k in self.storage.list(f"{LOCKS_DIR}/")}
        pending.sort(key=lambda h: h in locked)  # unlocked first, then maybe-expired
        for item_hash in pending:
            leased_at = time.monotonic()
            lease_id = self._try_lease(item_hash)
            if lease_id is None:
                continue
            with self._lock:
                self._leases[item_hash] = lease_id
            try:
                done = self.is_done(item_hash)
            except Exception:
                # Not knowing, we must not keep the lease: held here but never worked on, the item would be
                # skipped by every worker of this queue ("mine") until the process ends.
                try:
                    self.release(WorkItem(item_hash, index[item_hash]))
                except Exception:  # noqa: BLE001 - forgotten locally; the lock expires by itself
                    self._forget(item_hash, lease_id)
                raise
            if done:  # completed between our listing and our lease
                self.release(WorkItem(item_hash, index[item_hash]))
                continue
            return WorkItem(hash=item_hash, paths=index[item_hash], leased_at=leased_at)
        return None

    def renew(self, item: WorkItem) -> None:
        """Extend our lease by ``lease_seconds``; raise LeaseLost if another worker took it."""
        with self._lock:
            lease_id = self._leases.get(item.hash)
        if lease_id is None:
            raise LeaseLost(f"work item {item.hash}: not leased by this worker")
        key = lock_key(item.hash)
        found = self.storage.read_versioned(key)
        current = _parse_jsonl(found[0]) if found else []
        if not current or current[0].get("lease_id") != lease_id:
            self._forget(item.hash, lease_id)
            raise LeaseLost(
                f"work item {item.hash}: lease taken over by {current[0].get('worker_id') if current else 'nobody'}"
            )
        assert found is not None
        if not self.storage.replace_if(
            key, self._lease_record(lease_id, current[0].get("claimed_at")), found[1]
        ):
            self._forget(item.hash, lease_id)
            raise LeaseLost(f"work item {item.hash}: lease changed while renewing")

    def holds(self, item: WorkItem) -> bool:
        """Whether this queue currently holds the lease (according to the stored lock)."""
        with self._lock:
            lease_id = self._leases.get(item.hash)
        data = self.storage.read(lock_key(item.hash))
        records = _parse_jsonl(data)
        return lease_id is not None and bool(records) and records[0].get("lease_id") == lease_id

    def _forget(self, item_hash: str, lease_id: str) -> None:
        # Only that lease: a renewal abandoned by its caller may finish after the item was claimed again.
        with self._lock:
            if self._leases.get(item_hash) == lease_id:
                del self._leases[item_hash]

    # ---- finishing --------------------------------------------------------------------------------

    def complete(self, item: WorkItem, results: bytes, failed: list[dict]) -> None:
        """Write results, then failure records, then the done flag; drop the lease.

        ``failed`` entries: ``{"source": path, "reason": str, "retryable": bool}``; ``time`` and ``item`` are
        added. Retryable failures are re-queued by the next run; the others are final.
        """
        if not self.holds(item):
            logger.warning(
                "work item %s: completing without a live lease (it may be redone elsewhere)", item.hash
            )
        self.storage.write(results_key(item.hash), results)
        if failed:
            now = self.clock()
            lines = [
                json.dumps(
                    {"time": now, **record, "retryable": bool(record.get("retryable")), "item": item.hash}
                )
                for record in failed
            ]
            self.storage.write(failed_key(item.hash), ("\n".join(lines) + "\n").encode())
        else:
            self.storage.delete(failed_key(item.hash))  # stale records of an earlier, interrupted attempt
        done = {"time": self.clock(), "worker_id": self.worker_id, "documents_failed": len(failed)}
        self.storage.write(done_key(item.hash), json.dumps(done).encode())
        with self._lock:
            self._done.add(item.hash)
        self.release(item)

    def release(self, item: WorkItem) -> bool:
        """Give up the lease without completing; True if our lock was deleted (no-op if we do not hold it).

        The lease is forgotten locally first: if the storage fails here, the lock expires by itself."""
        with self._lock:
            lease_id = self._leases.pop(item.hash, None)
        if lease_id is None:
            return False
        key = lock_key(item.hash)
        records = _parse_jsonl(self.storage.read(key))
        if records and records[0].get("lease_id") == lease_id:
            self.storage.delete(key)
            return True
        return False

    def counts(self) -> dict:
        """``{"total", "done", "leased", "pending"}`` item counts (leased = live leases on not-done items)."""
        index = load_index(self.storage)
        done = self._done_hashes(refresh=True) & set(index)
        now = self.clock()
        leased = 0
        for key in self.storage.list(f"{LOCKS_DIR}/"):
            item_hash = _hash_from_key(key, "worker_", ".lock")
            if item_hash not in index or item_hash in done:
                continue
            records = _parse_jsonl(self.storage.read(key))
            if records and float(records[0].get("expires_at", 0)) > now:
                leased += 1
        return {
            "total": len(index),
            "done": len(done),
            "leased": leased,
            "pending": len(index) - len(done) - leased,
        }

    def lease_holders(self) -> list[tuple[str, float]]:
        """``(worker_id, expires_at)`` of every live lease on a not-done item held by another worker."""
        index = load_index(self.storage)
        done = self._done_hashes(refresh=True)
        with self._lock:
            mine = set(self._leases)
        now = self.clock()
        held: list[tuple[str, float]] = []
        for key in self.storage.list(f"{LOCKS_DIR}/"):
            item_hash = _hash_from_key(key, "worker_", ".lock")
            if item_hash not in index or item_hash in done or item_hash in mine:
                continue
            records = _parse_jsonl(self.storage.read(key))
            if records and float(records[0].get("expires_at", 0)) > now:
                held.append((str(records[0].get("worker_id") or "?"), float(records[0]["expires_at"])))
        return held


def describe_lease_holders(held: list[tuple[str, float]], now: float) -> str:
    """Why an idle worker waits, in one line: ``3 work items are leased by other pipelines (host-a pid 12: 2,
    the last lease expires in 4m10s; ...)`` (worker ids are ``host-pid-suffix``)."""
    per_worker: dict[str, list[float]] = {}
    for worker_id, expires_at in held:
        per_worker.setdefault(worker_id, []).append(expires_at)
    parts = []
    for worker_id, expiries in sorted(per_worker.items()):
        pieces = worker_id.rsplit("-", 2)
        who = f"{pieces[0]} pid {pieces[1]}" if len(pieces) == 3 and pieces[1].isdigit() else worker_id
        left = max(0, int(max(expiries) - now))
        parts.append(f"{who}: {len(expiries)}, lease{'s' if len(expiries) > 1 else ''} expiring within "
                     f"{left // 60}m{left % 60:02d}s")
    return (f"{len(held)} work item{'s are' if len(held) != 1 else ' is'} leased by other pipelines "
            f"({'; '.join(parts)}): waiting until they finish, or until a lease expires (a dead pipeline's "
            "item is then taken over)")


# ---- --stats ----------------------------------------------------------------------------------------


def workspace_stats(storage: Storage, clock: Callable[[], float] = time.time) -> dict:
    """Summarise a workspace for ``--stats``: items, documents, pages, fallback pages, failures and why."""
    queue = WorkQueue(storage, worker_id="stats", clock=clock)
    counts = queue.counts()
    index = load_index(storage)
    documents = pages = fallback_pages = input_tokens = output_tokens = 0
    succeeded: set[str] = set()
    for key in storage.list(f"{RESULTS_DIR}/"):
        if not key.endswith(".jsonl"):
            continue
        for doc in _parse_jsonl(storage.read(key)):
            meta = doc.get("metadata") or {}
            documents += 1
            pages += int(meta.get("pdf-total-pages") or 0)
            fallback_pages += int(meta.get("total-fallback-pages") or 0)
            input_tokens += int(meta.get("total-input-tokens") or 0)
            output_tokens += int(meta.get("total-output-tokens") or 0)
            succeeded.add(str(meta.get("Source-File") or doc.get("source") or ""))
    latest: dict[str, dict] = {}
    for key in storage.list(f"{FAILED_DIR}/"):
        for record in _parse_jsonl(storage.read(key)):
            source = str(record.get("source", ""))
            if source in succeeded:
                continue  # a later retry succeeded
            if source not in latest or float(record.get("time", 0)) >= float(latest[source].get("time", 0)):
                latest[source] = record
    failed = [
        {"source": s, "reason": str(r.get("reason", "")), "retryable": bool(r.get("retryable"))}
        for s, r in sorted(latest.items())
        if not r.get("filtered")
    ]
    # Skipped by --apply_filter: not failures (nothing went wrong), final.
    filtered = [{"source": s, "reason": str(r.get("reason", ""))} for s, r in sorted(latest.items()) if r.get("filtered")]
    queued_docs = len({p for paths in index.values() for p in paths})
    return {
        "workspace": storage.url,
        "items": counts,
        "page_totals": queue.page_totals().as_dict(),
        "queued_documents": queued_docs,
        "documents": documents,
        "pages": pages,
        "fallback_pages": fallback_pages,
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "failed_documents": failed,
        "filtered_documents": filtered,
    }


def format_stats(stats: dict, max_failures: int = 50) -> str:
    """Human-readable rendering of :func:`workspace_stats`."""
    items = stats["items"]
    pages = stats["pages"]
    fallback = stats["fallback_pages"]
    failed = stats["failed_documents"]
    retryable = sum(1 for f in failed if f["retryable"])
    share = f" ({100.0 * fallback / pages:.1f}%)" if pages else ""
    lines = [
        f"Workspace: {stats['workspace']}",
        f"Work items: {items['total']} total, {items['done']} done, {items['leased']} in progress, "
        f"{items['pending']} pending",
        f"Documents: {stats['queued_documents']} queued, {stats['documents']} with results, "
        f"{len(failed)} failed ({retryable} will be retried by the next run)"
        + (f", {len(stats.get('filtered_documents', []))} skipped by --apply_filter"
           if stats.get("filtered_documents") else ""),
        f"Pages: {pages} in results, {fallback} fallback pages{share}",
        *([f"Progress: {format_totals(PageTotals.from_dict(stats['page_totals']))}"] if "page_totals" in stats else []),
        f"Tokens: {stats['input_tokens']} input, {stats['output_tokens']} output",
    ]
    if failed:
        lines.append("Failed documents:")
        for f in failed[:max_failures]:
            tag = "retry next run" if f["retryable"] else "final"
            lines.append(f"  {f['source']}: {f['reason']} [{tag}]")
        if len(failed) > max_failures:
            lines.append(f"  ... and {len(failed) - max_failures} more")
    skipped = stats.get("filtered_documents") or []
    if skipped:
        lines.append("Skipped by --apply_filter:")
        for f in skipped[:max_failures]:
            lines.append(f"  {f['source']}: {f['reason']}")
        if len(skipped) > max_failures:
            lines.append(f"  ... and {len(skipped) - max_failures} more")
    return "\n".join(lines)
