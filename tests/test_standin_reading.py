"""The stand-in's reading mode (olmocr/standin/reading.py: Tesseract, not olmOCR).

The decisions are pure functions, tested row by row without Tesseract; the server tests need Tesseract
(fail under CI=true, skip locally without it: tests/tiers.py).
"""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from olmocr.pipeline.pages.prompts import GUIDED_REGEX, parse_page_response
from olmocr.standin import reading
from tests.pipeline_helpers import Standins
from tests.sample_docs import marker_pages, write_marked_pdf
from tests.standin_helpers import REPO_ROOT, chat_payload, clean_env, free_port
from tests.tiers import require_tesseract

OSD_TURNED = """Page number: 0
Orientation in degrees: 90
Rotate: 270
Orientation confidence: 10.78
Script: Latin
Script confidence: 3.10
"""


@pytest.mark.parametrize(("output", "parsed"), [
    (OSD_TURNED, (270, 10.78)),
    ("Rotate: 0\nOrientation confidence: 13.7\n", (0, 13.7)),
    ("Too few characters. Skipping this page\n", None),  # a blank page: OSD has nothing to go on
    ("", None),
])
def test_parse_osd(output: str, parsed: tuple[int, float] | None) -> None:
    assert reading.parse_osd(output) == parsed


@pytest.mark.parametrize(("osd", "answer"), [
    (None, (True, 0)),               # no orientation found: upright
    ((0, 14.0), (True, 0)),
    ((270, 10.8), (False, 90)),      # text turned clockwise (a /Rotate 90 page): turn back 90 ccw
    ((90, 11.0), (False, 270)),      # text turned counter-clockwise: 270 ccw
    ((180, 11.5), (False, 180)),
    ((90, 0.2), (True, 0)),          # too unsure to ask for a turn
    ((90, reading.MIN_OSD_CONFIDENCE), (False, 270)),
])
def test_rotation_answer(osd: tuple[int, float] | None, answer: tuple[bool, int]) -> None:
    assert reading.rotation_answer(osd) == answer


@pytest.mark.parametrize(("text", "language"), [("Walrus lantern", "en"), ("", None), ("| . 7 _", None)])
def test_primary_language(text: str, language: str | None) -> None:
    assert reading.primary_language(text) == language


def test_only_png_or_jpeg_reaches_tesseract() -> None:
    # Tesseract reads non-image stdin as a list of file names to open: nothing else is handed to it.
    assert reading.is_image(b"\x89PNG\r\n\x1a\n....")
    assert reading.is_image(b"\xff\xd8\xff\xe0....")
    assert not reading.is_image(b"/etc/passwd\n")
    assert not reading.is_image(b"")


@pytest.mark.parametrize("page", [
    reading.Reading("en", True, 0, "Walrus Lantern\n\nsecond paragraph"),
    reading.Reading(None, True, 0, ""),
    reading.Reading(None, False, 90, reading.TURNED_NOTE),
])
def test_answers_are_what_the_pipeline_parses(page: reading.Reading) -> None:
    """The answer is olmOCR's front matter: the pipeline's parser reads back every field, and it matches
    the regex guided decoding would hold the model to."""
    import re

    answer = page.answer()
    assert re.fullmatch(GUIDED_REGEX, answer) or answer.endswith("---\n")
    parsed = parse_page_response(answer)
    assert (parsed.primary_language, parsed.is_rotation_valid, parsed.rotation_correction) == (
        page.primary_language, page.is_rotation_valid, page.rotation_correction)
    assert (parsed.is_table, parsed.is_diagram) == (False, False)
    assert parsed.natural_text == (page.text or None)


# ------------------------------------------------------------------------------- with Tesseract
def _need_tesseract() -> None:
    require_tesseract()


def _page_png(tmp_path: Path, words: tuple[str, ...], *, turn: int = 0) -> bytes:
    import pypdfium2 as pdfium
    from PIL import Image

    pdf = write_marked_pdf(tmp_path / "page.pdf", [words])
    doc = pdfium.PdfDocument(str(pdf))
    try:
        image = doc[0].render(scale=1024 / 792).to_pil()
    finally:
        doc.close()
    if turn:
        image = image.transpose(Image.Transpose.ROTATE_90)  # text turned 90 degrees counter-clockwise
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.integration
def test_reading_standin_answers_what_the_image_shows(tmp_path: Path, standins: Standins) -> None:
    _need_tesseract()
    words = marker_pages(1)[0]
    standin = standins(OLMOCR_STANDIN_ANSWER="read")
    url = f"{standin.url}/v1/chat/completions"
    upright = requests.post(url, json=chat_payload(_page_png(tmp_path, words)), timeout=120).json()
    content = upright["choices"][0]["message"]["content"]
    assert reading.LABEL in upright["system_fingerprint"]
    parsed = parse_page_response(content)
    assert parsed.is_rotation_valid and parsed.primary_language == "en"
    assert all(w.capitalize() in parsed.natural_text for w in words)

    turned = requests.post(url, json=chat_payload(_page_png(tmp_path, words, turn=90)), timeout=120).json()
    parsed = parse_page_response(turned["choices"][0]["message"]["content"])
    assert (parsed.is_rotation_valid, parsed.rotation_correction) == (False, 270)
    assert parsed.natural_text == reading.TURNED_NOTE  # a turned page is not read

    # A probe without an image is answered at once, as in canned mode; so is a 1-token request.
    probe = requests.post(url, json={"model": "olmocr", "max_tokens": 1,
                                     "messages": [{"role": "user", "content": "Reply with one word."}]},
                          timeout=10)
    assert probe.status_code == 200
    info = requests.get(f"{standin.url}/admin/info", timeout=10).json()
    assert reading.LABEL in info["answers_by"]
    assert "Tesseract, not olmOCR" in standin.log.read_text()


def test_reading_mode_without_tesseract_is_one_line_and_exit_2(tmp_path: Path) -> None:
    """``--answer read`` where Tesseract is missing: one line naming the packages, exit status 2."""
    env = clean_env({"PATH": str(tmp_path)})  # a PATH without tesseract (the stand-in is started by full path)
    proc = subprocess.run([sys.executable, "-m", "olmocr.standin", "serve", "m", "--port", str(free_port()),
                           "--answer", "read"], env=env, cwd=str(REPO_ROOT), capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2
    errors = [line for line in proc.stdout.splitlines() + proc.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and reading.INSTALL_HINT in errors[0]
    assert "Traceback" not in proc.stdout + proc.stderr
