"""``--stats``: what a workspace says about its runs, in one place.

The queue counts its own items (:func:`olmocr.pipeline.workspace.queue.workspace_stats`, which reads the
queue's layout); the results say what was written (:func:`result_totals`: each document and its pages once,
whatever the retries, tokens summed from the documents, every fallback page with its reason); the pages'
progress counts a retry item's pages once (:func:`true_page_totals`); each run leaves its servers' counters
in ``server_stats/`` (:func:`server_stats_record`), summed here over all runs; :func:`print_stats` is the
command.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from olmocr.exit_codes import STATUS_BROKEN_PIPE, STATUS_OK
from olmocr.pipeline.pages.output import PAGE_RECORDS, source_of
from olmocr.pipeline.pages.page_retry import is_ticket
from olmocr.pipeline.workspace.storage import Storage
from olmocr.pipeline.workspace.totals import PageTotals

if TYPE_CHECKING:
    from olmocr.pipeline.servers.fleet import Fleet

SERVER_STATS_DIR = "server_stats"
#: What a run records of each server's model and usage (#31): the model name asked for, its /v1/models
#: entry (root: which weights; max_model_len), tokens, 429s, and cost where the server has prices. No key.
PROVIDER_FIELDS = ("model", "model_card", "input_tokens", "output_tokens", "throttled", "cost")


def run_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{int(time.time())}"


def server_stats_record(fleet: Fleet) -> bytes:
    """This run's per-server counters, stored in the workspace for ``--stats``."""
    return json.dumps({"time": time.time(), "servers": [
        {k: v for k, v in s.as_dict().items() if k in ("url", "pages", "errors", "timeouts", "rejected",
                                                          "ejections", "state", *PROVIDER_FIELDS)}
        for s in [*fleet.servers, *fleet.retired]]}).encode()


def summarize_server_stats(records: Iterable[bytes]) -> dict[str, dict[str, int]]:
    """Sum the runs' per-server counters by URL (pages, errors, timeouts, rejected, ejections)."""
    totals: dict[str, dict[str, int]] = {}
    for raw in records:
        try:
            record = json.loads(raw)
            servers = record["servers"]
        except (ValueError, KeyError, TypeError):
            continue
        for s in servers:
            row = totals.setdefault(str(s.get("url")), {"runs": 0, "pages": 0, "errors": 0, "timeouts": 0,
                                                        "rejected": 0, "ejections": 0})
            row["runs"] += 1
            for key in ("pages", "errors", "timeouts", "rejected", "ejections", "input_tokens", "output_tokens"):
                row[key] = row.get(key, 0) + int(s.get(key) or 0)
            if s.get("cost") is not None:
                row["cost"] = row.get("cost", 0) + float(s["cost"])
    return totals


def format_server_stats(totals: Mapping[str, Mapping[str, int]]) -> str:
    if not totals:
        return ""
    lines = ["Servers (all runs; answers: model attempts answered with 200, a page's failed attempts included):"]
    for url, row in sorted(totals.items()):
        lines.append(f"  {url}: {row['pages']} answers, {row['errors']} errors ({row['timeouts']} timeouts), "
                     f"{row['rejected']} rejected, taken out of rotation {row['ejections']} times, "
                     f"in {row['runs']} runs"
                     + (f", tokens {row['input_tokens']} in / {row['output_tokens']} out"
                        if row.get("input_tokens") or row.get("output_tokens") else "")
                     + (f", cost ${row['cost']:.4f} (${row['cost'] / row['pages'] * 1e6:,.0f} per million pages)"
                        if "cost" in row and row["pages"] else ""))
    return "\n".join(lines)


#: ``--stats`` lists this many fallback pages, then a count of the rest.
FALLBACK_PAGES_LISTED = 50


@dataclass(frozen=True)
class FallbackPage:
    source: str
    page: int | None  # None: an upstream document (it records how many pages fell back, not which)
    kind: str | None  # FallbackKind.code: model, refused, render, time_limit
    reason: str | None


@dataclass
class ResultTotals:
    """What the results hold: each document once (by its source path), whatever the retries."""

    documents: int = 0
    pages: int = 0
    input_tokens: int = 0  # the answers used (Dolma's total-input-tokens, as upstream)
    output_tokens: int = 0
    spent_input_tokens: int = 0  # every attempt, failed ones included (per-page records; else the above)
    spent_output_tokens: int = 0
    fallback: list[FallbackPage] = field(default_factory=list)

    def by_reason(self) -> dict[str, int]:
        return dict(Counter(f.kind or "unknown" for f in self.fallback))


def _int(value: object) -> int:
    try:
        return int(value or 0)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return 0


def _doc_totals(source: str, doc: dict) -> ResultTotals:
    meta = doc.get("metadata") or {}
    out = ResultTotals(documents=1, pages=_int(meta.get("pdf-total-pages")),
                       input_tokens=_int(meta.get("total-input-tokens")),
                       output_tokens=_int(meta.get("total-output-tokens")))
    records = (doc.get("attributes") or {}).get(PAGE_RECORDS)
    if isinstance(records, list) and all(isinstance(r, dict) for r in records):
        out.spent_input_tokens = sum(_int(r.get("input_tokens")) for r in records)
        out.spent_output_tokens = sum(_int(r.get("output_tokens")) for r in records)
        out.fallback = [FallbackPage(source, _int(r.get("page")), r.get("fallback_kind"), r.get("fallback_reason"))
                        for r in records if r.get("produced_by") == "fallback"]
    else:  # upstream's: how many pages fell back, not which; its tokens are the answers used
        out.spent_input_tokens, out.spent_output_tokens = out.input_tokens, out.output_tokens
        out.fallback = [FallbackPage(source, None, None, None)] * _int(meta.get("total-fallback-pages"))
    return out


