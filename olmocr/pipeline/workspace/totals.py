"""The workspace's page totals: how many pages are queued, how many are done, how fast, and when it ends.

Queueing downloads no document: ``populate`` estimates pages per document from a sample (as upstream
does) and stores each new item's estimate in ``work_index_pages.json`` (``{"version": 1, "items":
{item_hash: pages}, "estimated": [item_hash, ...]}``), added to with compare-and-swap like the index
itself, so concurrent pipelines on local disk or ``s3://`` never lose an entry. A worker learns an item's
exact count when it opens the documents; it keeps it in the item's done flag and folds it into the file
(the hash leaves ``estimated``) on its next totals refresh. Items queued without a count (by upstream
olmOCR, retry items) are counted at the mean size of the known ones. Until every item is exact, the
totals say "estimated".

Done pages are the counts of the items whose done flag exists; the workspace's rate comes from the
done flags' modification times (one listing, no reads), so every pipeline and ``--stats`` see the same
rate whoever did the work. The rate is taken over the last :data:`RATE_WINDOW_S`; it is anchored at
the last item finished before the window (or the first in it, whose pages are then not counted), so
items that finish in bursts do not inflate it, and it decays when nothing finishes.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass

from olmocr.pipeline.workspace.storage import Storage, content_tag

PAGES_KEY = "work_index_pages.json"
RATE_WINDOW_S = 600.0
CAS_ATTEMPTS = 100


def load_pages(storage: Storage) -> dict[str, int]:
    data = storage.read(PAGES_KEY)
    return decode_pages(data) if data else {}


def load_pages_file(storage: Storage) -> tuple[dict[str, int], set[str]]:
    """``(pages per item, items whose count is an estimate)`` as stored (``--stats``)."""
    data = storage.read(PAGES_KEY)
    return decode_pages_file(data) if data else ({}, set())


def decode_pages(data: bytes) -> dict[str, int]:
    return decode_pages_file(data)[0]


def decode_pages_file(data: bytes) -> tuple[dict[str, int], set[str]]:
    """``(pages per item, items whose count is an estimate)``."""
    try:
        parsed = json.loads(data)
        items = parsed.get("items") or {}
        return {str(h): int(n) for h, n in items.items()}, {str(h) for h in parsed.get("estimated") or ()}
    except (ValueError, AttributeError, TypeError):
        return {}, set()  # damaged: the totals fall back to estimates, the queue itself is unaffected


def encode_pages_file(items: Mapping[str, int], guessed: set[str]) -> bytes:
    body: dict = {"version": 1, "items": dict(items)}
    if guessed:
        body["estimated"] = sorted(guessed)
    return json.dumps(body, separators=(",", ":")).encode()


def forget_pages(storage: Storage, hashes: set[str]) -> int:
    """Drop the page counts of ``hashes``, items gone from the queue's indexes (the priority lane's compaction:
    every job's item gets its count, so the file would otherwise grow with every job ever run, and it is read
    and rewritten whole at each progress refresh). Compare-and-swap; returns how many were dropped."""
    for attempt in range(CAS_ATTEMPTS):
        found = storage.read_versioned(PAGES_KEY)
        if found is None:
            return 0
        current, guessed = decode_pages_file(found[0])
        kept = {h: n for h, n in current.items() if h not in hashes}
        if len(kept) == len(current):
            return 0
        if storage.replace_if(PAGES_KEY, encode_pages_file(kept, guessed - hashes), found[1]):
            return len(current) - len(kept)
        time.sleep(random.uniform(0.0, min(1.0, 0.01 * 2**attempt)))
    raise RuntimeError(f"could not update {PAGES_KEY} after {CAS_ATTEMPTS} attempts (heavy contention)")


class PagesVersion:
    """What this process last wrote to (or believes of) the pages file: ``found`` is ``(data, tag)``, or None
    for absent. :func:`record_pages` then writes without reading first (a GET less); a wrong belief costs a
    failed conditional write and a read, as any lost race."""

    def __init__(self, found: tuple[bytes, str] | None = None) -> None:
        self.found = found


def record_pages(storage: Storage, pages: Mapping[str, int], estimated: bool = False,
                 version: PagesVersion | None = None) -> int:
    """Add page counts (compare-and-swap); returns how many entries changed.

    ``estimated=True``: counts from the queue's sample, added for items not yet in the file. Otherwise exact
    counts (from opening the documents): added, and replacing an item's estimate. ``version``: see
    :class:`PagesVersion` (updated after a write)."""
    for attempt in range(CAS_ATTEMPTS):
        if version is not None and attempt == 0:
            found = version.found
        else:
            found = storage.read_versioned(PAGES_KEY)
        current, guessed = decode_pages_file(found[0]) if found else ({}, set())
        if estimated:
            new = {h: int(n) for h, n in pages.items() if h not in current}
        else:
            new = {h: int(n) for h, n in pages.items() if h not in current or h in guessed}
        if not new:
            return 0
        guessed = guessed | set(new) if estimated else guessed - set(new)
        data = encode_pages_file({**current, **new}, guessed)
        ok = storage.create(PAGES_KEY, data) if found is None else storage.replace_if(PAGES_KEY, data, found[1])
        if ok:
            if version is not None:
                version.found = (data, content_tag(data))
            return len(new)
        time.sleep(random.uniform(0.0, min(1.0, 0.01 * 2**attempt)))
    raise RuntimeError(f"could not update {PAGES_KEY} after {CAS_ATTEMPTS} attempts (heavy contention)")


@dataclass(frozen=True)
class PageTotals:
    """The whole workspace, all pipelines together."""

    total: int
    done: int
    items: int
    items_done: int
    unknown_items: int = 0  # items queued without a page count (their pages are estimated)
    rate: float | None = None  # pages/s of the whole workspace over the last RATE_WINDOW_S
    estimated_items: int = 0  # items whose count comes from the queue's sample, not yet from the documents

    @property
    def estimated(self) -> bool:
        """True while any item's page count is a guess (sampled or unknown): the total is an estimate."""
        return bool(self.unknown_items or self.estimated_items)

    @property
    def counted_items(self) -> int:
        """Items whose page count was learnt from their documents (the rest are estimates)."""
        return max(0, self.items - self.unknown_items - self.estimated_items)

    @property
    def remaining(self) -> int:
        return max(0, self.total - self.done)

    @property
    def fraction(self) -> float:
        return self.done / self.total if self.total else 1.0

    @property
    def eta_seconds(self) -> float | None:
        """Seconds until every page is done at the current rate (0 when done, None when unknown)."""
        if self.remaining == 0:
            return 0.0
        if not self.rate:
            return None
        return self.remaining / self.rate

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> PageTotals:
        rate = data.get("pages_per_second")
        return cls(total=int(data["pages_total"]), done=int(data["pages_done"]),  # type: ignore[call-overload]
                   items=int(data["items"]), items_done=int(data["items_done"]),  # type: ignore[call-overload]
                   unknown_items=int(data.get("items_without_page_count") or 0),  # type: ignore[call-overload]
                   rate=None if rate is None else float(rate),  # type: ignore[arg-type]
                   estimated_items=int(data.get("items_with_estimated_page_count") or 0))  # type: ignore[call-overload]

    def as_dict(self) -> dict:
        return {"pages_total": self.total, "pages_done": self.done, "pages_remaining": self.remaining,
                "items": self.items, "items_done": self.items_done, "items_without_page_count": self.unknown_items,
                "pages_per_second": self.rate, "eta_seconds": self.eta_seconds,
                "items_with_estimated_page_count": self.estimated_items, "pages_total_estimated": self.estimated}


