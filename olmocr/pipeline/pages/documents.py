"""One input document: fetch, recognise, count pages, run every page, judge the fallback rate, build Dolma."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import tempfile
from dataclasses import dataclass

from olmocr.pipeline.errors import RenderError
from olmocr.pipeline.job_cancel import cancelled_failure, dropped, unless_dropped
from olmocr.pipeline.pages.output import PageResult, build_dolma_document
from olmocr.pipeline.pages.page import PageProcessor, PageSource
from olmocr.pipeline.pages.page_retry import TICKET_MAGIC, retry_pages
from olmocr.pipeline.pages.render import Renderer, pdf_has_eof_marker
from olmocr.pipeline.workspace.inputs import read_input, sniff_kind
from olmocr.pipeline.workspace.storage import Storage

logger = logging.getLogger(__name__)

SNIFF_BYTES = 1024


@dataclass(frozen=True)
class DocOutcome:
    """Exactly one of ``doc`` (a Dolma document) and ``failure`` (a failed-document record) is set, except for a
    page-retry ticket (olmocr/pipeline/pages/page_retry.py): it rewrites a written document and sets neither."""

    source: str
    doc: dict | None = None
    failure: dict | None = None


def failure(source: str, reason: str, retryable: bool) -> DocOutcome:
    logger.error("document failed: %s: %s", source, reason)
    return DocOutcome(source, failure={"source": source, "reason": reason, "retryable": retryable})


def filtered(source: str, reason: str) -> DocOutcome:
    """A document skipped by ``--apply_filter``: recorded with its reason (final, never retried)."""
    logger.info("document skipped: %s: %s", source, reason)
    return DocOutcome(source, failure={"source": source, "reason": reason, "retryable": False, "filtered": True})


def _read(path: str) -> bytes:
    with open(path, "rb") as fh:
        return fh.read()


class _Fetched:
    """A local file for the renderer: the input itself when local, else a temporary copy."""

    def __init__(self, source: str, local: str | None = None) -> None:
        self.source = source
        self.path = local or source
        self.local = local is not None
        self.temp: str | None = None

    def fetch(self) -> bytes:
        """Make the document available locally; return its first bytes (for sniffing)."""
        if self.local or not self.source.startswith("s3://"):
            with open(self.path, "rb") as fh:
                return fh.read(SNIFF_BYTES)
        data = read_input(self.source)
        fd, self.temp = tempfile.mkstemp(prefix="olmocr-", suffix=".input")
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        self.path = self.temp
        return data[:SNIFF_BYTES]

    def cleanup(self) -> None:
        if self.temp is not None:
            try:
                os.unlink(self.temp)
            except OSError:
                pass


class DocumentProcessor:
    def __init__(self, renderer: Renderer, pages: PageProcessor, page_slots: asyncio.Semaphore,
                 max_page_error_rate: float, apply_filter: bool = False, storage: Storage | None = None) -> None:
        self.renderer = renderer
        self.storage = storage  # the workspace: page-retry tickets rewrite its results
        self.apply_filter = apply_filter
        self.pages = pages
        self.page_slots = page_slots
        self.max_page_error_rate = max_page_error_rate
        # --- queue-scale (#29): finished pages survive a stop ---
        #: Pages of each document in progress, filled as they finish (read by the runner on a stop).
        self.partial: dict[str, list[PageResult | None]] = {}
        #: Pages kept from an earlier, stopped run: ``{source: {page number: page}}`` (set by the runner).
        self.cached: dict[str, dict[int, PageResult]] = {}
        # --- end queue-scale ---

    async def process(self, source: str, local: str | None = None) -> DocOutcome:
        """``source`` (its name in the results); ``local``: a local copy to read instead (archive members)."""
        fetched = _Fetched(source, local)
        try:
            try:
                head = await asyncio.to_thread(fetched.fetch)
            except FileNotFoundError:
                return failure(source, "file not found", retryable=True)
            except Exception as exc:  # noqa: BLE001 - S3/OS errors: may work next time
                return failure(source, f"cannot read input ({type(exc).__name__}: {exc})", retryable=True)
            if head.startswith(TICKET_MAGIC) and self.storage is not None:
                return await self._retry_pages(source, fetched.path)
            kind = sniff_kind(head)
            if kind is None:
                if not head:
                    return failure(source, "empty file (0 bytes)", retryable=False)
                return failure(source, f"not a PDF, PNG, JPEG or TIFF (starts with {head[:8]!r})", retryable=False)
            try:
                info = await self.renderer.probe(fetched.path, kind)
            except RenderError as exc:
                return failure(source, str(exc), retryable=False)
            if info.page_count == 0:
                return failure(source, "PDF has zero pages", retryable=False)
            if kind == "pdf" and not await asyncio.to_thread(pdf_has_eof_marker, fetched.path):
                return failure(source, "truncated PDF (it lacks the end-of-file marker a complete PDF ends with: the download or copy was cut short)", retryable=False)
            if self.apply_filter and kind == "pdf":
                reason = await self._filter_reason(fetched.path, info.page_count)
                if reason is not None:
                    return filtered(source, reason)
            return await self._run_pages(source, fetched.path, kind, info.page_count)
        finally:
            fetched.cleanup()

    async def _retry_pages(self, ticket_source: str, ticket_path: str) -> DocOutcome:
        """Run the pages a ``--retry_fallback_pages`` ticket names and rewrite their document in place."""
        data = await asyncio.to_thread(_read, ticket_path)
        ticket = json.loads(data)
        source = str(ticket["source"])
        fetched = _Fetched(source)
        try:
            try:
                head = await asyncio.to_thread(fetched.fetch)
            except Exception as exc:  # noqa: BLE001 - the input moved or S3 failed: the pages stay as they are
                return failure(ticket_source, f"cannot retry the pages of {source}: cannot read it "
                               f"({type(exc).__name__}: {exc})", retryable=False)
            kind = sniff_kind(head)
            if kind is None:
                return failure(ticket_source, f"cannot retry the pages of {source}: it is no longer a PDF or "
                               "an image", retryable=False)
            self.pages.progress.add_pages(len(ticket["pages"]))

            async def run(page_num: int) -> PageResult:
                await self.page_slots.acquire()
                try:
                    return await self.pages.process(PageSource(source, fetched.path, kind, page_num))
                finally:
                    self.page_slots.release()

            assert self.storage is not None
            await retry_pages(data, self.storage, run)
            return DocOutcome(ticket_source)
        finally:
            fetched.cleanup()

    # --- queue-scale (#29): tarball inputs ---
    async def process_archive(self, source: str) -> list[DocOutcome]:
        """Every PDF/PNG/JPEG member of the tarball ``source`` as a document named ``source::member`` (as
        upstream). A corrupt or truncated archive is a failed document (``source``) with its reason; the
        members read before the damage still come through."""
        from olmocr.pipeline.workspace.archives import extract_members

        fetched = _Fetched(source)
        temp_dir = tempfile.mkdtemp(prefix="olmocr-archive-")
        try:
            try:
                await asyncio.to_thread(fetched.fetch)
            except FileNotFoundError:
                return [failure(source, "file not found", retryable=True)]
            except Exception as exc:  # noqa: BLE001 - S3/OS errors: may work next time
                return [failure(source, f"cannot read input ({type(exc).__name__}: {exc})", retryable=True)]
            members, problem = await asyncio.to_thread(extract_members, fetched.path, temp_dir)
            outcomes = list(await asyncio.gather(*(self.process(f"{source}::{name}", path) for name, path in members)))
            if problem is not None:
                outcomes.append(failure(source, problem, retryable=False))
            return outcomes
        finally:
            fetched.cleanup()
            import shutil

            shutil.rmtree(temp_dir, ignore_errors=True)
    # --- end queue-scale ---

    async def _filter_reason(self, path: str, page_count: int) -> str | None:
        from olmocr.pipeline.pages.filters import PAGES_TO_READ, filter_reason

        texts = [await self.renderer.text(path, "pdf", n) for n in range(1, min(page_count, PAGES_TO_READ) + 1)]
        return await asyncio.to_thread(filter_reason, path, "\n".join(texts))

    async def _run_pages(self, source: str, path: str, kind: str, page_count: int) -> DocOutcome:
        self.pages.progress.add_pages(page_count)
        results: list[PageResult | None] = [None] * page_count
        kept = self.cached.get(source, {})  # queue-scale (#29): pages a stopped run finished
        for number, page in kept.items():
            if 1 <= number <= page_count:
                results[number - 1] = page
        self.partial[source] = results

        async def run(index: int) -> None:
            try:  # svc-jobs (#32): None when its job was cancelled before the page started
                results[index] = await unless_dropped(self.pages.process(PageSource(source, path, kind, index + 1)))
            finally:
                self.page_slots.release()

        # Pages start as slots free up, so a 1,000-page PDF is never in flight all at once.
        async with asyncio.TaskGroup() as group:
            for index in range(page_count):
                if results[index] is not None:
                    continue
                if dropped():  # svc-jobs (#32)
                    break
                await self.page_slots.acquire()
                group.create_task(run(index))
        self.partial.pop(source, None)
        missing = sum(1 for r in results if r is None)
        if missing:  # svc-jobs (#32): its job was cancelled; the pages that finished are not kept
            self.pages.progress.add_pages(-missing)
            return DocOutcome(source, failure=cancelled_failure(source, missing, page_count))

        pages = [r for r in results if r is not None]
        fallbacks = [p for p in pages if p.is_fallback]
        if fallbacks and len(fallbacks) / page_count > self.max_page_error_rate:
            model_failures = any(p.fallback_kind is not None and p.fallback_kind.retryable for p in fallbacks)
            self.pages.progress.pages_failed += page_count
            return failure(
                source,
                f"{len(fallbacks)} of {page_count} pages fell back to the text layer, more than "
                f"--max_page_error_rate {self.max_page_error_rate:g} (first: {fallbacks[0].fallback_reason})",
                retryable=model_failures,
            )
        if fallbacks:
            logger.warning("%s: %d of %d pages use the text-layer fallback", source, len(fallbacks), page_count)
        doc = build_dolma_document(source, pages)
        if doc is None:
            return failure(source, f"no text on any of its {page_count} pages", retryable=False)
        return DocOutcome(source, doc=doc)
