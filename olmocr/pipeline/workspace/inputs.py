"""Expand ``--pdfs`` arguments into document paths; recognise files by content, not by extension.

Accepted specs:

* a local file (PDF, PNG or JPEG by content);
* a local glob, e.g. ``'docs/*.pdf'`` or ``'corpus/**/*.pdf'`` (``**`` is recursive);
* ``s3://bucket/key`` or an S3 glob ``s3://bucket/prefix/*.pdf`` (as upstream, ``*`` in an S3 glob also
  matches ``/``; ``**/`` matches zero or more folders);
* a ``.txt`` file (by name, and not itself a PDF/image by content) listing one spec per line (local paths,
  globs or ``s3://`` paths; blank lines and lines starting with ``#`` are ignored).

Local paths are stored absolute, so a later run (a retry) works from any directory. Queueing reads no
``s3://`` document: what a file is, is learnt when a worker opens it (a non-document becomes a failed
document then); only explicit ``.txt`` lists are read, a line at a time, and their ``s3://`` paths are taken
as named. :func:`iter_inputs` yields paths as they are listed (the pipeline queues from it in bounded memory). Archives (``.tar``, ``.tar.gz``, ``.tgz``, by name)
are one work item each (olmocr.pipeline.workspace.archives).
"""

from __future__ import annotations

import glob
import os
import re
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from olmocr.pipeline.workspace.storage import get_object_bytes, make_s3_client, parse_s3_url

SNIFF_BYTES = 1024
_GLOB_CHARS = re.compile(r"[*?\[]")


@dataclass(frozen=True)
class InputProblem:
    """One problem with an input spec.

    ``path`` is None when nothing exists (missing path, glob matching nothing). When ``path`` is set the
    file exists but is not a PDF/PNG/JPEG: it is ALSO returned in the document list so the pipeline records
    a failed-document record for it (sniff again with :func:`sniff_kind` when processing).
    """

    spec: str
    reason: str
    path: str | None = None

    def __str__(self) -> str:
        return self.reason


ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz")


def is_archive(path: str) -> bool:
    """A tarball of documents (by name, as upstream): one work item, its members processed as documents."""
    return path.lower().endswith(ARCHIVE_SUFFIXES)


#: Every kind :func:`sniff_kind` returns: what the pipeline accepts (olmocr-service names them from here).
KINDS = ("pdf", "png", "jpeg", "tiff")


def sniff_kind(data: bytes) -> str | None:
    """One of :data:`KINDS`: ``"pdf"`` (``%PDF`` in the first 1024 bytes), ``"png"``, ``"jpeg"``, ``"tiff"``;
    or None."""
    head = data[:SNIFF_BYTES]
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if b"%PDF" in head:
        return "pdf"
    # --- TIFF (issue #30; rendered in olmocr/pipeline/pages/render.py): classic or BigTIFF, either byte order
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff"
    # --- end TIFF
    return None


def not_a_document_reason(path: str, data: bytes) -> str:
    """The one-line reason recorded for a file that is not a PDF/PNG/JPEG."""
    if not data:
        return f"not a PDF or image: {path} is empty"
    return f"not a PDF or image: {path} (no %PDF header in the first {SNIFF_BYTES} bytes, not PNG/JPEG)"


_client_lock = threading.Lock()
_clients: dict[tuple[str | None, str | None, str | None], Any] = {}
#: The AWS profile for reading inputs (upstream's ``--pdf_profile``); None: the default credentials.
_input_profile: str | None = None


def set_input_profile(profile: str | None) -> None:
    """Read ``s3://`` inputs with this AWS profile from now on (process-wide, as upstream's ``pdf_s3``)."""
    global _input_profile
    _input_profile = profile


def s3_client() -> Any:
    """A shared boto3 client for the current endpoint settings (boto3 clients are thread-safe)."""
    key = (os.environ.get("AWS_ENDPOINT_URL_S3"), os.environ.get("AWS_ENDPOINT_URL"), _input_profile)
    with _client_lock:
        client = _clients.get(key)
        if client is None:
            client = _clients[key] = make_s3_client(_input_profile)
        return client


def read_input(path: str) -> bytes:
    """Whole content of a local path or ``s3://bucket/key`` (raises FileNotFoundError if absent)."""
    if path.startswith("s3://"):
        from botocore.exceptions import ClientError

        bucket, key = parse_s3_url(path)
        try:
            return get_object_bytes(s3_client(), Bucket=bucket, Key=key)[0]
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                raise FileNotFoundError(path) from exc
            raise
    with open(path, "rb") as f:
        return f.read()


def read_head(path: str, size: int = SNIFF_BYTES) -> bytes:
    """The first ``size`` bytes of a local or S3 file."""
    if path.startswith("s3://"):
        bucket, key = parse_s3_url(path)
        return get_object_bytes(s3_client(), Bucket=bucket, Key=key, Range=f"bytes=0-{size - 1}")[0]
    with open(path, "rb") as f:
        return f.read(size)


