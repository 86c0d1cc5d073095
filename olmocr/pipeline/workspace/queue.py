"""The workspace as a work queue shared by any number of pipeline processes on any number of machines.

Layout (upstream olmOCR 0.4.27's where compatible; see docs/workspace.md, "Queue design"):

* ``work_index_list.csv.zstd`` -- zstd-compressed CSV lines ``hash,path1,path2,...``; appended to with
  compare-and-swap so concurrent populators never lose items. A process reads it once, then only when its
  ETag changed (a conditional GET: one request, no body).
* ``work_index_priority.csv.zstd`` -- the priority lane (olmocr-service's jobs): same format, appended to
  the same way, read first by ``claim()`` with its own ETag. Upstream ignores it; its items are in no other
  index (see docs/workspace.md, "Priority lane").
* ``worker_locks/worker_<hash>.lock`` -- JSON lease ``{worker_id, lease_id, host, pid, lease_seconds, ...}``;
  taken with create-if-absent, renewed and taken over with compare-and-swap. A lease is live while the
  lock's age *by the store's clock* (``LastModified``) is under its ``lease_seconds``: no two machines'
  clocks are ever compared. A lock whose holder ran on this host and whose process is gone is free at once.
* ``results/output_<hash>.jsonl`` -- Dolma documents of the item, written first.
* ``failed/failed_<hash>.jsonl`` -- one JSON failure record per failed document, written second.
* ``done_flags/done_<hash>.flag`` -- written last: the item is done.

Claiming probes random candidate items (a HEAD of the done flag, a create of the lock) instead of listing
whole prefixes; the done flags are listed again only when probing found enough finished items to cost
more than a listing would.

Retryable failures (``"retryable": true``) of a done item ``H`` are re-queued by the next run as a new
item whose hash is ``sha1("retry:" + H + paths)`` -- deterministic, so concurrent runs add it once. A
stopped worker hands back the unfinished documents of its item the same way, at once (``complete_partial``).
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import logging
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import zstandard

from olmocr.pipeline.errors import LeaseLost
from olmocr.pipeline.workspace import index_stream
from olmocr.pipeline.workspace.index_stream import IndexAppender, Pending, csv_line, index_rows
from olmocr.pipeline.workspace.storage import NOT_MODIFIED, Storage, content_tag
from olmocr.pipeline.workspace.totals import (
    PAGES_KEY,
    PagesVersion,
    PageTotals,
    compute_totals,
    decode_pages_file,
    format_totals,
    load_pages,
    record_pages,
)

logger = logging.getLogger(__name__)

INDEX_KEY = "work_index_list.csv.zstd"
#: The priority lane: items claimed before any of the main index's (olmocr-service's jobs).
PRIORITY_INDEX_KEY = "work_index_priority.csv.zstd"
LOCKS_DIR = "worker_locks"
DONE_DIR = "done_flags"
RESULTS_DIR = "results"
FAILED_DIR = "failed"
CAS_ATTEMPTS = 100
#: ``counts()`` lists the done flags again when its last listing is older than this, per listing request.
DONE_CACHE_SECONDS = 30.0
#: A claim checks the index's ETag at most this often (new items of other populators show up this late).
INDEX_CHECK_SECONDS = 2.0
#: Ages from the store are whole seconds (``Date``, ``LastModified``): a lease is over only this much later.
AGE_RESOLUTION_S = 1.0
#: Probes that found a done item before the done flags are listed again: max(this, pages of a listing).
MIN_DONE_HITS = 3
#: How long upstream olmOCR 0.4.27's (empty, never renewed) lock holds its item for us: not at all (upstream
#: itself counts it stale after 30 min; a killed upstream would otherwise block its items that long).
UPSTREAM_LOCK_SECONDS = 0.0
#: The reason recorded for a document handed back unfinished by a stop (re-queued at once).
UNFINISHED_REASON = "not processed: its worker stopped before reaching it (queued again)"
#: Documents whose pages are counted to size every document of a big queue (as upstream).
SAMPLE_SIZE = 100
#: ``--stats`` reads this many results/failure files at once.
STATS_READERS = 32
#: ``page_totals`` reads the workspace again after this long (or when this queue finished an item) ...
TOTALS_MIN_SECONDS = 60.0
#: ... or this many seconds per request its listing of the done flags takes, if longer.
TOTALS_SECONDS_PER_LISTING_PAGE = 20.0


@dataclass(frozen=True)
class WorkItem:
    """A group of documents processed together; ``hash`` names its result file."""

    hash: str
    paths: tuple[str, ...]
    #: From the priority lane (an olmocr-service job): its pages are sent with the interactive priority.
    priority: bool = field(default=False, compare=False)
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
    return zstandard.ZstdCompressor().compress("\n".join(csv_line([h, *p]) for h, p in groups.items()).encode("utf-8"))


def _decompress(data: bytes) -> bytes:
    """The whole text of an index: every zstd frame (the priority lane grows by frames, :func:`append_lane`)."""
    if not data:
        return b""
    with zstandard.ZstdDecompressor().stream_reader(data, read_across_frames=True) as reader:
        return reader.read()


def decode_index(data: bytes) -> dict[str, tuple[str, ...]]:
    text = _decompress(data).decode("utf-8")
    groups: dict[str, tuple[str, ...]] = {}
    for row in csv.reader(line for line in text.splitlines() if line.strip()):
        if row:
            groups[row[0]] = tuple(row[1:])
    return groups


def load_index(storage: Storage) -> dict[str, tuple[str, ...]]:
    data = storage.read(INDEX_KEY)
    return decode_index(data) if data else {}


def _find_spans(text: bytes, pos: int, spans: dict[str, tuple[int, int]]) -> None:
    """Add where each item's line is in ``text`` from ``pos`` on."""
    size = len(text)
    while pos < size:
        end = text.find(b"\n", pos)
        if end < 0:
            end = size
        comma = text.find(b",", pos, end)
        item_hash = text[pos : comma if comma >= 0 else end].strip().strip(b'"').decode("utf-8", "replace")
        if item_hash:
            spans[item_hash] = (pos, end)
        pos = end + 1


