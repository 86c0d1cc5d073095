"""Dolma documents and markdown paths as upstream olmOCR 0.4.27 writes them (plus who produced them).

Beside upstream's fields each document carries ``attributes["page_records"]``: one record per page saying how
it was produced (:func:`page_record`). :func:`document_pages` reads a document back page by page (ours or
upstream's), and :func:`markdown_text` / :func:`markdown_paths` make the markdown that ``--markdown`` and
``python -m olmocr.pipeline.export`` write.
"""

from __future__ import annotations

import datetime
import enum
import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from urllib.parse import urlparse

from olmocr import __version__
from olmocr.pipeline.pages.prompts import PageResponse

#: The upstream olmOCR release whose output format (prompt, fields, layout) these documents follow.
OLMOCR_COMPAT_VERSION = "0.4.27"
PRODUCER = "olmocr-serve"


def producer_version_string(version: str = __version__) -> str:
    """``metadata["olmocr-version"]``: upstream's format version with this project as a PEP 440 local label.

    ``0.4.27+olmocrserve.0.1.0`` still parses as a version whose public part is ``0.4.27`` (what tools
    that compare versions see), and no longer claims that upstream 0.4.27 produced the document.
    """
    return f"{OLMOCR_COMPAT_VERSION}+{PRODUCER.replace('-', '')}.{version}"


class FallbackKind(enum.Enum):
    """Why a page used its text layer; decides whether a document over the fallback rate is retried."""

    NO_MODEL_ANSWER = "no usable model answer"  # every attempt failed: a rerun (a healthy server) may do better
    REFUSED = "the server refuses the request"  # a 4xx no resend can change (context too small, key ...)
    UNRENDERABLE = "cannot render"  # the page itself cannot be rendered
    RENDER_TIME_LIMIT = "render time limit"  # rendering the page took longer than --render_timeout

    @property
    def retryable(self) -> bool:
        return self is FallbackKind.NO_MODEL_ANSWER

    @property
    def code(self) -> str:
        """The short name in the per-page record, ``--stats`` and ``/metrics``."""
        return _FALLBACK_CODES[self]


_FALLBACK_CODES = {FallbackKind.NO_MODEL_ANSWER: "model", FallbackKind.REFUSED: "refused",
                   FallbackKind.UNRENDERABLE: "render", FallbackKind.RENDER_TIME_LIMIT: "time_limit"}
#: Every ``fallback_kind`` of a per-page record (``/metrics`` reports each, 0 included).
FALLBACK_REASONS = tuple(_FALLBACK_CODES.values())
#: ``produced_by`` of a per-page record.
BY_MODEL, BY_FALLBACK, BLANK = "model", "fallback", "blank"
#: The attribute holding the per-page records (beside upstream's attributes, which are kept as they are).
PAGE_RECORDS = "page_records"


@dataclass(frozen=True)
class PageResult:
    """One finished page (upstream's ``PageResult``)."""

    source: str
    page_num: int
    response: PageResponse
    input_tokens: int
    output_tokens: int
    is_fallback: bool
    fallback_reason: str | None = None
    fallback_kind: FallbackKind | None = None
    attempts: int = 0  # model attempts that got an answer or a failure (resends of a lost request excluded)
    spent_input_tokens: int = 0  # every attempt's tokens, the failed ones included (what the page cost)
    spent_output_tokens: int = 0
    rotation_applied: int = 0  # degrees the image was turned counter-clockwise for the answer used


def page_record(page: PageResult) -> dict:
    """How ``page`` was produced, for ``attributes["page_records"]`` (docs/workspace.md, field by field)."""
    if page.is_fallback:
        produced_by = BY_FALLBACK
    elif not (page.response.natural_text or "").strip():
        produced_by = BLANK
    else:
        produced_by = BY_MODEL
    used = not page.is_fallback  # a fallback's front matter is a placeholder, not the model's
    return {
        "page": page.page_num,
        "produced_by": produced_by,
        "fallback_kind": page.fallback_kind.code if page.fallback_kind is not None else None,
        "fallback_reason": page.fallback_reason,
        "attempts": page.attempts,
        "input_tokens": page.spent_input_tokens,
        "output_tokens": page.spent_output_tokens,
        "rotation_applied": page.rotation_applied,
        "primary_language": page.response.primary_language if used else None,
        "is_rotation_valid": page.response.is_rotation_valid if used else None,
        "rotation_correction": page.response.rotation_correction if used else None,
        "is_table": page.response.is_table if used else None,
        "is_diagram": page.response.is_diagram if used else None,
    }


