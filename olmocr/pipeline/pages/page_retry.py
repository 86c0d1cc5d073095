"""``--retry_fallback_pages``: run the fallback pages of written documents again, and rewrite them in place.

**Queueing** (:func:`queue_fallback_pages`). For each written document with fallback pages of the chosen
reasons, a *ticket* is stored in the workspace, ``page_retries/<results hash>/<sha1(source)[:16]>-<n>.json``
(``{"olmocr_page_retry": 1, "results": key, "source": path, "pages": [...]}``; ``n`` counts the document's
tickets), and one work item whose only path is the ticket's own path is added to the queue with the
queue's public API (:func:`olmocr.pipeline.workspace.queue.append_index`, as retryable failures are
re-queued; the claim and lease code is untouched). A document with a ticket whose item is not done yet gets
no second one, so running it twice queues nothing twice.

**Running** (:func:`retry_pages`, called by the document processor when the path it fetched is a ticket).
The listed pages go through the model again (:class:`~olmocr.pipeline.pages.page.PageProcessor`, all its
attempts); the document's line in its results file is then rewritten in place with compare-and-swap
(:func:`replace_pages`): pages that now have a model answer get its text, front matter and record; the
spans, id, token totals and fallback count follow; pages that fell back again keep their text, and their
record counts the new attempts. The document stays written exactly once; the ticket's own item writes an
empty results file.

**Upstream olmOCR 0.4.27** reading such a workspace sees a ticket as a file that is not a PDF: it skips it
(its item is marked done with no documents) and the document is left as it was.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
from collections.abc import Collection, Mapping

from olmocr.pipeline.pages.output import (
    BY_FALLBACK,
    FALLBACK_REASONS,
    PAGE_RECORDS,
    PageResult,
    document_pages,
    page_record,
    source_of,
)
from olmocr.pipeline.workspace.storage import Storage

logger = logging.getLogger(__name__)

TICKETS_DIR = "page_retries"
#: A ticket's first bytes: how the document processor tells a ticket from a document.
TICKET_MAGIC = b'{"olmocr_page_retry": 1'
CAS_ATTEMPTS = 50


def parse_reasons(text: str | None) -> tuple[str, ...]:
    """``--retry_fallback_pages [REASONS]``: comma-separated fallback kinds; empty or ``all``: every kind."""
    if not text or text.strip() == "all":
        return FALLBACK_REASONS
    reasons = tuple(r.strip() for r in text.split(",") if r.strip())
    unknown = [r for r in reasons if r not in FALLBACK_REASONS]
    if unknown or not reasons:
        raise ValueError(f"--retry_fallback_pages {text!r}: reasons are {', '.join(FALLBACK_REASONS)} (or all)")
    return reasons


def is_ticket(path: str) -> bool:
    return f"/{TICKETS_DIR}/" in path and path.endswith(".json")


def _ticket_path(storage: Storage, key: str) -> str:
    """The path a worker fetches the ticket by: the workspace's own URL plus the key."""
    return f"{storage.url.rstrip('/')}/{key}" if storage.url.startswith("s3://") else os.path.join(storage.url, key)


def fallback_pages(doc: dict, reasons: Collection[str]) -> list[int]:
    """The pages of ``doc`` that fell back for one of ``reasons`` (upstream's documents: none are known)."""
    records = (doc.get("attributes") or {}).get(PAGE_RECORDS)
    if not isinstance(records, list):
        return []
    return [int(r["page"]) for r in records
            if isinstance(r, dict) and r.get("produced_by") == BY_FALLBACK and r.get("fallback_kind") in reasons]


def queue_fallback_pages(storage: Storage, reasons: Collection[str]) -> tuple[int, int]:
    """Queue a retry of the fallback pages (of ``reasons``) of every written document; returns (documents,
    pages) queued now."""
    from olmocr.pipeline.export import parse_results
    from olmocr.pipeline.workspace.queue import append_index, done_key, group_hash
    from olmocr.pipeline.workspace.totals import record_pages

    tickets = storage.list(f"{TICKETS_DIR}/")
    new: dict[str, tuple[str, ...]] = {}
    pages_of: dict[str, int] = {}
    for key in storage.list("results/output_"):
        if not key.endswith(".jsonl"):
            continue
        docs = parse_results(storage.read(key) or b"")[0]
        for doc in docs:
            pages = fallback_pages(doc, reasons)
            if not pages:
                continue
            source = source_of(doc)
            stem = f"{TICKETS_DIR}/{key.rsplit('/', 1)[-1][len('output_'):-len('.jsonl')]}/" \
                   f"{hashlib.sha1(source.encode('utf-8')).hexdigest()[:16]}-"
            mine = [t for t in tickets if t.startswith(stem)]
            if any(storage.read(done_key(group_hash([_ticket_path(storage, t)]))) is None for t in mine):
                logger.info("%s: a retry of its fallback pages is already queued", source)
                continue
            ticket_key = f"{stem}{len(mine)}.json"
            ticket = {"olmocr_page_retry": 1, "results": key, "source": source, "pages": pages}
            storage.create(ticket_key, json.dumps(ticket).encode("utf-8"))  # a concurrent run made the same one
            path = _ticket_path(storage, ticket_key)
            new[group_hash([path])] = (path,)
            pages_of[group_hash([path])] = len(pages)
    if not new:
        return 0, 0
    append_index(storage, lambda current: new)
    try:
        record_pages(storage, pages_of)
    except Exception as exc:  # noqa: BLE001 - for display only (progress totals)
        logger.warning("could not store the page counts of the page retries (%s)", exc)
    return len(new), sum(pages_of.values())