def count_pages(path: str, data: bytes | None = None) -> int:
    """Cheap page count: PDF pages via pypdfium2, images 1, unreadable or not-a-document 1. ``data``: the
    content of an ``s3://`` path, already read."""
    try:
        if path.startswith("s3://"):
            data = read_input(path) if data is None else data
            kind = sniff_kind(data)  # type: ignore[arg-type]
        else:
            data = path
            kind = sniff_kind(read_head(path))
        # --- TIFF (issue #30): one page per frame
        if kind == "tiff":
            from olmocr.pipeline.pages.render import tiff_frame_count

            return max(1, tiff_frame_count(data if isinstance(data, bytes) else path))
        # --- end TIFF
        if kind != "pdf":
            return 1
        import pypdfium2

        doc = pypdfium2.PdfDocument(data)
        try:
            return max(1, len(doc))
        finally:
            doc.close()
    except Exception:
        return 1


def count_pages_many(paths: list[str], readers: int = 16) -> list[int]:
    """:func:`count_pages` of each path: S3 documents are read ``readers`` at a time (as many requests as
    one by one, a sixteenth of the wait; at most ``readers`` held at once), then counted one by one (pdfium
    is not thread-safe)."""

    def fetch(path: str) -> bytes | None:
        if not path.startswith("s3://"):
            return None
        try:
            return read_input(path)
        except Exception:  # counted as 1 page, as count_pages does
            return b""

    counts: list[int] = []
    with ThreadPoolExecutor(max_workers=readers) as pool:
        for start in range(0, len(paths), readers):
            chunk = paths[start : start + readers]
            counts += [count_pages(p, d) for p, d in zip(chunk, pool.map(fetch, chunk), strict=True)]
    return counts


def _s3_glob_regex(pattern: str) -> re.Pattern[str]:
    """Upstream-compatible S3 glob: ``*`` and ``?`` match any character including ``/``; ``**/`` may match
    nothing; ``[...]`` is a character class."""
    out: list[str] = []
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern[i] == "*":
            out.append(".*")
            i += 1
        elif pattern[i] == "?":
            out.append(".")
            i += 1
        elif pattern[i] == "[" and "]" in pattern[i + 1 :]:
            end = pattern.index("]", i + 1)
            body = pattern[i + 1 : end]
            if body.startswith("!"):
                body = "^" + body[1:]
            out.append(f"[{body}]")
            i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z", re.DOTALL)


def _iter_s3(spec: str, problems: list[InputProblem]) -> Iterator[str]:
    """The objects an S3 path or glob names, a listing page at a time."""
    bucket, key = parse_s3_url(spec)
    client = s3_client()
    match = _GLOB_CHARS.search(key)
    if match is None:
        from botocore.exceptions import ClientError

        try:
            client.head_object(Bucket=bucket, Key=key)
            yield f"s3://{bucket}/{key}"
            return
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchKey", "NotFound"):
                raise
        listing = client.list_objects_v2(Bucket=bucket, Prefix=key.rstrip("/") + "/", MaxKeys=1)
        if listing.get("KeyCount", 0):
            problems.append(InputProblem(spec, f"{spec} is an S3 folder, not a file; use a glob such as "
                                               f"'{spec.rstrip('/')}/**/*.pdf'"))
        else:
            problems.append(InputProblem(spec, f"no such S3 object: {spec}"))
        return
    regex = _s3_glob_regex(key)
    found = 0
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key[: match.start()]):
        for obj in page.get("Contents", []):
            if not obj["Key"].endswith("/") and regex.match(obj["Key"]):
                found += 1
                yield f"s3://{bucket}/{obj['Key']}"
    if not found:
        problems.append(InputProblem(spec, f"S3 glob matched no objects: {spec}"))


def _iter_local(spec: str, problems: list[InputProblem]) -> Iterator[str]:
    if _GLOB_CHARS.search(spec):
        found = 0
        for p in glob.iglob(os.path.expanduser(spec), recursive=True):
            if os.path.isfile(p):
                found += 1
                yield os.path.abspath(p)
        if not found:
            problems.append(InputProblem(spec, f"glob matched no files: {spec}"))
        return
    path = os.path.normpath(os.path.expanduser(spec))
    if os.path.isdir(path):
        problems.append(InputProblem(spec, f"{spec} is a directory; use a glob such as '{suggest_pattern(path)}'"))
    elif not os.path.exists(path):
        problems.append(InputProblem(spec, f"no such file: {spec}"))
    else:
        yield os.path.abspath(path)


#: Extensions a folder's documents usually have, in the order a suggestion prefers them.
_DOC_EXTENSIONS = (".pdf", ".png", ".jpg", ".jpeg", ".tar.gz", ".tgz", ".tar")


