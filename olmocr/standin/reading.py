"""The stand-in's reading mode: OCR of the page image with **Tesseract, not olmOCR**.

With ``answer: read`` (``OLMOCR_STANDIN_ANSWER=read`` or ``--answer read``) the stand-in answers each page
with what Debian's Tesseract (``tesseract-ocr`` + ``tesseract-ocr-eng`` + ``tesseract-ocr-osd``) reads on
the image it was sent, in olmOCR's YAML front-matter format. It checks the *plumbing* -- that page 3's
answer came from page 3's image, upright, not blank or cropped -- and says nothing about olmOCR's quality.

Per image (PNG or JPEG, sniffed from its first bytes):

1. orientation detection: ``tesseract - - --psm 0 -l osd`` gives ``Rotate: R`` (degrees *clockwise* that
   turn the image upright) and a confidence. olmOCR's ``rotation_correction`` is the angle the pipeline
   turns the image *counter-clockwise* on the next attempt, so a confident ``R != 0`` answers
   ``is_rotation_valid: False``, ``rotation_correction: (360 - R) % 360`` and **no text**: a turned page
   is not read, so a pipeline that ignored the answer would write no words of the page (the fidelity
   tests rely on it). Below :data:`MIN_OSD_CONFIDENCE`, or with too little text for OSD, the page counts
   as upright.
2. text: ``tesseract - - --psm 3 -l eng``. ``primary_language`` is ``en`` when it read a word, else
   null (a blank page); ``is_table`` and ``is_diagram`` are always False (Tesseract does not say).

Binary or binding -- measured here (2 shared cores, Tesseract 5.3.0, four 1288-px letter pages, OSD + OCR
each, ``OMP_THREAD_LIMIT=1``): the Debian binary, two processes per page, 3.5 CPU-s (0.88 s a page, of
which ~0.3 s is two process starts and model loads); the PyPI binding ``tesserocr`` 2.13 with the models
kept loaded, 1.7 CPU-s (0.43 s a page). The binary is used anyway, because

* the binding's wheel brings its own Tesseract (5.5.4) and Leptonica, so the answers would not come from
  the Debian package CI installs, and it read "resuits" where the binary read "results" on the same page;
* in-process it can take the server down: loading ``eng+osd`` in one ``PyTessBaseAPI`` ended the
  process with ``std::out_of_range`` / ``abort()``, where a failing binary costs one answer;
* an API object is not thread-safe (the stand-in answers on many threads: one object per slot), and
  the stand-in stays stdlib-only;
* 0.45 s a page matters little at the fidelity tests' dozen small pages, and ``bench/run reading``
  reports the reading stand-in's pages/s so that nobody takes it for a model.

Tesseract's ``stdin`` input falls back to reading a *list of file names* when the bytes are not an image
it knows; only bytes that start like a PNG or a JPEG are piped to it. At most :func:`default_slots`
Tesseract processes run at once (the rest wait, counted as running requests, like a GPU's batch), each
with ``OMP_THREAD_LIMIT=1`` and a timeout.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import threading
from dataclasses import dataclass

from olmocr.server.errors import TesseractMissing

__all__ = ["LABEL", "Reader", "Reading", "TesseractMissing", "find_tesseract"]

#: Shown wherever reading-mode answers appear (logs, /admin/info, the completion's system_fingerprint).
LABEL = "Tesseract, not olmOCR"
INSTALL_HINT = "apt-get install tesseract-ocr tesseract-ocr-eng tesseract-ocr-osd"
#: Tesseract's orientation confidence below which a page counts as upright. Measured on letter pages at
#: 1288 px: upright and confidently turned pages score 10-15; an 11-pt page turned 90 degrees scored 0.2
#: with the direction wrong half the time (ocrmypdf's default threshold is 14, for a one-shot decision).
MIN_OSD_CONFIDENCE = 5.0
#: What a turned page's answer says instead of its text.
TURNED_NOTE = "(Tesseract stand-in: the page is turned; rotation_correction says how to turn it back)"
TIMEOUT_S = 120.0
REQUIRED_LANGS = ("eng", "osd")

_ROTATE = re.compile(r"^Rotate:\s*(\d+)\s*$", re.MULTILINE)
_CONFIDENCE = re.compile(r"^Orientation confidence:\s*([0-9.]+)\s*$", re.MULTILINE)
_WORD = re.compile(r"[A-Za-z]{2,}")


@dataclass(frozen=True)
class Reading:
    """What Tesseract made of one image, as olmOCR's front-matter fields plus the text."""

    primary_language: str | None
    is_rotation_valid: bool
    rotation_correction: int
    text: str

    def answer(self) -> str:
        """The olmOCR answer: YAML front matter (the five fields, in olmOCR's order), then the text."""
        language = self.primary_language if self.primary_language else "null"
        return ("---\n"
                f"primary_language: {language}\n"
                f"is_rotation_valid: {self.is_rotation_valid}\n"
                f"rotation_correction: {self.rotation_correction}\n"
                "is_table: False\n"
                "is_diagram: False\n"
                "---\n"
                f"{self.text}")