def replace_pages(doc: dict, results: Mapping[int, PageResult]) -> dict:
    """``doc`` with the pages of ``results`` run again: a page the model answered now takes the answer (text,
    front matter, record); one that fell back again keeps its text. Spans, id, token totals and the fallback
    count follow; upstream's fields keep their order and meaning. Records count every attempt so far."""
    old_pages = document_pages(doc)
    attrs = dict(doc.get("attributes") or {})
    records = [dict(p.record) for p in old_pages]
    last = len(old_pages) - 1
    spans = attrs.get("pdf_page_numbers") or []
    texts: list[str | None] = []
    used_in = used_out = 0
    lists = {name: list(attrs.get(name) or [None] * len(old_pages))
             for name in ("primary_language", "is_rotation_valid", "rotation_correction", "is_table", "is_diagram")}
    for index, page in enumerate(old_pages):
        start, end, _ = spans[index]
        text: str | None = None if end == start and index < last else page.text
        result = results.get(page.page)
        old = records[index]
        if result is not None:
            record = page_record(result)
            record["attempts"] = int(old.get("attempts") or 0) + result.attempts
            record["input_tokens"] = int(old.get("input_tokens") or 0) + result.spent_input_tokens
            record["output_tokens"] = int(old.get("output_tokens") or 0) + result.spent_output_tokens
            record["retried"] = int(old.get("retried") or 0) + 1
            if result.is_fallback:  # fell back again: the text stays (the same text layer)
                record = {**old, **{k: record[k] for k in ("fallback_kind", "fallback_reason", "attempts",
                                                           "input_tokens", "output_tokens", "retried")}}
            else:
                text = result.response.natural_text
                used_in += result.input_tokens
                used_out += result.output_tokens
                response = result.response
                for name in lists:
                    lists[name][index] = getattr(response, name)
            records[index] = record
        texts.append(text)
    full = ""
    new_spans = []
    for index, (text, page) in enumerate(zip(texts, old_pages, strict=True)):
        start = len(full)
        if text is not None:
            full += text + ("\n" if index < last else "")
        new_spans.append([start, len(full), page.page])
    meta = dict(doc.get("metadata") or {})
    meta["total-input-tokens"] = int(meta.get("total-input-tokens") or 0) + used_in
    meta["total-output-tokens"] = int(meta.get("total-output-tokens") or 0) + used_out
    meta["total-fallback-pages"] = sum(1 for r in records if r.get("produced_by") == BY_FALLBACK)
    attrs.update(pdf_page_numbers=new_spans, **lists)
    attrs[PAGE_RECORDS] = records
    out = dict(doc)
    out.update(id=hashlib.sha1(full.encode()).hexdigest(), text=full, metadata=meta, attributes=attrs)
    return out


def rewrite_in_place(storage: Storage, key: str, source: str, results: Mapping[int, PageResult]) -> bool:
    """Replace ``source``'s line in results file ``key`` (compare-and-swap; other lines untouched)."""
    for _ in range(CAS_ATTEMPTS):
        found = storage.read_versioned(key)
        if found is None:
            return False
        lines = found[0].decode("utf-8").splitlines()
        out, hit = [], False
        for line in lines:
            try:
                doc = json.loads(line) if line.strip() else None
            except json.JSONDecodeError:
                doc = None
            if isinstance(doc, dict) and not hit and source_of(doc) == source:
                out.append(json.dumps(replace_pages(doc, results)))
                hit = True
            else:
                out.append(line)
        if not hit:
            return False
        if storage.replace_if(key, ("\n".join(out) + "\n").encode("utf-8"), found[1]):
            return True
    raise RuntimeError(f"could not rewrite {key} after {CAS_ATTEMPTS} attempts (heavy contention)")


async def retry_pages(ticket_data: bytes, storage: Storage, run_page) -> str:  # noqa: ANN001
    """Run a ticket's pages through ``run_page(source, page) -> PageResult`` and rewrite the document;
    returns a one-line account of what happened."""
    ticket = json.loads(ticket_data)
    key, source, pages = str(ticket["results"]), str(ticket["source"]), [int(p) for p in ticket["pages"]]
    done = await asyncio.gather(*(run_page(page) for page in pages))
    results = {r.page_num: r for r in done}
    if not await asyncio.to_thread(rewrite_in_place, storage, key, source, results):
        return f"{source}: its document is no longer in {key}; nothing rewritten"
    answered = sorted(n for n, r in results.items() if not r.is_fallback)
    logger.info("%s: pages %s retried: %d now have the model's answer, %d fell back again (document rewritten in "
                "%s)", source, ",".join(map(str, pages)), len(answered), len(pages) - len(answered), key)
    return f"{source}: {len(answered)} of {len(pages)} pages now from the model"