class IndexCache:
    """The index as one process holds it: the decompressed text and, per item, where its line is.

    Read once, then re-read only when its ETag changed (a conditional GET). Paths are parsed only for the
    item claimed, so a million-document index costs its text (tens of MB), not a dict of tuples (~128 MB).
    """

    def __init__(self, storage: Storage, key: str = INDEX_KEY) -> None:
        self.storage = storage
        self.key = key
        self.tag: str | None = None
        self.text = b""
        self.spans: dict[str, tuple[int, int]] = {}
        self.checked_at = float("-inf")
        self._lock = threading.Lock()

    def refresh(self, max_age: float = 0.0) -> None:
        with self._lock:
            if time.monotonic() - self.checked_at < max_age:
                return
            found = self.storage.read_if_changed(self.key, self.tag)
            self.checked_at = time.monotonic()
            if found is NOT_MODIFIED:
                return
            if found is None:
                self.tag, self.text, self.spans = None, b"", {}
                return
            data, tag = found  # type: ignore[misc]
            self._load(data, tag)

    def seen(self, data: bytes) -> None:
        """We just wrote ``data`` as the index: hold it without reading it back."""
        with self._lock:
            self._load(data, content_tag(data))
            self.checked_at = time.monotonic()

    def _load(self, data: bytes, tag: str) -> None:
        text = _decompress(data)
        spans: dict[str, tuple[int, int]] = {}
        _find_spans(text, 0, spans)
        self.tag, self.text, self.spans = tag, text, spans

    def held(self, data: bytes, tag: str) -> None:
        """Hold ``data`` (read just now, version ``tag``), parsing it only if it is not what we hold."""
        with self._lock:
            if tag != self.tag:
                self._load(data, tag)
            self.checked_at = time.monotonic()

    def appended(self, base_tag: str, data: bytes, frame_text: bytes) -> None:
        """We just wrote ``data``: the version ``base_tag`` plus one frame of ``frame_text``. Holding that version
        still, only the new lines are parsed; a refresh may have read ``data`` meanwhile, or another version."""
        tag = content_tag(data)
        with self._lock:
            if self.tag == base_tag:
                start = len(self.text)
                self.text += frame_text
                _find_spans(self.text, start, self.spans)
                self.tag = tag
            elif self.tag != tag:
                self._load(data, tag)
            self.checked_at = time.monotonic()

    def paths(self, item_hash: str) -> tuple[str, ...]:
        start, end = self.spans[item_hash]
        row = next(csv.reader([self.text[start:end].decode("utf-8")]), [])
        return tuple(row[1:])

    def hashes(self) -> list[str]:
        return list(self.spans)


def append_index(
    storage: Storage, make_groups: Callable[[dict[str, tuple[str, ...]]], dict[str, tuple[str, ...]]],
    cache: IndexCache | None = None, key: str = INDEX_KEY,
) -> int:
    """Add ``make_groups(current_index)`` to the index ``key`` with compare-and-swap; returns how many were
    added."""
    for attempt in range(CAS_ATTEMPTS):
        found = storage.read_versioned(key)
        current = decode_index(found[0]) if found else {}
        new = {h: p for h, p in make_groups(current).items() if h not in current}
        if not new:
            return 0
        data = encode_index({**current, **new})
        del current
        if found is None:
            ok = storage.create(key, data)
        else:
            ok = storage.replace_if(key, data, found[1])
        if ok:
            if cache is not None:
                cache.seen(data)
            return len(new)
        _cas_backoff(attempt)
    raise RuntimeError(f"could not update {key} after {CAS_ATTEMPTS} attempts (heavy contention)")


def append_lane(storage: Storage, groups: dict[str, tuple[str, ...]], cache: IndexCache,
                key: str = PRIORITY_INDEX_KEY) -> set[str]:
    """Add the items ``groups`` not in the index ``key`` yet, as one more zstd frame after its last (the
    priority lane: a job at a time); returns the hashes added. Compare-and-swap as :func:`append_index`.

    :func:`append_index` decodes, merges and re-encodes the whole index: a job's submit cost grew with every job
    in the lane (12.8 % of olmocr-service's CPU at 500 jobs, py-spy, bench/service.py). Here the CPU is that of
    the new lines: the index is parsed only when another process changed it since ``cache`` last held it, and
    items are known by hash alone (a job's documents are its own uploads: never queued under another item).
    The bytes still grow with the lane until its compaction (olmocr/pipeline/workspace/lane_compaction.py)
    rewrites it as one frame; every reader reads across frames."""
    for attempt in range(CAS_ATTEMPTS):
        found = storage.read_versioned(key)
        if found is not None:
            cache.held(*found)
        known = cache.spans if found is not None else {}
        new = {h: p for h, p in groups.items() if h not in known}
        if not new:
            return set()
        lines = "\n".join(csv_line([h, *p]) for h, p in new.items()).encode("utf-8")
        if found is None:
            data = zstandard.ZstdCompressor().compress(lines)
            if storage.create(key, data):
                cache.seen(data)
                return set(new)
        else:
            frame_text = b"\n" + lines
            data = found[0] + zstandard.ZstdCompressor().compress(frame_text)
            if storage.replace_if(key, data, found[1]):
                cache.appended(found[1], data, frame_text)
                return set(new)
        _cas_backoff(attempt)
    raise RuntimeError(f"could not update {key} after {CAS_ATTEMPTS} attempts (heavy contention)")


