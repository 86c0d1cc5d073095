"""Page rendering with pypdfium2 in a pool of worker processes.

The functions prefixed ``_job_`` run inside the worker processes; :class:`Renderer` is the asyncio
facade the pipeline uses. Every job runs under a time limit (``job_timeout``): a page that makes pdfium
spin (or a worker that dies: segfault, OOM kill) costs only that page -- pebble's process pool kills the
stuck worker, starts a fresh one, and the job fails with :class:`RenderError` saying why, while the
other workers carry on (concurrent.futures' pool cannot stop one task, and one dead worker breaks it all). PDF pages are rendered so that their longest side is
``target_longest_image_dim`` pixels, honouring the page's ``/Rotate``; PNG and JPEG inputs are treated as
one-page documents scaled the same way, and a TIFF as one page per frame (through Pillow; a frame that
cannot be decoded fails that page only). Results are base64-encoded PNG bytes, ready to go into a data URL.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import re
import signal
import struct
import threading
import time
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import TimeoutError as FutureTimeoutError
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pybase64
from pebble import ProcessExpired, ProcessPool

from olmocr.pipeline.errors import RenderError
from olmocr.pipeline.gates import PriorityGate

logger = logging.getLogger(__name__)

#: The PDF specification's implementation limit for a page side (200 inches), in points.
MAX_PAGE_SIDE_PT = 14400.0
#: Images with more pixels than this are refused (decompression-bomb guard, 20k x 20k).
MAX_IMAGE_PIXELS = 400_000_000
#: PNG zlib level: 1 is ~2.5x faster than PIL's default 6 for ~10% bigger files; pixels are identical.
PNG_COMPRESS_LEVEL = 1
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_DOC_CACHE_SIZE = 4
EOF_SEARCH_BYTES = 16384

#: Default time limit for one job (opening a document, rendering a page, reading its text layer), in
#: seconds. Pages of the benchmark corpus render in well under a second at 1288 px; a page that takes
#: minutes is pathological (or pdfium is stuck) and is not worth a worker.
DEFAULT_RENDER_TIMEOUT_S = 120.0

#: Tests only: make a worker misbehave on chosen pages, to check that the pipeline survives it.
#: ``ACTION:NAME:PAGE[,...]`` where ACTION is ``hang`` (sleep forever) or ``crash`` (SIGKILL itself),
#: NAME a substring of the document's path and PAGE a 1-based page number or ``*``; it applies to
#: rendering and to the text layer (``hang-render`` / ``crash-render`` apply to rendering only).
#: Two more spoil the image only, to show that the fidelity tests (tests/test_fidelity.py) catch it:
#: ``blank`` sends a white image of the page's size, ``wrongpage`` renders the next page (the last: the first).
TEST_FAULT_ENV = "OLMOCR_TEST_RENDER_FAULT"

_ROTATE_CCW = {90: "ROTATE_90", 180: "ROTATE_180", 270: "ROTATE_270"}


class RenderTimeLimit(RenderError):
    """A job ran past the render time limit (``--render_timeout``); its worker was killed and replaced."""


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
        return f"truncated PDF (it lacks the end-of-file marker a complete PDF ends with: the download or copy was cut short; {len(data):,} bytes)"
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


def _open_tiff(path: str) -> Any:
    """A TIFF opened with Pillow (frames are read one at a time: :func:`_tiff_frame`)."""
    from PIL import Image

    try:
        img = Image.open(path)
        img.n_frames  # noqa: B018 - walks the chain of frames: a broken chain fails here, for the whole file
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad files
        raise RenderError(f"corrupt or unreadable TIFF ({type(exc).__name__}: {exc})") from None
    return img


def tiff_frame_count(source: str | bytes) -> int:
    """How many frames (pages) a TIFF file (a path, or its bytes) has."""
    import io

    from PIL import Image

    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
        return int(getattr(img, "n_frames", 1))


def _tiff_frame(path: str, page_num: int) -> Any:
    """Frame ``page_num`` (1-based) of a TIFF as an RGB image (EXIF orientation applied); RenderError when
    it is not there or cannot be decoded."""
    from PIL import ImageOps

    img = _open_tiff(path)
    frames = int(getattr(img, "n_frames", 1))
    if not 1 <= page_num <= frames:
        raise RenderError(f"TIFF has {frames} frames, no page {page_num}")
    try:
        img.seek(page_num - 1)
        w, h = img.size
        if w * h > MAX_IMAGE_PIXELS:
            raise RenderError(f"enormous TIFF frame {page_num} ({w}x{h} pixels, limit {MAX_IMAGE_PIXELS:,})")
        img.load()
        frame = ImageOps.exif_transpose(img)
        return frame if frame.mode == "RGB" else frame.convert("RGB")
    except RenderError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise RenderError(f"cannot decode TIFF frame {page_num} ({type(exc).__name__}: {exc})") from None


def _injected_fault(path: str, page_num: int, job: str) -> str | None:
    """The test-only fault of :data:`TEST_FAULT_ENV`, if one matches this job (see there): hangs or
    crashes here, or returns ``blank`` / ``wrongpage`` for the render job to act on."""
    spec = os.environ.get(TEST_FAULT_ENV)  # test-only (envs.TEST_ONLY): not a setting
    if not spec:
        return None
    for rule in spec.split(","):
        action, _, rest = rule.strip().partition(":")
        name, _, page = rest.rpartition(":")
        if name not in path or page not in ("*", str(page_num)):
            continue
        base, _, only = action.partition("-")
        if only and only != job:
            continue
        if base == "hang":
            while True:
                time.sleep(3600)
        if base == "crash":
            os.kill(os.getpid(), signal.SIGKILL)
        if base in ("blank", "wrongpage") and job == "render":
            return base
    return None


def _job_probe(path: str, kind: str) -> DocInfo:
    if kind in ("png", "jpeg"):
        _open_image(path)
        return DocInfo(page_count=1)
    if kind == "tiff":
        return DocInfo(page_count=int(getattr(_open_tiff(path), "n_frames", 1)))
    doc = _open_pdf(path)
    try:
        count = len(doc)
    except Exception as exc:  # noqa: BLE001
        raise RenderError(f"corrupt PDF: cannot count pages ({exc})") from None
    return DocInfo(page_count=count)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_rgb(width: int, height: int, pixels: Any, stride: int | None = None) -> bytes:
    """A PNG of 8-bit RGB ``pixels`` (rows top to bottom, ``stride`` bytes apart: ``3 * width`` unless the rows
    are padded, as pdfium pads them to 4 bytes), every row with filter type 0 (None).

    Written here rather than with ``PIL.Image.save`` for a measured reason: Pillow always runs PNG's adaptive
    row filter (it tries all five filters on every row), which was the largest cost of a page -- 29 ms of a
    46 ms render at 1288 px over the benchmark corpus, 21 ms of it even with no compression at all. Rows
    without a filter, deflated at level 1, take 15 ms for the same pages and are as small (340 KB a page
    against 336 KB: rendered documents are mostly flat runs, which deflate finds without filtering). The
    pixels are identical (PNG is lossless; tests/test_render_png.py decodes them back).

    The rows go to the compressor one at a time as views of ``pixels`` (any buffer: bytes, or pdfium's
    bitmap), never copied into one filtered image: a copied image of a 1288 px page is ~6 MB, and each copy a
    render worker makes stays resident in it (glibc keeps freed heap). Measured: 12 MB less resident in one
    process after 34 corpus pages; in the memory benchmark each render process peaks at 40 MB, against 57 MB
    copying; pixels identical; 42.6 pages per CPU-second against 40.8 (bench/results/render.json).
    """
    row = 3 * width
    stride = row if stride is None else stride
    view = memoryview(pixels).cast("B")
    if stride < row or len(view) != stride * height:  # pdfium's buffer is exactly stride * height bytes
        raise ValueError(f"{len(view)} bytes is not {width}x{height} RGB with rows {stride} bytes apart")
    deflate = zlib.compressobj(PNG_COMPRESS_LEVEL)
    parts = []
    for start in range(0, stride * height, stride):
        parts.append(deflate.compress(b"\x00"))  # the row's filter type: None
        parts.append(deflate.compress(view[start : start + row]))
    parts.append(deflate.flush())
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, deflate, no interlace
    return b"".join((_PNG_SIGNATURE, _png_chunk(b"IHDR", header), _png_chunk(b"IDAT", b"".join(parts)),
                     _png_chunk(b"IEND", b"")))


def _encode_png(img: Any, rotation: int) -> bytes:
    from PIL import Image

    if rotation:
        img = img.transpose(getattr(Image.Transpose, _ROTATE_CCW[rotation]))
    if img.mode != "RGB":
        img = img.convert("RGB")
    width, height = img.size
    return png_rgb(width, height, img.tobytes())


def _job_render(path: str, kind: str, page_num: int, target_dim: int, rotation: int) -> bytes:
    """:func:`_job_render_png`, base64-encoded: what goes into the request's data URL."""
    # pybase64 (what vLLM decodes with): 50x faster than the stdlib's base64 on a page image, same output.
    return pybase64.b64encode(_job_render_png(path, kind, page_num, target_dim, rotation))