# ------------------------------------------------------------------------------- pure decisions
def parse_osd(output: str) -> tuple[int, float] | None:
    """``(Rotate, Orientation confidence)`` from ``tesseract --psm 0`` output; None when absent."""
    rotate = _ROTATE.search(output)
    confidence = _CONFIDENCE.search(output)
    if rotate is None or confidence is None:
        return None
    return int(rotate.group(1)) % 360, float(confidence.group(1))


def rotation_answer(osd: tuple[int, float] | None, min_confidence: float = MIN_OSD_CONFIDENCE) -> tuple[bool, int]:
    """``(is_rotation_valid, rotation_correction)`` from OSD's clockwise ``Rotate`` and its confidence."""
    if osd is None:
        return True, 0
    rotate, confidence = osd
    if rotate not in (90, 180, 270) or confidence < min_confidence:
        return True, 0
    return False, (360 - rotate) % 360


def primary_language(text: str) -> str | None:
    """``en`` when Tesseract (English model) read at least one word, else None (a blank page)."""
    return "en" if _WORD.search(text) else None


def is_image(data: bytes) -> bool:
    """PNG or JPEG by signature: the only bytes handed to Tesseract's stdin (see the module docstring)."""
    return data[:8] == b"\x89PNG\r\n\x1a\n" or data[:3] == b"\xff\xd8\xff"


def default_slots() -> int:
    """Tesseract processes at once: the CPUs this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


# ----------------------------------------------------------------------------------------- I/O
def find_tesseract() -> tuple[str, str]:
    """``(path, version)`` of a Tesseract with English and OSD data; :class:`TesseractMissing` if not."""
    path = shutil.which("tesseract")
    if path is None:
        raise TesseractMissing(f"tesseract is not installed ({INSTALL_HINT})")
    try:
        langs = subprocess.run([path, "--list-langs"], capture_output=True, text=True, timeout=30)
        version = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise TesseractMissing(f"{path} does not run ({exc}); reinstall it ({INSTALL_HINT})") from None
    listed = set((langs.stdout + langs.stderr).split())
    absent = [lang for lang in REQUIRED_LANGS if lang not in listed]
    if absent:
        raise TesseractMissing(f"tesseract has no {'/'.join(absent)} data ({INSTALL_HINT})")
    first = (version.stdout or version.stderr).strip().splitlines()
    return path, (first[0] if first else "tesseract")


class Reader:
    """Runs Tesseract on page images, at most ``slots`` at once. Thread-safe."""

    def __init__(self, path: str, version: str, slots: int | None = None, timeout: float = TIMEOUT_S) -> None:
        self.path = path
        self.version = version
        self.timeout = timeout
        self._slots = threading.BoundedSemaphore(slots or default_slots())
        self._env = {**os.environ, "OMP_THREAD_LIMIT": "1"}

    @classmethod
    def find(cls, slots: int | None = None) -> Reader:
        path, version = find_tesseract()
        return cls(path, version, slots)

    @property
    def label(self) -> str:
        return f"{self.version} ({LABEL})"

    def _run(self, data: bytes, *args: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([self.path, "stdin", "stdout", *args], input=data, capture_output=True,
                              env=self._env, timeout=self.timeout, check=False)

    def read(self, data: bytes) -> Reading:
        """Read one PNG/JPEG image. Raises ValueError for other bytes, RuntimeError when Tesseract fails."""
        if not is_image(data):
            raise ValueError("not a PNG or JPEG image")
        with self._slots:
            try:
                osd = self._run(data, "--psm", "0", "-l", "osd")
                # rc 1 with "Too few characters" is a page with too little text to orient: upright.
                valid, correction = rotation_answer(parse_osd(osd.stdout.decode("utf-8", "replace")))
                if not valid:
                    return Reading(None, False, correction, TURNED_NOTE)
                ocr = self._run(data, "--psm", "3", "-l", "eng")
            except subprocess.TimeoutExpired:
                raise RuntimeError(f"tesseract took over {self.timeout:g} s") from None
        if ocr.returncode != 0:
            tail = ocr.stderr.decode("utf-8", "replace").strip().splitlines()[-1:]
            raise RuntimeError(f"tesseract exited {ocr.returncode}: {' '.join(tail)}")
        text = ocr.stdout.decode("utf-8", "replace").replace("\f", "").strip()
        return Reading(primary_language(text), True, 0, text)