def result_totals(docs: Iterable[dict]) -> ResultTotals:
    """Totals of Dolma documents (ours or upstream's); a source seen twice counts once (its last document).
    Only each document's totals are kept while reading, never the documents."""
    per_source: dict[str, ResultTotals] = {}
    for doc in docs:
        source = source_of(doc)
        per_source[source] = _doc_totals(source, doc)
    out = ResultTotals()
    for _, one in sorted(per_source.items()):
        out.documents += one.documents
        out.pages += one.pages
        out.input_tokens += one.input_tokens
        out.output_tokens += one.output_tokens
        out.spent_input_tokens += one.spent_input_tokens
        out.spent_output_tokens += one.spent_output_tokens
        out.fallback += one.fallback
    return out


def read_results(storage: Storage) -> Iterator[dict]:
    """Every document of ``results/``, one file at a time."""
    from olmocr.pipeline.export import parse_results

    for key in storage.list("results/"):
        if key.endswith(".jsonl"):
            yield from parse_results(storage.read(key) or b"")[0]


def true_page_totals(index: Mapping[str, tuple[str, ...]], pages: Mapping[str, int], done: set[str],
                     rate: float | None, estimated: set[str] | frozenset[str] = frozenset()) -> PageTotals:
    """The workspace's pages with each document counted once.

    A retry item (its documents all queued by an earlier item), like a ``--retry_fallback_pages`` ticket,
    re-does pages already in the total: it adds
    nothing to it, and while it is not done its pages are not done either. Only the last item of a chain of
    retries can be not done (a retry item is made from a done item), so the pages not done are those of the
    items not done, whatever they are. Items without a stored count are estimated at the mean size;
    ``estimated`` items' counts come from the queue's sample, and the total says so until they are counted.
    """
    known = [pages[h] for h in index if h in pages]
    mean = sum(known) / len(known) if known else 1.0
    seen: set[str] = set()
    total = remaining = 0.0
    for item, paths in index.items():  # in the order they were queued
        size = float(pages[item]) if item in pages else mean
        if not set(paths) <= seen and not all(map(is_ticket, paths)):  # a page retry re-does queued pages
            total += size
        seen.update(paths)
        if item not in done:
            remaining += size
    total_pages, remaining_pages = round(total), round(min(remaining, total))
    return PageTotals(total=total_pages, done=total_pages - remaining_pages, items=len(index),
                      items_done=len(done & set(index)), unknown_items=len(index) - len(known),
                      rate=rate, estimated_items=sum(1 for h in index if h in estimated))


def workspace_summary(storage: Storage) -> tuple[dict, ResultTotals]:
    """:func:`olmocr.pipeline.workspace.queue.workspace_stats` with true counts (see the module docstring)."""
    from olmocr.pipeline.workspace.queue import DONE_DIR, load_index, workspace_stats
    from olmocr.pipeline.workspace.totals import load_pages_file

    stats = workspace_stats(storage)
    totals = result_totals(read_results(storage))
    done = {k.rsplit("/", 1)[-1][len("done_"):-len(".flag")] for k in storage.list(f"{DONE_DIR}/")
            if k.endswith(".flag") and k.rsplit("/", 1)[-1].startswith("done_")}
    rate = stats.get("page_totals", {}).get("pages_per_second")
    index = load_index(storage)
    pages, estimated = load_pages_file(storage)
    stats.update(queued_documents=len({p for paths in index.values() for p in paths if not is_ticket(p)}),
                 documents=totals.documents, pages=totals.pages, fallback_pages=len(totals.fallback),
                 input_tokens=totals.input_tokens, output_tokens=totals.output_tokens,
                 page_totals=true_page_totals(index, pages, done, rate, estimated).as_dict())
    return stats, totals


def format_fallback_pages(totals: ResultTotals, listed: int = FALLBACK_PAGES_LISTED) -> list[str]:
    """The ``--stats`` lines naming the fallback pages: by document and page, with reasons, the first
    ``listed``, then how many more."""
    lines = []
    if totals.spent_input_tokens != totals.input_tokens or totals.spent_output_tokens != totals.output_tokens:
        lines.append(f"Tokens of every attempt (failed ones included): {totals.spent_input_tokens} input, "
                     f"{totals.spent_output_tokens} output")
    if not totals.fallback:
        return lines
    reasons = ", ".join(f"{kind} {n}" for kind, n in sorted(totals.by_reason().items()))
    lines.append(f"Fallback pages ({len(totals.fallback)}; by reason: {reasons}):")
    for f in totals.fallback[:listed]:
        if f.page is None:
            lines.append(f"  {f.source}: a page (written by upstream olmOCR, which does not say which)")
        else:
            lines.append(f"  {f.source} page {f.page} [{f.kind}]: {f.reason}")
    if len(totals.fallback) > listed:
        lines.append(f"  ... and {len(totals.fallback) - listed} more")
    return lines


def print_stats(workspace: str, profile: str | None = None) -> int:
    """``--stats``: the workspace's summary and every server's counters over all runs (exit status)."""
    from olmocr.pipeline.workspace.queue import format_stats
    from olmocr.pipeline.workspace.storage import open_storage

    storage = open_storage(workspace, profile=profile)
    stats, totals = workspace_summary(storage)
    text = "\n".join([format_stats(stats), *format_fallback_pages(totals)])
    per_server = format_server_stats(summarize_server_stats(
        storage.read(key) or b"" for key in storage.list(f"{SERVER_STATS_DIR}/")))
    try:
        print(text + ("\n" + per_server if per_server else ""), flush=True)
    except BrokenPipeError:  # `--stats | head`: the reader has what it wanted
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # the exit's flush of stdout must not fail again
        return STATUS_BROKEN_PIPE
    return STATUS_OK
