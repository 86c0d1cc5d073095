"""Finished pages of a document a stop interrupted, kept for whoever processes it next (issue 29).

A graceful stop hands the unfinished documents of its item back as a new item (``complete_partial``). For a
document that was in flight, the pages already answered are written to ``partial_pages/<new item>.jsonl``
*before* that item is queued, one JSON line per document: ``{"source", "pages": [page, ...]}``. The worker
that claims the new item reads that file (one GET; absent for almost every item) and sends only the
missing pages. Upstream ignores the folder and simply does the whole document.
"""

from __future__ import annotations

import json
from dataclasses import asdict

from olmocr.pipeline.pages.output import FallbackKind, PageResult
from olmocr.pipeline.pages.prompts import PageResponse
from olmocr.pipeline.workspace.storage import Storage

PAGES_DIR = "partial_pages"


def cache_key(item_hash: str) -> str:
    return f"{PAGES_DIR}/{item_hash}.jsonl"


def _page(result: PageResult) -> dict:
    out = asdict(result)
    out["fallback_kind"] = result.fallback_kind.name if result.fallback_kind is not None else None
    return out


def _result(data: dict) -> PageResult:
    kind = data.get("fallback_kind")
    return PageResult(source=data["source"], page_num=int(data["page_num"]), response=PageResponse(**data["response"]),
                      input_tokens=int(data["input_tokens"]), output_tokens=int(data["output_tokens"]),
                      is_fallback=bool(data["is_fallback"]), fallback_reason=data.get("fallback_reason"),
                      fallback_kind=FallbackKind[kind] if kind else None)


def save(storage: Storage, item_hash: str, partial: dict[str, list[PageResult]]) -> int:
    """Write the finished pages of each document of ``partial`` (none: nothing written); returns the pages."""
    lines = [json.dumps({"source": source, "pages": [_page(p) for p in pages]}) for source, pages in partial.items()
             if pages]
    if lines:
        storage.write(cache_key(item_hash), ("\n".join(lines) + "\n").encode())
    return sum(len(p) for p in partial.values())


def load(storage: Storage, item_hash: str) -> dict[str, dict[int, PageResult]]:
    """``{source: {page number: finished page}}`` kept for this item ({} when none: one GET)."""
    data = storage.read(cache_key(item_hash))
    out: dict[str, dict[int, PageResult]] = {}
    for line in (data or b"").decode("utf-8", "replace").splitlines():
        try:
            record = json.loads(line)
            out[str(record["source"])] = {int(p["page_num"]): _result(p) for p in record["pages"]}
        except (ValueError, KeyError, TypeError):
            continue  # damaged: those pages are simply done again
    return out