def suggest_pattern(folder: str, look_at: int = 2000) -> str:
    """A glob for the documents in ``folder``: ``folder/**/*.pdf``, or the extension most of its files
    have (``folder/**/*.png`` for a folder of scans), ``folder/**/*`` when they are mixed."""
    seen: dict[str, int] = {}
    looked = 0
    for _dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            lower = name.lower()
            ext = next((e for e in _DOC_EXTENSIONS if lower.endswith(e)), None)
            if ext is not None:
                seen[ext] = seen.get(ext, 0) + 1
            looked += 1
        if looked >= look_at:
            break
    folder = folder.rstrip("/")
    if not seen or ".pdf" in seen and len(seen) == 1:
        return f"{folder}/**/*.pdf"
    if len(seen) == 1:
        return f"{folder}/**/*{next(iter(seen))}"
    return f"{folder}/**/*"


def expand_inputs(specs: list[str]) -> tuple[list[str], list[InputProblem]]:
    """Sorted, de-duplicated document paths, and one problem per bad spec/file (all of :func:`iter_inputs`,
    held; the pipeline queues from :func:`iter_inputs` itself, in bounded memory)."""
    problems: list[InputProblem] = []
    return sorted(set(iter_inputs(specs, problems))), problems


#: Local files sniffed together (16 threads).
SNIFF_BATCH = 256


def iter_inputs(specs: Iterable[str], problems: list[InputProblem], _depth: int = 0) -> Iterator[str]:
    """Document paths, as they are listed: an S3 glob a listing page at a time, a local glob as the folders
    are read, a list file a line at a time. Not sorted, and a path named twice comes twice (the queue drops
    repeats). Problems are appended to ``problems`` as they are found.

    Files that exist but are not PDF/PNG/JPEG are reported as problems *with* ``path`` set and are also
    yielded, so that they end up as failed-document records in the workspace. Queueing reads no S3 document
    (a request each): only local files and explicit lists are sniffed; an S3 path in a list file is taken
    as named (no HEAD: a list of ten million paths would cost ten million requests), and a missing one
    becomes a failed document when a worker opens it, as upstream.
    """
    batch: list[tuple[str, str, bool]] = []
    with ThreadPoolExecutor(max_workers=16) as pool:
        for spec in specs:
            spec = spec.strip()
            if not spec or (_depth and spec.startswith("#")):
                continue
            explicit = not _GLOB_CHARS.search(spec)
            if _depth and explicit and spec.startswith("s3://") and not spec.lower().endswith(".txt"):
                yield spec
                continue
            try:
                for path in _iter_s3(spec, problems) if spec.startswith("s3://") else _iter_local(spec, problems):
                    if is_archive(path) or (path.startswith("s3://") and not (explicit and path.lower().endswith(".txt"))):
                        yield path
                        continue
                    batch.append((path, spec, explicit))
                    if len(batch) >= SNIFF_BATCH:
                        yield from _sniffed(pool, batch, problems, _depth)
                        batch = []
            except Exception as exc:  # S3 errors, permissions
                problems.append(InputProblem(spec=spec, reason=f"cannot read {spec}: {type(exc).__name__}: {exc}"))
        yield from _sniffed(pool, batch, problems, _depth)


def _sniff(path: str) -> tuple[bytes | None, str | None]:
    try:
        return read_head(path), None
    except Exception as exc:
        return None, f"cannot read {path}: {type(exc).__name__}: {exc}"


def _sniffed(pool: ThreadPoolExecutor, batch: list[tuple[str, str, bool]], problems: list[InputProblem],
             depth: int) -> Iterator[str]:
    """The documents of ``batch`` (sniffed together); lists among them are read, non-documents reported."""
    for (path, spec, explicit), (head, error) in zip(batch, pool.map(_sniff, [p for p, _, _ in batch]), strict=True):
        if head is None:
            problems.append(InputProblem(spec=spec, reason=error or f"cannot read {path}"))
        elif sniff_kind(head) is not None:
            yield path
        elif path.lower().endswith(".txt") and explicit and depth < 2:
            yield from _list_file(path, spec, problems, depth)
        else:
            problems.append(InputProblem(spec=spec, reason=not_a_document_reason(path, head), path=path))
            yield path


def _list_lines(path: str) -> Iterator[str]:
    """The lines of a local or S3 list file, read as they come (never held whole)."""
    if path.startswith("s3://"):
        bucket, key = parse_s3_url(path)
        body = s3_client().get_object(Bucket=bucket, Key=key)["Body"]
        for raw in body.iter_lines():
            yield raw.decode("utf-8")
        return
    with open(path, encoding="utf-8") as f:
        yield from f


def _list_file(path: str, spec: str, problems: list[InputProblem], depth: int) -> Iterator[str]:
    lines = 0

    def entries() -> Iterator[str]:
        nonlocal lines
        for line in _list_lines(path):
            line = line.strip()
            if line and not line.startswith("#"):
                lines += 1
                yield line

    try:
        yield from iter_inputs(entries(), problems, depth + 1)
    except Exception as exc:
        problems.append(InputProblem(spec=spec, reason=f"cannot read path list {path}: {exc}"))
        return
    if not lines:
        problems.append(InputProblem(spec=spec, reason=f"path list {path} is empty"))
