"""What a client may send: errors with their own status and code, the limits, and the paths it may name.

Every refusal is a :class:`ServiceError`, answered as ``{"error": {"code", "message"}}`` with its status.
Types are judged by content (``sniff_kind``), never by name or Content-Type. Paths a client names are
confined to the configured roots: local paths resolved (symlinks followed) and checked to stay inside a
root, ``s3://`` paths to start with a configured prefix, ``..`` components and ``file://`` refused.
"""

from __future__ import annotations

import io
import os
import threading
from dataclasses import dataclass, field
from typing import Any

from olmocr.errors import OlmocrError
from olmocr.pipeline.workspace.inputs import KINDS, read_input, sniff_kind

#: pdfium is not thread-safe; the service opens documents from request threads, one at a time.
PDFIUM_LOCK = threading.Lock()


class ServiceError(OlmocrError):
    """A request the service refuses: HTTP status, a stable code, and one line saying what to do."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"code": self.code, "message": self.message}}


#: The media type and file name endings of each kind the pipeline accepts (every one of ``KINDS``).
MEDIA = {"pdf": ("application/pdf", (".pdf",)), "png": ("image/png", (".png",)),
         "jpeg": ("image/jpeg", (".jpg", ".jpeg")), "tiff": ("image/tiff", (".tif", ".tiff"))}
assert set(MEDIA) == set(KINDS), f"olmocr-service knows {sorted(MEDIA)}, the pipeline accepts {sorted(KINDS)}"


def accepted_names() -> str:
    """The accepted kinds for people: ``PDF, PNG, JPEG or TIFF``."""
    names = [kind.upper() for kind in KINDS]
    return ", ".join(names[:-1]) + " or " + names[-1]


def accept_attribute() -> str:
    """The upload page's ``<input accept>``: every accepted file name ending and media type."""
    return ",".join([e for k in KINDS for e in MEDIA[k][1]] + [MEDIA[k][0] for k in KINDS])


@dataclass(frozen=True)
class Limits:
    max_upload_bytes: int = 100 * 2**20  # per request
    max_pages: int = 2000  # per document
    max_documents: int = 100  # per job
    max_jobs_in_flight: int = 20  # per token
    convert_timeout_s: float = 300.0  # the longest wait of POST /v1/convert


@dataclass(frozen=True)
class Roots:
    """Where client-named paths may point: local directories and ``s3://`` prefixes."""

    local: tuple[str, ...] = ()
    s3: tuple[str, ...] = field(default=())

    @classmethod
    def parse(cls, values: list[str] | tuple[str, ...]) -> Roots:
        local = tuple(os.path.realpath(os.path.expanduser(v)) for v in values if not v.startswith("s3://"))
        s3 = tuple(v.rstrip("/") + "/" for v in values if v.startswith("s3://"))
        return cls(local, s3)


def too_large(limits: Limits) -> ServiceError:
    return ServiceError(413, "upload_too_large", f"the request is larger than the limit of "
                        f"{limits.max_upload_bytes} bytes (OLMOCR_SERVICE_MAX_UPLOAD_MB): send fewer or "
                        "smaller documents per job")


def check_document_count(count: int, limits: Limits) -> None:
    if count == 0:
        raise ServiceError(422, "no_documents", "the request names no document: send multipart field 'file' "
                           "(repeat it for several) or JSON {\"paths\": [...]}")
    if count > limits.max_documents:
        raise ServiceError(422, "too_many_documents", f"{count} documents in one job, more than the limit of "
                           f"{limits.max_documents} (OLMOCR_SERVICE_MAX_DOCUMENTS): split them into several jobs")