def build_dolma_document(source: str, pages: list[PageResult]) -> dict | None:
    """The Dolma document for ``pages`` (in page order); None when no page has any text (as upstream)."""
    text = ""
    spans: list[list[int]] = []
    last = len(pages) - 1
    for index, page in enumerate(pages):
        content = ""
        if page.response.natural_text is not None:
            content = page.response.natural_text + ("\n" if index < last else "")
        start = len(text)
        text += content
        spans.append([start, len(text), page.page_num])
    if not text:
        return None
    today = datetime.datetime.now().strftime("%Y-%m-%d")
    return {
        "id": hashlib.sha1(text.encode()).hexdigest(),
        "text": text,
        "source": "olmocr",
        "added": today,
        "created": today,
        "metadata": {
            "Source-File": source,
            "olmocr-version": producer_version_string(),
            "pdf-total-pages": len(pages),
            "total-input-tokens": sum(p.input_tokens for p in pages),
            "total-output-tokens": sum(p.output_tokens for p in pages),
            "total-fallback-pages": sum(p.is_fallback for p in pages),
            # Appended after upstream's fields (whose order is kept): who really wrote this document.
            "producer": PRODUCER,
            "producer-version": __version__,
        },
        "attributes": {
            "pdf_page_numbers": spans,
            "primary_language": [p.response.primary_language for p in pages],
            "is_rotation_valid": [p.response.is_rotation_valid for p in pages],
            "rotation_correction": [p.response.rotation_correction for p in pages],
            "is_table": [p.response.is_table for p in pages],
            "is_diagram": [p.response.is_diagram for p in pages],
            # Not upstream's: one record per page (page_record), after upstream's attributes.
            PAGE_RECORDS: [page_record(p) for p in pages],
        },
    }


def dolma_jsonl(docs: list[dict]) -> bytes:
    """JSON Lines as upstream writes them (``json.dumps`` defaults, one document per line)."""
    return "".join(json.dumps(doc) + "\n" for doc in docs).encode("utf-8")


def export_relpath(source_file: str, folder: str = "markdown", suffix: str = ".md") -> str:
    """``<folder>/<source path>/<name><suffix>`` relative to the workspace, with upstream's path-traversal guard.

    Tarball members (``tar::member``) go under the tarball's base name; ``s3://bucket/key`` uses ``key``;
    local paths lose their leading ``/``. Empty, ``.`` and ``..`` components are dropped. The name is the
    file's name with ``.pdf`` replaced by ``suffix`` (``a.pdf`` -> ``a.md``, as upstream), and any other
    file's full name followed by ``suffix`` (``a.png`` -> ``a.png.md``, ``a.jpg`` -> ``a.jpg.md``), so that
    inputs that differ only in their extension never share a file.
    """
    if "::" in source_file:
        tarball, member = source_file.split("::", 1)
        base = os.path.splitext(os.path.basename(tarball))[0]
        if base.endswith(".tar"):
            base = base[:-4]
        relative = os.path.join(base, member)
    elif source_file.startswith("s3://"):
        relative = urlparse(source_file).path.lstrip("/")
    else:
        relative = source_file.lstrip("/")
    relative = "/".join(p for p in relative.split("/") if p and p not in ("..", "."))
    name = os.path.basename(relative)
    stem, extension = os.path.splitext(name)
    name = (stem if extension == ".pdf" else name) + suffix
    directory = os.path.dirname(relative)
    return "/".join(x for x in (folder, directory, name) if x)


def markdown_relpath(source_file: str) -> str:
    """``markdown/<source path>.md`` (:func:`export_relpath`)."""
    return export_relpath(source_file)


def export_paths(sources: Iterable[str], folder: str = "markdown", suffix: str = ".md") -> dict[str, str]:
    """``{source: key}`` with no two sources on one key.

    :func:`export_relpath` keeps inputs apart that differ in their name; sources it still maps to one key
    (``a`` and ``a.pdf``, ``x/../a.pdf`` and ``a.pdf``, the same key in two buckets) ALL get the first 8 hex
    digits of the SHA-1 of their source path before the suffix (``a.md`` -> ``a~1f2e3d4c.md``): the name a
    document gets depends only on the set of sources, never on their order.
    """
    by_key: dict[str, list[str]] = {}
    for source in sorted(set(sources)):
        by_key.setdefault(export_relpath(source, folder, suffix), []).append(source)
    out: dict[str, str] = {}
    for key, group in by_key.items():
        for source in group:
            if len(group) == 1:
                out[source] = key
            else:
                tag = hashlib.sha1(source.encode("utf-8")).hexdigest()[:8]
                out[source] = f"{key[: -len(suffix)]}~{tag}{suffix}" if suffix else f"{key}~{tag}"
    return out