def _job_render_png(path: str, kind: str, page_num: int, target_dim: int, rotation: int) -> bytes:
    """Render 1-based ``page_num`` to PNG bytes; rotate the image counter-clockwise by ``rotation`` degrees."""
    if rotation not in (0, 90, 180, 270):
        raise ValueError(f"invalid rotation {rotation}")
    fault = _injected_fault(path, page_num, "render")
    if kind in ("png", "jpeg", "tiff"):
        from PIL import Image

        img = _tiff_frame(path, page_num) if kind == "tiff" else _open_image(path)
        w, h = img.size
        scale = target_dim / max(w, h)
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        if size != img.size:
            img = img.resize(size, Image.Resampling.LANCZOS)
        return _encode_png(img, rotation)

    doc = _open_pdf(path)
    try:
        page = doc[page_num % len(doc) if fault == "wrongpage" else page_num - 1]
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
        # rev_byteorder: pdfium writes RGB (its default is BGR), so an unrotated page is encoded straight from
        # pdfium's buffer, with no PIL image or copy in between.
        bitmap = page.render(scale=scale, rev_byteorder=True)
        try:
            if not rotation and fault != "blank" and bitmap.mode == "RGB":
                return png_rgb(bitmap.width, bitmap.height, bitmap.buffer, bitmap.stride)
            img = bitmap.to_pil()  # _encode_png converts it to RGB if need be
            if fault == "blank":
                from PIL import Image

                img = Image.new("RGB", img.size, "white")
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
    _injected_fault(path, page_num, "text")
    if kind in ("png", "jpeg", "tiff"):
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


