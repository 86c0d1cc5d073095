"""Page rendering with pypdfium2 in a pool of worker processes.

The functions prefixed ``_job_`` run inside the worker processes; :class:`Renderer` is the asyncio
facade the pipeline uses. PDF pages are rendered so that their longest side is
``target_longest_image_dim`` pixels, honouring the page's ``/Rotate``; PNG and JPEG inputs are treated as
one-page documents scaled the same way. Results are base64-encoded PNG bytes, ready to go into a data URL.
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import multiprocessing
import os
import re
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger("olmocr.pipeline")

#: The PDF specification's implementation limit for a page side (200 inches), in points.
MAX_PAGE_SIDE_PT = 14400.0
#: Images with more pixels than this are refused (decompression-bomb guard, 20k x 20k).
MAX_IMAGE_PIXELS = 400_000_000
#: PNG zlib level: 1 is ~2.5x faster than PIL's default 6 for ~10% bigger files; pixels are identical.
PNG_COMPRESS_LEVEL = 1
_DOC_CACHE_SIZE = 4
EOF_SEARCH_BYTES = 16384

_ROTATE_CCW = {90: "ROTATE_90", 180: "ROTATE_180", 270: "ROTATE_270"}


class RenderError(Exception):
    """A document or page cannot be opened or rendered; the message is the reason shown to users."""


@dataclass(frozen=True)
class DocInfo:
    page_count: int


# --------------------------------------------------------------------------- worker side

_docs: OrderedDict[tuple[str, int, int], Any] = OrderedDict()


def pdf_has_eof_marker(path: str) -> bool:
    """True if ``%%EOF`` occurs near the end of the file (a truncated download usually lacks it)."""
    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        fh.seek(max(0, size - EOF_SEARCH_BYTES))
        return b"%%EOF" in fh.read()


def classify_pdf_failure(path: str, pdfium_message: str) -> str:
    """A user-facing reason for a PDF that pdfium refused to open (its own error codes are unreliable:
    an empty page tree is reported as a password error, for instance)."""
    with open(path, "rb") as fh:
        data = fh.read()
    if re.search(rb"/Encrypt\s*(\d+\s+\d+\s+R|<<)", data):
        return "password-protected PDF (encrypted; cannot be opened without its password)"
    if not pdf_has_eof_marker(path):
        return f"truncated PDF (the file ends without a %%EOF marker; {len(data):,} bytes)"
    if re.search(rb"/Type\s*/Pages\b", data) and not re.search(rb"/Count\s+[1-9]", data):
        return "PDF has zero pages"
    detail = pdfium_message.removeprefix("Failed to load document ").strip("(). ")
    return f"corrupt PDF, cannot be opened ({detail})"


def _open_pdf(path: str) -> Any:
    import pypdfium2 as pdfium

    st = os.stat(path)
    key = (path, st.st_mtime_ns, st.st_size)
    doc = _docs.get(key)
    if doc is not None:
        _docs.move_to_end(key)
        return doc
    try:
        doc = pdfium.PdfDocument(path)
    except pdfium.PdfiumError as exc:
        raise RenderError(classify_pdf_failure(path, str(exc))) from None
    _docs[key] = doc
    while len(_docs) > _DOC_CACHE_SIZE:
        _, old = _docs.popitem(last=False)
        old.close()
    return doc


def _open_image(path: str) -> Any:
    from PIL import Image, ImageOps

    try:
        img = Image.open(path)
        w, h = img.size
        if w * h > MAX_IMAGE_PIXELS:
            raise RenderError(f"enormous image ({w}x{h} pixels, limit {MAX_IMAGE_PIXELS:,})")
        img = ImageOps.exif_transpose(img)
        img.load()
    except RenderError:
        raise
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad files
        raise RenderError(f"corrupt or unreadable image ({type(exc).__name__}: {exc})") from None
    if img.mode != "RGB":
        img = img.convert("RGB")
    return img


def _job_probe(path: str, kind: str) -> DocInfo:
    if kind in ("png", "jpeg"):
        _open_image(path)
        return DocInfo(page_count=1)
    doc = _open_pdf(path)
    try:
        count = len(doc)
    except Exception as exc:  # noqa: BLE001
        raise RenderError(f"corrupt PDF: cannot count pages ({exc})") from None
    return DocInfo(page_count=count)


def _encode_png(img: Any, rotation: int) -> bytes:
    from PIL import Image

    if rotation:
        img = img.transpose(getattr(Image.Transpose, _ROTATE_CCW[rotation]))
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return base64.b64encode(buf.getvalue())


def _job_render(path: str, kind: str, page_num: int, target_dim: int, rotation: int) -> bytes:
    """Render 1-based ``page_num``; rotate the image counter-clockwise by ``rotation`` degrees."""
    if rotation not in (0, 90, 180, 270):
        raise ValueError(f"invalid rotation {rotation}")
    if kind in ("png", "jpeg"):
        from PIL import Image

        img = _open_image(path)
        w, h = img.size
        scale = target_dim / max(w, h)
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        if size != img.size:
            img = img.resize(size, Image.Resampling.LANCZOS)
        return _encode_png(img, rotation)

    doc = _open_pdf(path)
    try:
        page = doc[page_num - 1]
    except Exception as exc:  # noqa: BLE001
        raise RenderError(f"cannot load page {page_num} ({exc})") from None
    try:
        width, height = page.get_size()  # honours /Rotate
        longest = max(width, height)
        if not longest > 0 or min(width, height) <= 0:
            raise RenderError(f"page {page_num} has an empty page box ({width:.0f}x{height:.0f} pt)")
        if longest > MAX_PAGE_SIDE_PT:
            raise RenderError(
                f"enormous page {page_num} ({width:.0f}x{height:.0f} pt, PDF limit {MAX_PAGE_SIDE_PT:.0f} pt)"
            )
        scale = target_dim / longest
        if min(width, height) * scale < 1:
            raise RenderError(f"page {page_num} is too thin to render ({width:.0f}x{height:.0f} pt)")
        bitmap = page.render(scale=scale)
        try:
            img = bitmap.to_pil()
            if img.mode != "RGB":
                img = img.convert("RGB")
            return _encode_png(img, rotation)
        finally:
            bitmap.close()
    except RenderError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise RenderError(f"cannot render page {page_num} ({type(exc).__name__}: {exc})") from None
    finally:
        page.close()


def _job_text(path: str, kind: str, page_num: int) -> str:
    """The page's text layer (what a text-layer fallback uses); empty for images."""
    if kind in ("png", "jpeg"):
        return ""
    doc = _open_pdf(path)
    page = doc[page_num - 1]
    try:
        textpage = page.get_textpage()
        try:
            return textpage.get_text_bounded().replace("\r\n", "\n").replace("\r", "\n")
        finally:
            textpage.close()
    finally:
        page.close()


