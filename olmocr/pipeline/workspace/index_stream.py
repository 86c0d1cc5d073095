"""Queueing in bounded memory: the index is appended to in chunks, as the inputs are listed (issue 29).

``WorkQueue.populate`` reads its paths from a generator (an S3 listing, a local glob, a list file's lines)
and never holds all of them:

* :class:`PathSet` -- the paths already queued, as 8-byte hashes in 65,536 sorted buckets: about 9 bytes a
  path (plus 4 MB of empty buckets), against ~150 bytes for a ``set`` of the strings. Two different paths
  share a 64-bit hash with probability n^2 / 2^65 (3 in a million at 10 million paths); such a path would be
  taken for queued already. The hashes are Python's own string hash, salted per process: nothing stores them.
* :class:`Pending` -- the new items' index lines, held zstd-compressed (about 15 bytes a path with the
  bench's paths) until they are appended.
* :class:`IndexAppender` -- appends with the same compare-and-swap as before (a PUT with ``If-Match`` of the
  index's ETag, ``If-None-Match: *`` when there is none): on a conflict it reads the index again, rebuilds
  its :class:`PathSet` from it, drops from the pending lines the paths another populator queued meanwhile, and
  tries again. So concurrent populators never lose items and never queue a path twice. The index it writes
  is one zstd frame with its content size, as upstream reads it (``ZstdDecompressor().decompress``); neither
  the old nor the new index is ever decompressed whole: the old one is streamed into the new one.

Memory of queueing N new paths into an index of M: the hashes (~9 bytes a path of N + M), the index as
stored, twice while it is rewritten (~15 bytes a path each, at the bench's paths), and one window of
:data:`WINDOW` path strings: 495 MB at 10 million keys in bench/RESULTS.md (scale).
"""

from __future__ import annotations

import csv
import io
from array import array
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator

import zstandard

from olmocr.pipeline.workspace.storage import Storage, content_tag

#: Paths taken from the input before items are made of them: they are sorted together (so the same inputs
#: make the same items in every run), and the page-count sample is drawn from the first window.
WINDOW = 100_000
#: WorkQueue.populate appends the first window's items at once (workers may start), then the rest at the end,
#: or whenever the pending lines reach this many bytes compressed (~4 million paths).
PENDING_BYTES = 64 << 20
_BLOCK = 1 << 20
_BUCKET_SHIFT = 52  # 4,096 buckets (the 64-bit hash's top 12 bits)
_MASK = (1 << 64) - 1


class PathSet:
    """A set of paths stored as 64-bit hashes (see the module docstring); ~9 bytes a path."""

    def __init__(self) -> None:
        self._buckets = [array("Q") for _ in range(1 << (64 - _BUCKET_SHIFT))]
        self.size = 0

    def add(self, path: str) -> bool:
        """Add ``path``; False if it was there already."""
        h = hash(path) & _MASK
        bucket = self._buckets[h >> _BUCKET_SHIFT]
        i = bisect_left(bucket, h)
        if i < len(bucket) and bucket[i] == h:
            return False
        bucket.insert(i, h)
        self.size += 1
        return True

    def __contains__(self, path: object) -> bool:
        h = hash(path) & _MASK
        bucket = self._buckets[h >> _BUCKET_SHIFT]
        i = bisect_left(bucket, h)
        return i < len(bucket) and bucket[i] == h

    def __len__(self) -> int:
        return self.size


def index_rows(data: bytes | None) -> Iterator[list[str]]:
    """The rows ``[hash, path, ...]`` of a compressed index, streamed (its text is never held whole)."""
    if not data:
        return
    text = io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(data, read_across_frames=True),
                            encoding="utf-8", newline="")
    for row in csv.reader(text):
        if row and row[0].strip():
            yield row


def _text_blocks(data: bytes) -> Iterator[bytes]:
    reader = zstandard.ZstdDecompressor().stream_reader(data, read_across_frames=True)
    while block := reader.read(_BLOCK):
        yield block


def _text_size(data: bytes | None) -> int:
    if not data:
        return 0
    size = zstandard.frame_content_size(data)
    return size if size >= 0 else sum(len(b) for b in _text_blocks(data))