def _worker_init(parent_pid: int | None = None) -> None:
    # The parent handles Ctrl-C; workers just get torn down with the pool.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _ignore_group_sigterm(parent_pid)
    # An idle worker would outlive a pipeline killed by SIGKILL (it never notices): die with it. The parent's
    # pid comes from the parent: one that died while this worker started is noticed too.
    if parent_pid is not None:
        from olmocr.server.lifetime import die_with_parent

        die_with_parent(signal.SIGKILL, parent_pid)
    # Imported as the worker starts (pebble starts them all at the first job), not in a page's time limit.
    import pypdfium2  # noqa: F401
    from PIL import Image  # noqa: F401


def _ignore_group_sigterm(parent_pid: int | None) -> None:
    """End on SIGTERM only when the pipeline sends it (pebble stops a worker with SIGTERM, then SIGKILL).

    systemd's ``KillMode=control-group``, Slurm's ``scancel`` and ``kill -TERM -PGID`` signal every process of
    the job at once; a worker that died of that would fail its page while the pipeline stops gracefully. The
    worker blocks SIGTERM and a thread reads each one with its sender (``sigwaitinfo``): from the parent it
    exits as SIGTERM would; from anyone else it is ignored.
    """
    if parent_pid is None or not hasattr(signal, "sigwaitinfo"):
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})

    def watch() -> None:
        while True:
            info = signal.sigwaitinfo({signal.SIGTERM})
            if info.si_pid in (parent_pid, os.getppid()):
                os._exit(128 + signal.SIGTERM)

    threading.Thread(target=watch, name="sigterm-from-parent", daemon=True).start()


# --------------------------------------------------------------------------- parent side


def default_render_processes() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


#: Seconds :meth:`Renderer.close` waits for the render workers to exit by themselves before stopping them.
CLOSE_WAIT_S = 2.0