def _worker_init() -> None:
    import signal

    # The parent handles Ctrl-C; workers just get torn down with the pool.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


# --------------------------------------------------------------------------- parent side


def default_render_processes() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


class Renderer:
    """An asyncio front end to a process pool of pypdfium2 renderers (one pool for the whole run)."""

    def __init__(self, processes: int | None = None) -> None:
        self.processes = processes or default_render_processes()
        self._pool = self._new_pool()
        self.observe_render: Callable[[float], None] | None = None  # render-latency hook (metrics)

    def _new_pool(self) -> ProcessPoolExecutor:
        ctx = multiprocessing.get_context("spawn")
        return ProcessPoolExecutor(max_workers=self.processes, mp_context=ctx, initializer=_worker_init)

    async def _call(self, fn: Any, *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        for attempt in range(2):
            pool = self._pool
            try:
                return await loop.run_in_executor(pool, fn, *args)
            except BrokenProcessPool:
                # A renderer crashed (e.g. pdfium on a hostile file); start a fresh pool, try once more.
                if pool is self._pool:
                    logger.warning("render worker process died; restarting the render pool")
                    pool.shutdown(wait=False, cancel_futures=True)
                    self._pool = self._new_pool()
                if attempt == 1:
                    raise RenderError("the renderer crashed on this document") from None
        raise AssertionError("unreachable")

    async def probe(self, path: str, kind: str) -> DocInfo:
        return await self._call(_job_probe, path, kind)

    async def render(self, path: str, kind: str, page_num: int, target_dim: int, rotation: int = 0) -> bytes:
        started = time.monotonic()
        image = await self._call(_job_render, path, kind, page_num, target_dim, rotation)
        if self.observe_render is not None:
            self.observe_render(time.monotonic() - started)
        return image

    async def text(self, path: str, kind: str, page_num: int) -> str:
        try:
            return await self._call(_job_text, path, kind, page_num)
        except Exception as exc:  # noqa: BLE001 - a fallback must not fail the document
            logger.warning("text layer unavailable for %s page %d: %s", path, page_num, exc)
            return ""

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