def csv_line(row: list[str]) -> str:
    out = io.StringIO()
    csv.writer(out, quoting=csv.QUOTE_MINIMAL).writerow(row)
    return out.getvalue().strip()


class Pending:
    """New index lines (``"\\n"``-joined, as upstream writes them), held compressed, with the page count of each
    new item (for ``work_index_pages.json``)."""

    def __init__(self) -> None:
        self._out = io.BytesIO()
        self._z = zstandard.ZstdCompressor().compressobj()
        self.text_size = 0
        self.paths = 0
        self.pages: dict[str, int] = {}
        self._data: bytes | None = None

    def add(self, item_hash: str, paths: tuple[str, ...], pages: int) -> None:
        line = ("\n" if self.pages else "") + csv_line([item_hash, *paths])
        raw = line.encode("utf-8")
        self._out.write(self._z.compress(raw))
        self.text_size += len(raw)
        self.paths += len(paths)
        self.pages[item_hash] = pages

    @property
    def compressed_size(self) -> int:
        return self._out.tell()

    def data(self) -> bytes:
        if self._data is None:
            self._out.write(self._z.flush())
            self._data = self._out.getvalue()
            self._out = io.BytesIO()
        return self._data


class IndexAppender:
    """Appends :class:`Pending` lines to the index ``key`` with compare-and-swap (see the module docstring)."""

    def __init__(self, storage: Storage, key: str, attempts: int, backoff: Callable[[int], None]) -> None:
        self.storage = storage
        self.key = key
        self.attempts = attempts
        self.backoff = backoff
        self.data: bytes | None = None
        self.tag: str | None = None
        self.known = PathSet()
        self.writes = 0
        self.created = False  # the index did not exist: our first write made it
        self.seen = False  # read or written at least once (before: believed absent)

    def read(self) -> None:
        """Read the index and hash its paths (streamed)."""
        self.seen = True
        found = self.storage.read_versioned(self.key)
        self.data, self.tag = found if found else (None, None)
        self.known = PathSet()
        for row in index_rows(self.data):
            for path in row[1:]:
                self.known.add(path)

    def append(self, pending: Pending, regroup: Callable[[list[str]], Iterable[tuple[str, tuple[str, ...], int]]]
               ) -> dict[str, int]:
        """Write the index plus ``pending``; returns the pages of the items added (their hashes)."""
        for attempt in range(self.attempts):
            if not pending.pages:
                if not self.seen:
                    self.read()
                return {}
            old_size = _text_size(self.data)
            total = old_size + (1 if old_size else 0) + pending.text_size
            z = zstandard.ZstdCompressor().compressobj(size=total)
            out = io.BytesIO()
            if self.data:
                for block in _text_blocks(self.data):
                    out.write(z.compress(block))
                out.write(z.compress(b"\n"))
            for block in _text_blocks(pending.data()):
                out.write(z.compress(block))
            out.write(z.flush())
            data = out.getvalue()
            del out
            ok = self.storage.create(self.key, data) if self.tag is None else self.storage.replace_if(
                self.key, data, self.tag)
            if ok:
                self.created = self.created or self.tag is None
                self.data, self.tag, self.seen = data, content_tag(data), True
                self.writes += 1
                return pending.pages
            del data
            self.backoff(attempt)
            self.read()  # another populator appended: what it queued is not queued again
            pending = self._refilter(pending, regroup)
        raise RuntimeError(f"could not update {self.key} after {self.attempts} attempts (heavy contention)")

    def _refilter(self, pending: Pending, regroup: Callable[[list[str]], Iterable[tuple[str, tuple[str, ...], int]]]
                  ) -> Pending:
        """``pending`` less the paths now in the index; an item that lost some is made again of the rest."""
        kept = Pending()
        for row in index_rows(pending.data()):
            item_hash, paths = row[0], row[1:]
            rest = [p for p in paths if p not in self.known]
            if len(rest) == len(paths):
                kept.add(item_hash, tuple(paths), pending.pages[item_hash])
            elif rest:
                for h, group, pages in regroup(sorted(rest)):
                    kept.add(h, group, pages)
            for p in rest:
                self.known.add(p)
        return kept