def _cas_backoff(attempt: int) -> None:
    time.sleep(random.uniform(0.0, min(1.0, 0.01 * 2**attempt)))


def _batches(stream: Iterator[str], size: int) -> Iterator[list[str]]:
    while batch := list(itertools.islice(stream, size)):
        yield batch


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


def _new_groups(current: dict[str, tuple[str, ...]], wanted: list[str], pages_per_group: int,
                count: Callable[[str], int]) -> dict[str, tuple[str, ...]]:
    """The items for the ``wanted`` paths not in ``current``: groups of documents, an archive each."""
    from olmocr.pipeline.workspace.inputs import is_archive

    present = {p for ps in current.values() for p in ps}
    new_paths = [p for p in wanted if p not in present]
    del present
    archives = [(p,) for p in new_paths if is_archive(p)]
    docs = [p for p in new_paths if not is_archive(p)]
    return {group_hash(g): g for g in [*group_paths(docs, pages_per_group, count), *archives]}


def sampled_page_count(paths: list[str], count: Callable[[str], int] | None = None, size: int = SAMPLE_SIZE,
                       seed: int = 0, many: Callable[[list[str]], list[int]] | None = None) -> float:
    """Mean pages per document of a random sample of ``size`` paths (as upstream: it samples 100), counted by
    ``count`` one at a time or by ``many`` all together."""
    if not paths:
        return 1.0
    rng = random.Random(seed or len(paths))
    sample = rng.sample(paths, min(size, len(paths)))
    counts = [max(1, n or 1) for n in (many(sample) if many else [count(p) for p in sample])]  # type: ignore[misc]
    return sum(counts) / len(counts)


# ---- who holds a lease ------------------------------------------------------------------------------


def _read_text(path: str) -> str | None:
    try:
        with open(path) as fh:
            return fh.read().strip()
    except OSError:
        return None


def _pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


#: This machine as a lease names it: the host name, the boot, the pid namespace (containers sharing a host
#: name but not their processes never count as "this host").
HOST = socket.gethostname()
BOOT_ID = _read_text("/proc/sys/kernel/random/boot_id")
PID_NS = _pid_namespace()


def process_start_time(pid: int) -> float | None:
    """The start time of process ``pid`` (None if there is no such process)."""
    import psutil

    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return proc.create_time()
    except psutil.NoSuchProcess:
        return None
    except psutil.Error:
        return float("nan")  # exists, but we may not look: alive


def holder_is_dead(record: dict) -> bool:
    """True when the lock's holder ran on this machine (same host, boot and pid namespace) and its
    process is gone: no such pid, or a pid reused by a process started at another time."""
    if not record or record.get("host") != HOST or BOOT_ID is None or record.get("boot_id") != BOOT_ID:
        return False
    if record.get("pid_ns") != PID_NS:
        return False
    try:
        pid = int(record["pid"])
        started = float(record["pid_start"])
    except (KeyError, TypeError, ValueError):
        return False
    if pid == os.getpid():
        return False
    now_started = process_start_time(pid)
    if now_started is None:
        return True
    return now_started == now_started and abs(now_started - started) > 1.0  # (nan: cannot tell -> alive)


_OWN_START: float | None = None


def _own_start_time() -> float | None:
    global _OWN_START
    if _OWN_START is None:
        _OWN_START = process_start_time(os.getpid())
    return _OWN_START


def lease_length(record: dict, default: float) -> float:
    """How long the lease in ``record`` lasts after its last write."""
    try:
        return float(record["lease_seconds"])
    except (KeyError, TypeError, ValueError):
        pass
    try:
        return float(record["expires_at"]) - float(record.get("renewed_at", record["claimed_at"]))
    except (KeyError, TypeError, ValueError):
        pass
    # Upstream 0.4.27 writes an empty lock and never renews it: a live holder and a killed one look the same.
    # As before this change, such a lock does not hold its item against us (see docs/workspace.md).
    return UPSTREAM_LOCK_SECONDS if not record else default


