"""Dolma documents and markdown paths as upstream olmOCR 0.4.27 writes them (plus who produced them)."""

from __future__ import annotations

import datetime
import enum
import hashlib
import json
import os
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

    @property
    def retryable(self) -> bool:
        return self is FallbackKind.NO_MODEL_ANSWER


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
        },
    }


def dolma_jsonl(docs: list[dict]) -> bytes:
    """JSON Lines as upstream writes them (``json.dumps`` defaults, one document per line)."""
    return "".join(json.dumps(doc) + "\n" for doc in docs).encode("utf-8")


def markdown_relpath(source_file: str) -> str:
    """``markdown/<source path>.md`` relative to the workspace, with upstream's path-traversal guard.

    Tarball members (``tar::member``) go under the tarball's base name; ``s3://bucket/key`` uses ``key``;
    local paths lose their leading ``/``. Empty, ``.`` and ``..`` components are dropped.
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
    name = os.path.splitext(os.path.basename(relative))[0] + ".md"
    directory = os.path.dirname(relative)
    return "/".join(x for x in ("markdown", directory, name) if x)