def compute_totals(index: Mapping[str, object], pages: Mapping[str, int], done_times: Mapping[str, float],
                   now: float, window: float = RATE_WINDOW_S, estimated: set[str] | frozenset[str] = frozenset()
                   ) -> PageTotals:
    """Totals of the items in ``index`` given their page counts and done times (pure)."""
    known = [pages[h] for h in index if h in pages]
    mean = sum(known) / len(known) if known else 1.0
    size = {h: float(pages[h]) if h in pages else mean for h in index}
    done = {h: t for h, t in done_times.items() if h in size}
    finished = sorted(done.items(), key=lambda item: item[1])
    recent = [(h, t) for h, t in finished if t >= now - window]
    earlier = [t for _, t in finished if t < now - window]
    rate: float | None = None
    if recent:
        if earlier:
            anchor, counted = earlier[-1], recent
        else:
            anchor, counted = recent[0][1], recent[1:]
        if counted and now > anchor:
            rate = sum(size[h] for h, _ in counted) / (now - anchor)
    elif finished:
        rate = 0.0  # nothing finished in the window: stalled (or only stragglers left)
    return PageTotals(total=round(sum(size.values())), done=round(sum(size[h] for h in done)), items=len(index),
                      items_done=len(done), unknown_items=len(index) - len(known), rate=rate,
                      estimated_items=sum(1 for h in estimated if h in size))