class Renderer:
    """An asyncio front end to a process pool of pypdfium2 renderers (one pool for the whole run).

    ``timeout`` bounds every job (see the module docstring); ``None`` or 0 means no limit.
    """

    def __init__(self, processes: int | None = None, timeout: float | None = DEFAULT_RENDER_TIMEOUT_S,
                 urgent: Callable[[], bool] = lambda: False) -> None:
        self.processes = processes or default_render_processes()
        self.timeout = timeout if timeout and timeout > 0 else None
        # svc-perf (#32): jobs go to the pool one more than it has workers (no worker waits for the next
        # job); the rest wait here, where a job for which ``urgent()`` is true (an olmocr-service job's
        # page) goes before every queued one. The pool's own queue is FIFO: a job's page waited behind
        # every batch render queued before it. While an interactive item is in progress (:meth:`interactive`)
        # no other render starts: the batch's renders run ahead of the server (its requests in flight keep
        # the server busy meanwhile) and took the CPU the job's own work needs.
        self._interactive = 0
        self._turns = PriorityGate(self.processes + 1, urgent, hold=lambda: self._interactive > 0)
        self.timed_out = 0  # jobs stopped by the time limit
        self.crashed = 0  # jobs whose worker died
        self._pool = self._new_pool()
        self.observe_render: Callable[[float], None] | None = None  # render-latency hook (metrics)

    def _new_pool(self) -> ProcessPool:
        return ProcessPool(max_workers=self.processes, initializer=_worker_init, initargs=(os.getpid(),),
                           context=multiprocessing.get_context("spawn"))

    def _schedule(self, fn: Any, args: tuple) -> Any:
        # pebble gives up on the whole pool when a worker dies while no job runs (e.g. an idle worker
        # OOM-killed): start a fresh one.
        if not self._pool.active:
            logger.warning("the render pool stopped (a worker died while idle); starting a new one")
            old, self._pool = self._pool, self._new_pool()
            old.stop()
        return self._pool.schedule(fn, args=args, timeout=self.timeout)

    @contextmanager
    def interactive(self) -> Iterator[None]:
        """Around an interactive item: only urgent renders start until it ends."""
        self._interactive += 1
        try:
            yield
        finally:
            self._interactive -= 1
            if not self._interactive:
                self._turns.resume()

    async def _call(self, what: str, fn: Any, *args: Any) -> Any:
        async with self._turns:
            return await self._call_now(what, fn, *args)

    async def _call_now(self, what: str, fn: Any, *args: Any) -> Any:
        for attempt in range(2):
            future = self._schedule(fn, args)
            try:
                return await asyncio.wrap_future(future)
            except BrokenProcessPool:
                # Jobs in flight when pebble gave up on the pool: not this page's fault, try again.
                if attempt == 1:
                    raise RenderError(f"the render pool failed twice on {what}") from None
                continue
            except FutureTimeoutError:
                # Deterministic for this page: no second try. pebble has killed and replaced the worker.
                self.timed_out += 1
                raise RenderTimeLimit(f"{what} took longer than the {self.timeout:g} s render time limit "
                                  "(the render worker was killed and replaced)") from None
            except ProcessExpired as exc:
                # A segfault may be this document's fault, an OOM kill the machine's: try once more.
                self.crashed += 1
                logger.warning("render worker died (%s) on %s; %s", _describe_exit(exc.exitcode), what,
                               "retrying once in a fresh worker" if attempt == 0 else "giving up on it")
                if attempt == 1:
                    raise RenderError(f"the renderer crashed on {what} "
                                      f"({_describe_exit(exc.exitcode)}, twice)") from None
        raise AssertionError("unreachable")

    async def probe(self, path: str, kind: str) -> DocInfo:
        return await self._call("opening the document", _job_probe, path, kind)

    async def render(self, path: str, kind: str, page_num: int, target_dim: int, rotation: int = 0) -> bytes:
        started = time.monotonic()
        # The worker sends the PNG and this process base64-encodes it: a third less to pickle and pass through
        # the pool's pipe, which costs more per byte than pybase64 does.
        png = await self._call(f"page {page_num}", _job_render_png, path, kind, page_num, target_dim, rotation)
        if self.observe_render is not None:
            self.observe_render(time.monotonic() - started)
        return pybase64.b64encode(png)

    async def text(self, path: str, kind: str, page_num: int) -> str:
        try:
            return await self._call(f"the text layer of page {page_num}", _job_text, path, kind, page_num)
        except Exception as exc:  # noqa: BLE001 - a fallback must not fail the document
            logger.warning("text layer unavailable for %s page %d: %s", path, page_num, exc)
            return ""

    def worker_pids(self) -> list[int]:
        """Pids of the pool's live worker processes (read from pebble's pool manager; [] if its internals
        ever change, which only the tests would notice)."""
        workers = getattr(getattr(self._pool, "_pool_manager", None), "worker_manager", None)
        procs = getattr(workers, "workers", {}) or {}
        return [p.pid for p in list(procs.values()) if p.pid]

    def kill_now(self) -> None:
        """SIGKILL the render workers (a second Ctrl+C: exit at once, even if a worker is stuck in pdfium).

        Only descendants in the pipeline's own session are killed: render workers and multiprocessing's
        helpers. Internal mode's supervisord runs in a session of its own (``start_new_session``), and
        SIGKILLing it would orphan vLLM with the GPU and the port; it is told to stop instead (SIGTERM, and
        ``PR_SET_PDEATHSIG`` once the pipeline is gone), and stops vLLM's process group itself.
        """
        import psutil

        session = os.getsid(0)
        for child in psutil.Process().children(recursive=True):
            try:
                if os.getsid(child.pid) == session:
                    child.kill()
            except (psutil.Error, ProcessLookupError, PermissionError):
                pass

    def close(self) -> None:
        # close() first, and a short wait: a worker still starting finishes its start. A stop() under it
        # removed the pool's semaphore while the worker unpickled it, and the worker printed a traceback into
        # the run's output (a one-page run in CI; 1 run in 12 of a probe-then-close repro, none in 42 since).
        # Then stop(): a worker stuck past its limit is not waited for.
        self._pool.close()
        try:
            self._pool.join(timeout=CLOSE_WAIT_S)
        except TimeoutError:
            pass
        self._pool.stop()
        self._pool.join(timeout=10)


def _describe_exit(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exit status {exitcode}"