def inspect(name: str, data: bytes, limits: Limits) -> tuple[str, int]:
    """``(kind, pages)`` of a document, or the :class:`ServiceError` that refuses it."""
    if not data:
        raise ServiceError(422, "empty_file", f"{name} is empty (0 bytes): send the document's content")
    kind = sniff_kind(data)
    if kind is None:
        raise ServiceError(415, "unsupported_type", f"{name} is not a {accepted_names()} (judged by its "
                           "content, not its name or Content-Type): convert it to one of those first")
    pages = _pdf_pages(name, data) if kind == "pdf" else _image_pages(name, data, kind)
    if pages == 0:
        raise ServiceError(422, "bad_pdf", f"{name} is a PDF with no pages: nothing to convert")
    if pages > limits.max_pages:
        raise ServiceError(422, "too_many_pages", f"{name} has {pages} pages, more than the limit of "
                           f"{limits.max_pages} per document (OLMOCR_SERVICE_MAX_PAGES): split it, or run it "
                           "through the batch pipeline")
    return kind, pages


def _pdf_pages(name: str, data: bytes) -> int:
    import pypdfium2

    with PDFIUM_LOCK:
        try:
            doc = pypdfium2.PdfDocument(data)
        except Exception as exc:  # noqa: BLE001 - pdfium's error says why (damaged, password ...)
            raise ServiceError(422, "bad_pdf", f"{name} cannot be opened as a PDF ({exc}): send an intact, "
                               "unencrypted file") from None
        try:
            return len(doc)
        finally:
            doc.close()