def format_duration(seconds: float | None) -> str:
    """``1h 02m``, ``3m 05s``, ``42s``; ``unknown`` for None."""
    if seconds is None:
        return "unknown"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours >= 48:
        return f"{hours // 24}d {hours % 24:02d}h"
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{secs}s"


def format_totals(totals: PageTotals) -> str:
    """``1,200/5,000 pages (24.0%), 3,800 remaining, workspace 6.2 pages/s, ETA 10m 13s``; while counts are
    guesses, the figures are marked (:func:`pages_text`): ``1,200/~5,000 pages (24.0%; estimated: 40 of 50
    items counted), ~3,800 remaining, ..., ETA ~10m 13s``."""
    rate = "rate unknown" if totals.rate is None else f"{totals.rate:.1f} pages/s"
    return f"{pages_text(totals)}, workspace {rate}, ETA {eta_text(totals)}"


# --- estimated until counted (#29): the progress line and --stats say which -------------------------------

#: Marks a figure that rests on estimated page counts (the total, what remains, the ETA).
APPROX_MARK = "~"
#: Why the figures are marked, and how far counting has come (items whose documents were opened).
ESTIMATED_NOTE = "estimated: {counted:,} of {items:,} items counted"


def approx(totals: PageTotals, text: str) -> str:
    """``text`` marked with :data:`APPROX_MARK` while the total is an estimate."""
    return f"{APPROX_MARK}{text}" if totals.estimated else text


def estimate_note(totals: PageTotals) -> str:
    """:data:`ESTIMATED_NOTE` while the total is an estimate, else empty (the total is exact)."""
    return ESTIMATED_NOTE.format(counted=totals.counted_items, items=totals.items) if totals.estimated else ""


def pages_text(totals: PageTotals) -> str:
    """``120/500 pages (24.0%), 380 remaining`` when exact; ``120/~500 pages (24.0%; estimated: 3 of 10 items
    counted), ~380 remaining`` while some items' counts come from the queue's sample or are unknown."""
    note = estimate_note(totals)
    return (f"{totals.done:,}/{approx(totals, f'{totals.total:,}')} pages ({100 * totals.fraction:.1f}%"
            f"{'; ' + note if note else ''}), {approx(totals, f'{totals.remaining:,}')} remaining")


def eta_text(totals: PageTotals) -> str:
    """The ETA, marked while it rests on estimated counts (``unknown`` and ``0s`` never are)."""
    eta = totals.eta_seconds
    text = format_duration(eta)
    return text if eta is None or totals.remaining == 0 else approx(totals, text)