# --------------------------------------------------------------------------- reading documents back


@dataclass(frozen=True)
class DocPage:
    """One page of a written document: its text (without the newline that joins it to the next) and record."""

    page: int
    text: str
    record: dict


def _valid_spans(spans: object, length: int) -> list[tuple[int, int, int]] | None:
    if not isinstance(spans, list) or not spans:
        return None
    out = []
    for span in spans:
        if not (isinstance(span, list) and len(span) == 3 and all(isinstance(v, int) for v in span)):
            return None
        start, end, page = span
        if not 0 <= start <= end <= length:
            return None
        out.append((start, end, page))
    return out


def _record_from_upstream(attrs: dict, index: int, page: int) -> dict:
    """The per-page record of a document that has none (upstream's): what its attributes say, the rest null."""

    def at(name: str) -> object:
        values = attrs.get(name)
        return values[index] if isinstance(values, list) and index < len(values) else None

    return {"page": page, "produced_by": None, "fallback_kind": None, "fallback_reason": None, "attempts": None,
            "input_tokens": None, "output_tokens": None, "rotation_applied": None,
            **{name: at(name) for name in ("primary_language", "is_rotation_valid", "rotation_correction",
                                           "is_table", "is_diagram")}}


def document_pages(doc: dict) -> list[DocPage]:
    """The pages of a Dolma document written here or by upstream olmOCR, split along ``pdf_page_numbers``.

    A page's span holds its text plus the ``\n`` joining it to the next page (when it has text and is not
    the last); that newline is not part of the page. Without usable spans the whole text is page 1.
    """
    text = str(doc.get("text") or "")
    attrs = doc.get("attributes") or {}
    spans = _valid_spans(attrs.get("pdf_page_numbers"), len(text))
    if spans is None:
        return [DocPage(1, text, _record_from_upstream(attrs, 0, 1))]
    records = attrs.get(PAGE_RECORDS)
    if not (isinstance(records, list) and len(records) == len(spans) and all(isinstance(r, dict) for r in records)):
        records = [_record_from_upstream(attrs, i, page) for i, (_, _, page) in enumerate(spans)]
    last = len(spans) - 1
    pages = []
    for index, (start, end, page) in enumerate(spans):
        content = text[start:end]
        if index < last and content.endswith("\n"):
            content = content[:-1]
        pages.append(DocPage(page, content, records[index]))
    return pages


#: ``--page_separator``: what goes between two pages in markdown (``none``: upstream's single newline).
PAGE_SEPARATORS = ("comment", "rule", "none")
DEFAULT_PAGE_SEPARATOR = "comment"


def page_separator(style: str, page: int) -> str:
    """The text put before page ``page`` (not the first): blank lines around it keep the markdown apart."""
    if style == "comment":
        return f"\n\n<!-- page {page} -->\n\n"
    if style == "rule":
        return "\n\n---\n\n"
    if style == "none":
        return "\n"
    raise ValueError(f"page separator {style!r}: use one of {', '.join(PAGE_SEPARATORS)}")


def markdown_text(doc: dict, separator: str = DEFAULT_PAGE_SEPARATOR) -> str:
    """The document's markdown: its pages with ``separator`` between them (``none``: the Dolma text)."""
    if separator == "none":
        return str(doc.get("text") or "")
    pages = document_pages(doc)
    return "".join((page_separator(separator, p.page) if i else "") + p.text for i, p in enumerate(pages))


def markdown_files(docs: Iterable[dict], separator: str = DEFAULT_PAGE_SEPARATOR,
                   names: Mapping[str, str] | None = None) -> list[tuple[str, bytes]]:
    """``(workspace key, bytes)`` of each document's markdown file; ``names`` from :func:`export_paths`
    (default: the documents' own, kept apart from each other)."""
    docs = list(docs)
    names = names if names is not None else export_paths(source_of(d) for d in docs)
    return [(names[source_of(d)], markdown_text(d, separator).encode("utf-8")) for d in docs]


def source_of(doc: dict) -> str:
    """The input path a Dolma document was made from."""
    return str((doc.get("metadata") or {}).get("Source-File") or doc.get("id") or "")