def _image_pages(name: str, data: bytes, kind: str) -> int:
    """An image's pages (a TIFF's frames, counted as the pipeline counts them; a PNG or JPEG: 1), once it is
    known that the renderer can read it, or 422: ``bad_image`` for a damaged file, ``image_too_large`` for
    more pixels than the renderer takes (a decompression bomb).

    Each kind is checked as cheaply as catches damage: a PNG's ``verify()`` reads every chunk up to IEND and
    checks its CRC, without inflating the pixels; a JPEG is decoded at 1/8 scale (``draft``: libjpeg still
    reads every byte of its entropy-coded data, so a truncation or garbage fails as in a full decode); a
    TIFF's chain of frames is walked (``n_frames``), its frames decoded later by the renderer, page by page.
    CPU per 2000x2000 page (bench/image_check.py, bench/results/image_check.md; Pillow 13, 2 shared cores):
    PNG 0.07 ms (a full decode: 31 ms); JPEG 3.9 ms for a 0.5 MB text page, 13 ms for a 1.5 MB noisy one
    (full: 10 and 21 ms); TIFF 0.19 ms. Not caught: a PNG whose chunks are intact but whose compressed data
    is bad (a file crafted so); its document fails at conversion, as every damaged image did before."""
    from PIL import Image

    from olmocr.pipeline.pages.render import MAX_IMAGE_PIXELS, tiff_frame_count

    label = kind.upper()
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            if width * height > MAX_IMAGE_PIXELS:
                raise _image_too_large(name, f"{width}x{height} pixels, more than the limit of "
                                       f"{MAX_IMAGE_PIXELS:,}")
            if kind == "png":
                img.verify()
            elif kind == "jpeg":
                img.draft(img.mode, (max(1, width // 8), max(1, height // 8)))
                img.load()
        return tiff_frame_count(data) if kind == "tiff" else 1
    except ServiceError:
        raise
    except Image.DecompressionBombError as exc:  # Pillow's own guard, below ours: what the renderer meets
        raise _image_too_large(name, str(exc).split(",")[0]) from None
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types for a broken file
        raise ServiceError(422, "bad_image", f"{name} cannot be opened as a {label} ({type(exc).__name__}: "
                           f"{exc}): send an intact file") from None


def _image_too_large(name: str, why: str) -> ServiceError:
    return ServiceError(422, "image_too_large", f"{name} is too large an image to convert ({why}; a guard "
                        "against decompression bombs): send it scaled down")


def _refuse(path: str, why: str) -> ServiceError:
    return ServiceError(403, "path_not_allowed", f"{path!r}: {why}")


def confine(path: object, roots: Roots) -> str:
    """The path to read for a client-named ``path``, or a 403 when it may not be read."""
    if not isinstance(path, str) or not path.strip():
        raise ServiceError(400, "bad_request", "each path must be a non-empty string")
    path = path.strip()
    if "\x00" in path:
        raise _refuse(path, "contains a NUL character")
    if path.lower().startswith("file:"):
        raise _refuse(path, "file:// URLs are not accepted; name a path under a configured root")
    if path.startswith("s3://"):
        key = path[len("s3://"):]
        if any(part in ("..", ".") for part in key.split("/")):
            raise _refuse(path, "'..' and '.' are not allowed in a path")
        if not any(path.startswith(prefix) for prefix in roots.s3):
            raise _refuse(path, "not under a configured root (--root s3://...): ask the operator, or upload "
                          "the file instead")
        return path
    if "://" in path:
        raise _refuse(path, "only s3:// and local paths are accepted; upload the file instead")
    if any(part == ".." for part in path.replace("\\", "/").split("/")):
        raise _refuse(path, "'..' is not allowed in a path")
    if not roots.local:
        raise _refuse(path, "this service reads no local paths (no --root configured): upload the file instead")
    candidates = [path] if os.path.isabs(path) else [os.path.join(root, path) for root in roots.local]
    for candidate in candidates:
        real = os.path.realpath(candidate)
        for root in roots.local:
            if os.path.commonpath([real, root]) == root:
                return real
    raise _refuse(path, "resolves outside the configured roots (symbolic links are followed)")


def read_named(name: str, path: str, limits: Limits) -> bytes:
    """The content of a confined path, or 404/413/403 errors."""
    if not path.startswith("s3://"):
        if not os.path.isfile(path):
            raise ServiceError(404, "not_found", f"{name}: no such file under the configured roots")
        if os.path.getsize(path) > limits.max_upload_bytes:
            raise too_large(limits)
    try:
        data = read_input(path)
    except FileNotFoundError:
        raise ServiceError(404, "not_found", f"{name}: no such file or object") from None
    except OSError as exc:
        raise ServiceError(403, "path_not_allowed", f"{name}: cannot be read ({exc.strerror or exc})") from None
    except Exception as exc:  # noqa: BLE001 - S3 errors (access denied ...)
        raise ServiceError(403, "path_not_allowed", f"{name}: cannot be read ({type(exc).__name__})") from None
    if len(data) > limits.max_upload_bytes:
        raise too_large(limits)
    return data


def page_image(data: bytes, kind: str, page: int, longest: int = 1000) -> tuple[bytes, str]:
    """``(image, content type)`` of one page (1-based) for the upload page: a PNG whose longest side is at
    most ``longest`` pixels of a PDF page or a TIFF frame (browsers show no TIFF), or a PNG or JPEG document
    as it was uploaded."""
    if kind in ("png", "jpeg"):
        if page != 1:
            raise ServiceError(404, "not_found", f"an image has one page, not page {page}")
        return data, MEDIA[kind][0]
    image = _tiff_frame(data, page, longest) if kind == "tiff" else _pdf_page(data, page, longest)
    out = io.BytesIO()
    image.convert("RGB").save(out, format="PNG")
    return out.getvalue(), "image/png"


def _pdf_page(data: bytes, page: int, longest: int) -> Any:
    import pypdfium2

    with PDFIUM_LOCK:
        doc = pypdfium2.PdfDocument(data)
        try:
            if not 1 <= page <= len(doc):
                raise ServiceError(404, "not_found", f"no page {page} (the document has {len(doc)})")
            pdf_page = doc[page - 1]
            width, height = pdf_page.get_size()
            image = pdf_page.render(scale=longest / max(width, height, 1)).to_pil()
            pdf_page.close()
        finally:
            doc.close()
    return image


def _tiff_frame(data: bytes, page: int, longest: int) -> Any:
    from PIL import Image, ImageOps

    with Image.open(io.BytesIO(data)) as tiff:
        frames = int(getattr(tiff, "n_frames", 1))
        if not 1 <= page <= frames:
            raise ServiceError(404, "not_found", f"no page {page} (the TIFF has {frames} frames)")
        tiff.seek(page - 1)
        frame = ImageOps.exif_transpose(tiff).convert("RGB")
    frame.thumbnail((longest, longest))
    return frame