class WorkQueue:
    """Claim/renew/complete work items stored in a workspace (see module docstring). Thread-safe.

    ``clock`` is this worker's wall clock: it only stamps records (``claimed_at``, failure ``time``) and the
    totals' rate. Whether a lease is live is judged by the lock's age in the store's clock.
    """

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
        self._lease_sent: dict[str, float] = {}  # item hash -> monotonic time our last lease write was sent
        self._done: set[str] = set()
        self._done_listed_at = float("-inf")
        self._done_hits = 0  # probes that found a done item since the last listing of the done flags
        self._probes = 0  # probes since the last listing
        self._listing_pages = 1  # requests one listing of the done flags took last time
        self._busy: dict[str, float] = {}  # item hash -> monotonic time its live lease may end
        self._requeued = False
        self.index = IndexCache(storage)
        self.priority_index = IndexCache(storage, PRIORITY_INDEX_KEY)
        self._exact_pages: dict[str, int] = {}  # exact counts learnt here, not yet in PAGES_KEY
        self._totals_cache: tuple[tuple[str | None, str | None], dict, set[str]] | None = None
        self._totals_last: tuple[float, int, PageTotals] | None = None  # (when, listing requests, totals)

    # ---- populating -------------------------------------------------------------------------------

    def populate(
        self, paths: Iterable[str], pages_per_group: int = 500, page_count: Callable[[str], int] | None = None,
        sample_count: Callable[[str], int] | None = None, priority: bool = False,
    ) -> int:
        """Add items for paths not already in the index; returns the number of new items.

        ``paths`` may be any iterable, consumed as it comes (a listing, a list file's lines) and never held
        whole: memory is about 50 bytes a path (see olmocr.pipeline.workspace.index_stream).

        ``priority``: into the priority lane (:data:`PRIORITY_INDEX_KEY`, claimed first; olmocr-service's
        jobs). Its cost does not grow with the workspace: a GET and a conditional PUT of the small priority
        index, nothing else (no re-queueing of retryable failures, no write of the page totals: the done flag
        carries the exact count). Without a ``page_count`` every document counts one page.

        ``page_count``: exact pages of each path. Without it (the pipeline) no document is read except a
        sample of :data:`SAMPLE_SIZE` (counted by ``sample_count``, default: open it), whose mean sizes every
        document; the items' totals are then marked estimated until workers count them. Archives (``.tar``, ``.tar.gz``, ``.tgz``) are an item each.
        Also re-queues the retryable failures of earlier runs (see :meth:`requeue_retryable`).
        """
        from olmocr.pipeline.workspace.inputs import is_archive

        if priority:
            return self._populate_priority(sorted(set(paths)), pages_per_group, page_count or (lambda p: 1))
        # Streamed (index_stream): the first WINDOW paths are read and the page-count sample is drawn from them;
        # their items are appended at once (workers may start), the rest at the end, or whenever the pending
        # lines reach PENDING_BYTES compressed. The index is not read first: the first append is a create,
        # and only if the index exists is it read (and what it has dropped from ours).
        stream = iter(paths)
        size = index_stream.WINDOW
        window = list(itertools.islice(stream, size))
        ended = len(window) < size
        window = sorted(set(window))
        estimated = page_count is None
        given = not estimated
        if page_count is None:
            from olmocr.pipeline.workspace.inputs import count_pages_many

            def count_many(sample: list[str]) -> list[int]:  # the default reads S3 documents 16 at a time
                return [sample_count(p) for p in sample] if sample_count else count_pages_many(sample)

            docs = [p for p in window if not is_archive(p)]
            if ended and len(docs) <= SAMPLE_SIZE:  # the sample would be all of them: count them, exactly
                exact = {p: 1 for p in window if is_archive(p)} | dict(zip(docs, count_many(docs), strict=True))
                page_count, estimated = (lambda path: exact.get(path, 0)), False  # 0: not ours, uncounted
            else:
                mean = sampled_page_count(docs, many=count_many)
                logger.info("work queue: %.1f pages per document on average in a sample of %d of the first %d "
                            "documents listed (the workspace total is an estimate until workers count them)",
                            mean, min(SAMPLE_SIZE, len(docs)), len(docs))
                page_count = lambda path: max(1, round(mean))  # noqa: E731
            del docs
        count = page_count

        def regroup(new_paths: list[str]) -> Iterator[tuple[str, tuple[str, ...], int]]:
            for group in _new_groups({}, new_paths, pages_per_group, count).values():  # new_paths: sorted
                yield group_hash(group), group, sum(max(1, count(p) or 1) for p in group)

        appender = IndexAppender(self.storage, INDEX_KEY, CAS_ATTEMPTS, _cas_backoff)
        added = 0
        pending = Pending()
        pages_file: PagesVersion | None = None
        requeued = 0
        if given:  # the caller's counts may be costly: count only what is not queued yet
            appender.read()
            requeued = self.requeue_retryable()

        def flush() -> None:
            nonlocal pending, pages_file, requeued, added
            first = not appender.seen
            new = appender.append(pending, regroup)
            pending = Pending()
            if first:
                if appender.created:
                    # A new workspace: no failure records to re-queue (the first claim looks, as it does
                    # without populate), no pages file either.
                    pages_file = PagesVersion(None)
                else:
                    requeued = self.requeue_retryable()
            if new:
                added += len(new)
                self._record_estimates(new, estimated, pages_file)

        for batch in itertools.chain([window], _batches(stream, size)):
            fresh = [p for p in (batch if batch is window else sorted(set(batch))) if appender.known.add(p)]
            batch.clear()  # the first window too: its 100,000 strings are not held to the end
            for h, group, pages in regroup(fresh):
                pending.add(h, group, pages)
            del fresh
            if (not appender.seen and pending.paths >= size) or \
                    pending.compressed_size >= index_stream.PENDING_BYTES:
                flush()
        if pending.pages or not appender.seen:
            flush()  # also with nothing to add: an existing index is read, its retries re-queued
        self.index.checked_at = float("-inf")  # the next claim reads it (never held here: its text is ~70 B a path)
        if not added:  # nothing new: fill in the counts of items queued without them (old workspaces)
            self._fill_missing_pages(appender.data, count, estimated)
        logger.info("work queue: %d new items (%d retry items)", added, requeued)
        return added + requeued

    def _record_estimates(self, pages: dict[str, int], estimated: bool, version: PagesVersion | None = None) -> None:
        try:
            record_pages(self.storage, pages, estimated=estimated, version=version)
        except Exception as exc:  # noqa: BLE001 - the totals are for display: never fail the queue for them
            logger.warning("could not store the page counts of the queued items (%s); progress will estimate "
                           "the total", exc)

    def _fill_missing_pages(self, data: bytes | None, count: Callable[[str], int], estimated: bool) -> None:
        """Page counts for the index's items missing from the pages file (queued by an older version or by
        upstream): counted with ``count``; when the counts are exact, only items all of whose paths it knows."""
        try:
            have = load_pages(self.storage)
            missing: dict[str, int] = {}
            for row in index_rows(data):
                if row[0] not in have:
                    counts = [count(p) for p in row[1:]]
                    if estimated or all(counts):
                        missing[row[0]] = sum(max(1, n or 1) for n in counts)
        except Exception as exc:  # noqa: BLE001
            logger.warning("could not read the page counts of the queued items (%s)", exc)
            return
        if missing:
            self._record_estimates(missing, estimated)

    def _populate_priority(self, wanted: list[str], pages_per_group: int, count: Callable[[str], int]) -> int:
        added = append_index(self.storage, lambda current: _new_groups(current, wanted, pages_per_group, count),
                             self.priority_index, PRIORITY_INDEX_KEY)
        logger.info("work queue: %d new priority items", added)
        return added

    def has_item(self, item_hash: str) -> bool:
        """Whether ``item_hash`` is queued (either lane): the cached indexes, each re-read only if changed
        (one conditional GET each, a 304 without a body when nothing changed)."""
        for cache in (self.priority_index, self.index):
            if item_hash in cache.spans:
                return True
        for cache in (self.priority_index, self.index):
            cache.refresh()
            if item_hash in cache.spans:
                return True
        return False

    def item_paths(self, item_hash: str) -> tuple[str, ...] | None:
        """The paths of a queued item (None if it is in neither lane)."""
        if not self.has_item(item_hash):
            return None
        cache = self.priority_index if item_hash in self.priority_index.spans else self.index
        return cache.paths(item_hash)

    def requeue_retryable(self) -> int:
        """Add a retry item for each done item's retryable failures not yet re-queued; returns how many.

        Reads the failure records of done items only (a HEAD of each one's done flag)."""
        self._requeued = True
        retry_groups: dict[str, tuple[str, ...]] = {}
        priority_groups: dict[str, tuple[str, ...]] = {}  # retries of priority items stay in their lane
        self.priority_index.refresh(INDEX_CHECK_SECONDS)
        for key in self.storage.iter_list(f"{FAILED_DIR}/"):
            original = _hash_from_key(key, "failed_", ".jsonl")
            if original is None:
                continue
            if original not in self._done and self.storage.stat(done_key(original)) is None:
                continue  # an item not yet done may still rewrite its failure records
            with self._lock:
                self._done.add(original)
            records = [r for r in _parse_jsonl(self.storage.read(key)) if r.get("retryable") and r.get("source")]
            # Documents a stop handed back were queued at once under this same hash (complete_partial); the
            # retryable failures form their own retry item.
            for unfinished in (True, False):
                sources = sorted({str(r["source"]) for r in records if bool(r.get("unfinished")) == unfinished})
                if sources:
                    lane = priority_groups if original in self.priority_index.spans else retry_groups
                    lane[retry_hash(original, sources)] = tuple(sources)
        added = 0
        if priority_groups:
            added += append_index(self.storage, lambda current: priority_groups, self.priority_index,
                                  PRIORITY_INDEX_KEY)
        if retry_groups:
            added += append_index(self.storage, lambda current: retry_groups, self.index)
        return added

    # ---- claiming ---------------------------------------------------------------------------------

    def _list_done(self) -> None:
        """List the done flags (one request per 1,000 flags) into the cache."""
        listed = 0
        found: set[str] = set()
        for key in self.storage.iter_list(f"{DONE_DIR}/"):
            listed += 1
            item_hash = _hash_from_key(key, "done_", ".flag")
            if item_hash:
                found.add(item_hash)
        with self._lock:
            self._done |= found
            self._done_listed_at = time.monotonic()
            self._done_hits = self._probes = 0
            self._listing_pages = listed // 1000 + 1

    def _done_hashes(self, refresh: bool = False) -> set[str]:
        """The done items known; listed again when the last listing is older than DONE_CACHE_SECONDS per
        request it took (a million documents: every 10 min; probes keep the set current in between)."""
        if refresh or time.monotonic() - self._done_listed_at > DONE_CACHE_SECONDS * self._listing_pages:
            self._list_done()
        with self._lock:
            return set(self._done)

    def _probed(self, item_hash: str, done: bool) -> None:
        """Count a probe; one that found ``item_hash`` done may trigger a listing of the done flags: when
        most probes lately found done items (a mostly finished workspace, where probing is the dearer way to
        learn) and they cost more requests than the listing, at most every DONE_CACHE_SECONDS per listing
        request. In a half-done workspace a probe finds a done item every other time, at one HEAD each:
        cheaper than listings, whose answers are ~200 KB per 1,000 keys."""
        with self._lock:
            self._probes += 1
            if not done:
                return
            self._done.add(item_hash)
            self._done_hits += 1
            # Before the first listing its size is unknown: at most one request per 1,000 items of the index.
            listed = self._done_listed_at > float("-inf")
            pages = self._listing_pages if listed else len(self.index.spans) // 1000 + 1
            relist = (self._done_hits > max(MIN_DONE_HITS, pages) and self._done_hits >= 0.8 * self._probes
                      and time.monotonic() - self._done_listed_at > DONE_CACHE_SECONDS * pages)
        if relist:
            self._list_done()

    def is_done(self, item_hash: str) -> bool:
        if self.storage.stat(done_key(item_hash)) is not None:
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
                "host": HOST,
                "boot_id": BOOT_ID,
                "pid_ns": PID_NS,
                "pid": os.getpid(),
                "pid_start": _own_start_time(),
                "lease_seconds": self.lease_seconds,
                "claimed_at": claimed_at if claimed_at is not None else now,
                "renewed_at": now,
                "expires_at": now + self.lease_seconds,  # informative only: this machine's clock
            }
        ).encode()

    def _try_lease(self, item_hash: str) -> str | None:
        """Take the lease on ``item_hash`` if it is free, over, or its holder died on this host; returns our
        lease id."""
        lease_id = uuid.uuid4().hex
        key = lock_key(item_hash)
        if self.storage.create(key, self._lease_record(lease_id)):
            return lease_id
        found = self.storage.read_aged(key)
        if found is None:  # released meanwhile
            return lease_id if self.storage.create(key, self._lease_record(lease_id)) else None
        data, tag, age = found
        records = _parse_jsonl(data)
        record = records[0] if records else {}
        length = lease_length(record, self.lease_seconds)
        if age <= length + AGE_RESOLUTION_S:
            if record.get("worker_id") == self.worker_id:
                return None  # another thread of this queue took it just now: ours, not someone else's to watch
            if not holder_is_dead(record):
                with self._lock:
                    self._busy[item_hash] = time.monotonic() + max(1.0, length + AGE_RESOLUTION_S - age)
                return None
            why = f"its holder (pid {record.get('pid')} on this host) is gone"
        else:
            why = f"it was last renewed {age:.0f}s ago (lease {length:.0f}s)"
        if self.storage.replace_if(key, self._lease_record(lease_id), tag):
            logger.info("work item %s: took over the lease: %s", item_hash, why)
            return lease_id
        return None

    def refresh_index(self) -> None:
        """Read the index now if it changed (one conditional GET), e.g. after another queue in this process
        added items: claims otherwise look at most every ``INDEX_CHECK_SECONDS``."""
        self.index.refresh()
        self.priority_index.refresh()

    def claim(self, priority_only: bool = False) -> WorkItem | None:
        """Atomically lease one not-done item whose lease is absent or over; None if nothing is claimable.
        Items of the priority lane first; ``priority_only``: only those.

        The first claim of a queue also re-queues earlier runs' retryable failures.
        """
        if not self._requeued:
            try:
                self.requeue_retryable()
            except Exception:
                logger.exception("could not re-queue retryable failures")
        self.index.refresh(INDEX_CHECK_SECONDS)
        self.priority_index.refresh(INDEX_CHECK_SECONDS)
        now = time.monotonic()
        with self._lock:
            skip = self._done | set(self._leases)
            self._busy = {h: t for h, t in self._busy.items() if t > now}
            busy = set(self._busy)
        # The priority lane first (interactive jobs), then the main index.
        lanes = (self.priority_index,) if priority_only else (self.priority_index, self.index)
        item = None
        for cache in lanes:
            pending = [h for h in cache.spans if h not in skip and h not in busy]
            random.shuffle(pending)  # spread concurrent workers over the queue
            item = self._take_one(pending, cache)
            if item is not None:
                return item
        if busy:
            # Items seen leased: one listing of the locks says which of those leases ended or were handed back.
            live = set(self._live_locks())
            freed = [h for h in busy if h not in live]
            with self._lock:
                for h in freed:
                    self._busy.pop(h, None)
            random.shuffle(freed)
            for cache in lanes:
                item = self._take_one([h for h in freed if h in cache.spans], cache)
                if item is not None:
                    return item
        return item

    def claim_item(self, item_hash: str) -> WorkItem | None:
        """Lease this one item as :meth:`claim` would (olmocr-service's cancel); None if it is not queued,
        done, or leased."""
        if not self.has_item(item_hash):
            return None
        return self._take_one([item_hash], self.priority_index if item_hash in self.priority_index.spans
                              else self.index)

    def _take_one(self, candidates: list[str], cache: IndexCache) -> WorkItem | None:
        for item_hash in candidates:
            with self._lock:
                if item_hash in self._done or item_hash in self._leases:
                    continue
            found = self.storage.stat(done_key(item_hash)) is not None
            self._probed(item_hash, found)
            if found:
                continue
            leased_at = time.monotonic()
            lease_id = self._try_lease(item_hash)
            if lease_id is None:
                continue
            item = WorkItem(hash=item_hash, paths=cache.paths(item_hash), leased_at=leased_at,
                            priority=cache is self.priority_index)
            with self._lock:
                self._leases[item_hash] = lease_id
                self._lease_sent[item_hash] = leased_at
            try:
                done = self.is_done(item_hash)
            except Exception:
                # Not knowing, we must not keep the lease: held here but never worked on, the item would be
                # skipped by every worker of this queue ("mine") until the process ends.
                try:
                    self.release(item)
                except Exception:  # noqa: BLE001 - forgotten locally; the lock expires by itself
                    self._forget(item_hash, lease_id)
                raise
            if done:  # completed between our probe and our lease
                self.release(item)
                continue
            return item
        return None

    def renew(self, item: WorkItem) -> None:
        """Extend our lease by ``lease_seconds`` (from the store's time of this write); raise LeaseLost if
        another worker took it."""
        with self._lock:
            lease_id = self._leases.get(item.hash)
        if lease_id is None:
            raise LeaseLost(f"work item {item.hash}: not leased by this worker")
        key = lock_key(item.hash)
        started = time.monotonic()  # the new LastModified is later than this: the lease runs from here
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
        with self._lock:
            if self._leases.get(item.hash) == lease_id:
                self._lease_sent[item.hash] = max(self._lease_sent.get(item.hash, 0.0), started)

    def _hold_for(self, item: WorkItem, seconds: float) -> bool:
        """Make sure our lease on ``item`` lasts ``seconds`` more, renewing it if it would not (LeaseLost if
        another worker has it). False if this queue never held it. No request while the lease is fresh:
        nobody may take a lease before it ends."""
        with self._lock:
            sent = self._lease_sent.get(item.hash) if item.hash in self._leases else None
        if sent is None:
            return False
        margin = min(5.0, self.lease_seconds / 10) + AGE_RESOLUTION_S
        if sent + self.lease_seconds - margin - time.monotonic() < seconds:
            self.renew(item)
        return True

    def holds(self, item: WorkItem) -> bool:
        """Whether this queue currently holds the lease (according to the stored lock)."""
        with self._lock:
            lease_id = self._leases.get(item.hash)
        if lease_id is None:
            return False
        records = _parse_jsonl(self.storage.read(lock_key(item.hash)))
        return bool(records) and records[0].get("lease_id") == lease_id

    def _forget(self, item_hash: str, lease_id: str) -> None:
        # Only that lease: a renewal abandoned by its caller may finish after the item was claimed again.
        with self._lock:
            if self._leases.get(item_hash) == lease_id:
                del self._leases[item_hash]
                self._lease_sent.pop(item_hash, None)

    # ---- finishing --------------------------------------------------------------------------------

    def complete(self, item: WorkItem, results: bytes, failed: list[dict]) -> None:
        """Write results, then failure records, then the done flag; drop the lease.

        ``failed`` entries: ``{"source": path, "reason": str, "retryable": bool}``; ``time`` and ``item`` are
        added. Retryable failures are re-queued by the next run; the others are final. The exact page count
        of the item's documents (from the results) goes into the done flag and, later, the totals.
        """
        # The lease must outlast the writes: a worker whose lease may have ended writes nothing (LeaseLost),
        # and the done flag, the commit point, is written only inside a lease checked again just before it.
        budget = self.lease_seconds / 3
        held = self._hold_for(item, budget)
        if not held:
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
        if held:
            self._hold_for(item, budget)
        pages = _result_pages(results) + sum(1 for r in failed if not r.get("unfinished"))
        done = {"time": self.clock(), "worker_id": self.worker_id, "documents_failed": len(failed), "pages": pages}
        self.storage.write(done_key(item.hash), json.dumps(done).encode())
        with self._lock:
            self._done.add(item.hash)
            self._exact_pages[item.hash] = pages
            lease_id = self._leases.pop(item.hash, None) if held else None
            self._lease_sent.pop(item.hash, None)
        if lease_id is not None:
            self.storage.delete(lock_key(item.hash))  # ours, checked above: no second read
        else:
            self.release(item)

    def complete_partial(self, item: WorkItem, results: bytes, failed: list[dict], unfinished: Iterable[str]) -> str | None:
        """A stop: keep what is finished, hand the rest back. The item is completed with its finished
        documents (``results``, ``failed``) plus one retryable ``unfinished`` record per path not processed,
        and those paths are queued at once as the item's retry item (the hash the next run's
        :meth:`requeue_retryable` would give them, so they are queued once). Every document is written once:
        in this item's results, or later in the retry item's. Returns the new item's hash (None: nothing
        left)."""
        rest = sorted(set(unfinished))
        records = [*failed, *({"source": p, "reason": UNFINISHED_REASON, "retryable": True, "unfinished": True}
                              for p in rest)]
        self.complete(item, results, records)
        if not rest:
            return None
        new_hash = retry_hash(item.hash, rest)
        if item.priority:  # handed back into its own lane
            append_index(self.storage, lambda current: {new_hash: tuple(rest)}, self.priority_index,
                         PRIORITY_INDEX_KEY)
        else:
            append_index(self.storage, lambda current: {new_hash: tuple(rest)}, self.index)
        logger.info("work item %s: %d documents kept, %d handed back as work item %s", item.hash,
                    len(item.paths) - len(rest), len(rest), new_hash)
        return new_hash

    def release(self, item: WorkItem) -> bool:
        """Give up the lease without completing; True if our lock was deleted (no-op if we do not hold it).

        The lease is forgotten locally first: if the storage fails here, the lock expires by itself."""
        with self._lock:
            lease_id = self._leases.pop(item.hash, None)
            self._lease_sent.pop(item.hash, None)
        if lease_id is None:
            return False
        key = lock_key(item.hash)
        records = _parse_jsonl(self.storage.read(key))
        if records and records[0].get("lease_id") == lease_id:
            self.storage.delete(key)
            return True
        return False

    def _live_locks(self) -> list[str]:
        """Hashes of the locks younger than our lease length (one listing of ``worker_locks/``, no reads)."""
        return [h for key, age in self.storage.list_ages(f"{LOCKS_DIR}/")
                if age <= self.lease_seconds + AGE_RESOLUTION_S and (h := _hash_from_key(key, "worker_", ".lock"))]

    def counts(self) -> dict:
        """``{"total", "done", "leased", "pending"}`` item counts (leased = live leases on not-done items).

        Costs a conditional GET of the index, a listing of the locks, and a listing of the done flags when the
        last one is older than :data:`DONE_CACHE_SECONDS`."""
        self.index.refresh()
        self.priority_index.refresh()
        spans = self._all_spans()
        done = {h for h in self._done_hashes() if h in spans}
        leased = sum(1 for h in set(self._live_locks()) if h in spans and h not in done)
        return {
            "total": len(spans),
            "done": len(done),
            "leased": leased,
            "pending": len(spans) - len(done) - leased,
        }

    def _all_spans(self) -> dict[str, tuple[int, int]]:
        """The items of both lanes (only the keys count)."""
        if not self.priority_index.spans:
            return self.index.spans
        return {**self.index.spans, **self.priority_index.spans}

    def lease_holders(self) -> list[tuple[str, float]]:
        """``(worker_id, expires_at)`` of every live lease on a not-done item held by another worker
        (``expires_at`` in this machine's clock, from the lock's age)."""
        self.index.refresh(INDEX_CHECK_SECONDS)
        self.priority_index.refresh(INDEX_CHECK_SECONDS)
        spans = self._all_spans()
        done = self._done_hashes()
        with self._lock:
            mine = set(self._leases)
        now = self.clock()
        held: list[tuple[str, float]] = []
        for item_hash in self._live_locks():
            if item_hash not in spans or item_hash in done or item_hash in mine:
                continue
            found = self.storage.read_aged(lock_key(item_hash))
            if found is None:
                continue
            records = _parse_jsonl(found[0])
            record = records[0] if records else {}
            left = lease_length(record, self.lease_seconds) - found[2]
            if left > 0:
                held.append((str(record.get("worker_id") or "?"), now + left))
        return held

    # ---- totals -----------------------------------------------------------------------------------

    def flush_page_counts(self) -> int:
        """Fold the exact page counts learnt by this queue into the workspace totals (compare-and-swap)."""
        with self._lock:
            pending, self._exact_pages = self._exact_pages, {}
        if not pending:
            return 0
        try:
            return record_pages(self.storage, pending)
        except Exception:
            with self._lock:
                self._exact_pages = {**pending, **self._exact_pages}
            raise

    def page_totals(self, clock: Callable[[], float] | None = None) -> PageTotals:
        """Pages queued, done and per second for the whole workspace (all pipelines); lists, never reads
        flags. Also stores the exact counts this queue learnt since the last call.

        The listing of the done flags costs one request per 1,000 items: the totals are read again at most
        every :data:`TOTALS_MIN_SECONDS`, or :data:`TOTALS_SECONDS_PER_LISTING_PAGE` per listing request in
        a big workspace (a million documents in 20,000 items: every 7 min), and in a small one (one listing
        request) also when this queue finished an item; the last ones are returned in between."""
        now = time.monotonic()
        last = self._totals_last
        with self._lock:
            finished_here = bool(self._exact_pages)
        try:
            self.flush_page_counts()
        except Exception as exc:  # noqa: BLE001 - display only; kept for the next call
            logger.debug("could not store exact page counts: %s", exc)
        if last is not None and now - last[0] < max(TOTALS_MIN_SECONDS, TOTALS_SECONDS_PER_LISTING_PAGE * last[1]):
            if not (finished_here and last[1] <= 1):  # a small workspace shows each item of ours at once
                return last[2]
        self.index.refresh(TOTALS_MIN_SECONDS)
        self.priority_index.refresh(TOTALS_MIN_SECONDS)
        pages_found = self.storage.read_if_changed(PAGES_KEY, self._totals_cache[0][1] if self._totals_cache else None)
        if pages_found is NOT_MODIFIED and self._totals_cache is not None:
            pages_tag = self._totals_cache[0][1]
            pages, estimated = self._totals_cache[1], self._totals_cache[2]
        elif pages_found is None or pages_found is NOT_MODIFIED:
            pages_tag, pages, estimated = None, {}, set()
        else:
            data, pages_tag = pages_found  # type: ignore[misc]
            pages, estimated = decode_pages_file(data)
        self._totals_cache = ((self.index.tag, pages_tag), pages, estimated)
        listed = self.storage.list_times(f"{DONE_DIR}/")
        done_times = {h: t for k, t in listed.items() if (h := _hash_from_key(k, "done_", ".flag"))}
        totals = compute_totals(self._all_spans(), pages, done_times, (clock or self.clock)(), estimated=estimated)
        self._totals_last = (now, len(listed) // 1000 + 1, totals)
        return totals


def _result_pages(results: bytes) -> int:
    """Pages of the Dolma documents in ``results`` (``metadata.pdf-total-pages``)."""
    total = 0
    for doc in _parse_jsonl(results):
        try:
            total += int((doc.get("metadata") or {}).get("pdf-total-pages") or 0)
        except (TypeError, ValueError):
            continue
    return total


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
    # One GET per results file: STATS_READERS at a time (a million documents in 20,000 items at 20 ms a
    # request: ~13 s instead of 400 s one after another).
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(max_workers=STATS_READERS, thread_name_prefix="olmocr-stats")

    def read_all(prefix: str) -> Iterable[bytes | None]:
        return pool.map(storage.read, (k for k in storage.iter_list(prefix) if k.endswith(".jsonl")))

    for data in read_all(f"{RESULTS_DIR}/"):
        for doc in _parse_jsonl(data):
            meta = doc.get("metadata") or {}
            documents += 1
            pages += int(meta.get("pdf-total-pages") or 0)
            fallback_pages += int(meta.get("total-fallback-pages") or 0)
            input_tokens += int(meta.get("total-input-tokens") or 0)
            output_tokens += int(meta.get("total-output-tokens") or 0)
            succeeded.add(str(meta.get("Source-File") or doc.get("source") or ""))
    latest: dict[str, dict] = {}
    for data in read_all(f"{FAILED_DIR}/"):
        for record in _parse_jsonl(data):
            source = str(record.get("source", ""))
            if source in succeeded or record.get("unfinished"):
                continue  # a later retry succeeded; handed back by a stop (queued again, not a failure)
            if source not in latest or float(record.get("time", 0)) >= float(latest[source].get("time", 0)):
                latest[source] = record
    failed = [
        {"source": s, "reason": str(r.get("reason", "")), "retryable": bool(r.get("retryable"))}
        for s, r in sorted(latest.items())
        if not r.get("filtered")
    ]
    # Skipped by --apply_filter: not failures (nothing went wrong), final.
    pool.shutdown()
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
