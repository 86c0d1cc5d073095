"""Fidelity: each page's text in the Dolma output is what *that page's image* shows.

The stand-in runs in reading mode (``OLMOCR_STANDIN_ANSWER=read``: Tesseract, not olmOCR, reads the image
the pipeline sent), and the documents are generated with four distinctive words per page
(tests/sample_docs.py, ``marker_pages``). The check, :func:`fidelity_problems`: every page's span
(``attributes.pdf_page_numbers``) holds all four of its own words and no word of any other page of the
run. A cropped, blank, turned or wrong-page image, or spans that point at the wrong text, fail it; the
last test shows this on a run with a blank and a wrong-page render injected.

Tesseract (Debian ``tesseract-ocr``, ``tesseract-ocr-eng``, ``tesseract-ocr-osd``) is required: without
it these tests fail under ``CI=true`` and skip in a quick local run (tests/tiers.py). Pages are rendered at
1024 px to keep Tesseract's ~0.5 CPU-s a page low on a small machine.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import pypdfium2 as pdfium
import pytest
import requests

from olmocr.pipeline.pages.render import TEST_FAULT_ENV
from olmocr.pipeline.runner import LOG_CLAIMED
from olmocr.standin import reading
from tests.pipeline_helpers import (
    StandIn,
    Standins,
    assert_every_page_once,
    docs_by_source,
    logged,
    results,
    run_pipeline,
    running_pipeline,
)
from tests.sample_docs import marker_pages, write_marked_pdf, write_marked_scan
from tests.tiers import require_tesseract

pytestmark = pytest.mark.integration

Expected = Mapping[str, Sequence[Sequence[str]]]  # source path -> each page's marker words
FAST = ("--target_longest_image_dim", "1024", "--max_page_retries", "4")


# ------------------------------------------------------------------------------------- the check
def page_texts(doc: dict) -> dict[int, str]:
    """Page number -> that page's text, cut out of the document by ``attributes.pdf_page_numbers``."""
    text = doc["text"]
    return {page: text[start:end] for start, end, page in doc["attributes"]["pdf_page_numbers"]}


def words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


def fidelity_problems(found: Mapping[str, dict], expected: Expected) -> list[str]:
    """What is wrong with the documents ``found`` (by source), page by page; [] when every page holds its
    own marker words and none of another page's."""
    owner = {w: (source, n) for source, pages in expected.items()
             for n, page_words in enumerate(pages, start=1) for w in page_words}
    problems: list[str] = []
    for source, pages in expected.items():
        name = Path(source).name
        if source not in found:
            problems.append(f"{name}: no document")
            continue
        texts = page_texts(found[source])
        if sorted(texts) != list(range(1, len(pages) + 1)):
            problems.append(f"{name}: spans for pages {sorted(texts)}, expected 1..{len(pages)}")
        for n, own in enumerate(pages, start=1):
            seen = words(texts.get(n, "")) & owner.keys()
            missing = sorted(set(own) - seen)
            if missing:
                problems.append(f"{name} page {n}: its words {missing} are missing")
            for w in sorted(seen - set(own)):
                other_source, other_page = owner[w]
                problems.append(f"{name} page {n}: holds {w!r} of {Path(other_source).name} page {other_page}")
    return problems


def test_the_check_catches_blank_swapped_and_foreign_pages() -> None:
    """The check, row by row, on hand-made documents (this runs without Tesseract)."""
    pages = marker_pages(3)

    def doc(*page_text: str) -> dict:
        text, spans = "", []
        for n, t in enumerate(page_text, start=1):
            spans.append([len(text), len(text) + len(t), n])
            text += t
        return {"text": text, "attributes": {"pdf_page_numbers": spans}}

    right = [" ".join(p) + "\n" for p in pages]
    expected = {"/d/a.pdf": pages}
    assert fidelity_problems({"/d/a.pdf": doc(*right)}, expected) == []
    assert fidelity_problems({"/d/a.pdf": doc(right[0], "", right[2])}, expected) == [
        f"a.pdf page 2: its words {sorted(pages[1])} are missing"]
    swapped = fidelity_problems({"/d/a.pdf": doc(right[1], right[0], right[2])}, expected)
    assert f"a.pdf page 1: holds {pages[1][0]!r} of a.pdf page 2" in swapped
    assert f"a.pdf page 2: holds {pages[0][0]!r} of a.pdf page 1" in swapped
    assert fidelity_problems({"/d/a.pdf": doc(right[0] + right[1], "", right[2])}, expected)[0].startswith(
        "a.pdf page 1: holds")
    assert fidelity_problems({}, expected) == ["a.pdf: no document"]
    assert fidelity_problems({"/d/a.pdf": doc(*right[:2])}, expected)[0] == (
        "a.pdf: spans for pages [1, 2], expected 1..3")


# ---------------------------------------------------------------------------------- the runs
@pytest.fixture(scope="module")
def reader(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StandIn]:
    """One stand-in in reading mode for the module (Tesseract, not olmOCR)."""
    require_tesseract()
    with Standins(tmp_path_factory.mktemp("reader")) as start:
        yield start(OLMOCR_STANDIN_ANSWER="read")


def _page_requests(standin: StandIn) -> int:
    """Completions with a page image the stand-in has answered (the pipeline's verification sends none)."""
    return int(requests.get(f"{standin.url}/admin/info", timeout=5).json()["image_requests_served"])


def _expect(paths_and_pages: Sequence[tuple[Path, Sequence[Sequence[str]]]]) -> dict[str, Sequence[Sequence[str]]]:
    return {str(path): pages for path, pages in paths_and_pages}


def _text_layer(path: Path) -> str:
    doc = pdfium.PdfDocument(str(path))
    try:
        return "".join(doc[i].get_textpage().get_text_bounded() for i in range(len(doc)))
    finally:
        doc.close()


@pytest.mark.slow
def test_pages_of_several_documents_in_one_work_item(reader: StandIn, tmp_path: Path) -> None:
    pages = marker_pages(6)
    docs = tmp_path / "docs"
    docs.mkdir()
    three = write_marked_pdf(docs / "three.pdf", pages[0:3])
    two = write_marked_pdf(docs / "two.pdf", pages[3:5])
    scan = write_marked_scan(docs / "scan.pdf", pages[5:6])
    expected = _expect([(three, pages[0:3]), (two, pages[3:5]), (scan, pages[5:6])])
    assert _text_layer(scan).strip() == "", "the scan must have no text layer: its words come from OCR"
    ws = tmp_path / "ws"
    rc, out = run_pipeline(ws, reader.url, [three, two, scan], *FAST, "--pages_per_group", "100",
                           log=tmp_path / "pipeline.log", timeout=180)
    assert rc == 0, out[-3000:]
    assert len(list((ws / "results").glob("*.jsonl"))) == 1, "the three documents were one work item"
    assert_every_page_once(ws, [three, two, scan])  # no page fell back to its text layer
    found = docs_by_source(ws)
    assert fidelity_problems(found, expected) == []
    assert found[str(scan)]["attributes"]["primary_language"] == ["en"]


@pytest.mark.slow
def test_two_pipelines_on_one_workspace(reader: StandIn, tmp_path: Path) -> None:
    pages = marker_pages(6, start=6)
    docs = tmp_path / "docs"
    docs.mkdir()
    layout = [("a", pages[0:2]), ("b", pages[2:3]), ("c", pages[3:5]), ("d", pages[5:6])]
    paths = [write_marked_pdf(docs / f"{name}.pdf", p) for name, p in layout]
    expected = _expect([(path, p) for path, (_, p) in zip(paths, layout, strict=True)])
    ws = tmp_path / "ws"
    reader.control(latency=1.0)  # one pipeline cannot finish all six work items before the other starts
    args = (ws, reader.url, paths, *FAST, "--pages_per_group", "1", "--workers", "2")
    fast_again = [lambda: reader.control(latency=0.0)]
    with (running_pipeline(*args, log=tmp_path / "pipeline-1.log", stop=fast_again) as one,
          running_pipeline(*args, log=tmp_path / "pipeline-2.log") as two):
        for run in (one, two):
            assert run.wait(240) == 0, run.output()[-3000:]
    logs = [(tmp_path / f"pipeline-{i}.log").read_text() for i in (1, 2)]
    assert all(logged(log, LOG_CLAIMED) for log in logs), "both pipelines did some of the work"
    assert_every_page_once(ws, paths)
    assert len(results(ws)) == len(paths)
    assert fidelity_problems(docs_by_source(ws), expected) == []


@pytest.mark.slow
def test_turned_pages_come_back_upright(reader: StandIn, tmp_path: Path) -> None:
    """A ``/Rotate 90`` page and pages whose content is drawn turned (90 and 180 degrees): the reading
    stand-in answers ``is_rotation_valid: False`` with the correction and no text; the words can only
    come from the image the pipeline rendered again, turned as the answer said."""
    pages = marker_pages(3, start=12)
    docs = tmp_path / "docs"
    docs.mkdir()
    rotate90 = write_marked_pdf(docs / "rotate90.pdf", pages[0:1], rotate=90)
    drawn = write_marked_pdf(docs / "drawn.pdf", pages[1:3], drawn_rotated={1: 90, 2: 180})
    expected = _expect([(rotate90, pages[0:1]), (drawn, pages[1:3])])
    ws = tmp_path / "ws"
    before = _page_requests(reader)
    rc, out = run_pipeline(ws, reader.url, [rotate90, drawn], *FAST, log=tmp_path / "pipeline.log", timeout=180)
    assert rc == 0, out[-3000:]
    # Exactly two attempts a page: the turned image, then the image turned back. A page turned the wrong way
    # on the retry (clockwise) is still wrong and needs a third; --max_page_retries 4 would let it pass.
    assert _page_requests(reader) - before == 2 * 3
    assert_every_page_once(ws, [rotate90, drawn])
    found = docs_by_source(ws)
    assert fidelity_problems(found, expected) == []
    # Each page was sent turned the way its answer asked (counter-clockwise), then read upright.
    for source, page, degrees in ((rotate90, 1, 90), (drawn, 1, 270), (drawn, 2, 180)):
        retries = [line for line in out.splitlines() if f"{source}-{page}: model says rotation is invalid" in line]
        assert len(retries) == 1 and retries[0].endswith(f"retrying rotated {degrees} degrees"), retries
    for doc in found.values():
        assert reading.TURNED_NOTE not in doc["text"]
        assert all(doc["attributes"]["is_rotation_valid"])


@pytest.mark.slow
def test_a_blank_or_wrong_page_render_fails_the_check(reader: StandIn, tmp_path: Path) -> None:
    """Negative control: the same run with page 2 rendered blank and page 3 rendered as page 1
    (``OLMOCR_TEST_RENDER_FAULT``) completes as usual, and the check names exactly those two pages."""
    pages = marker_pages(3, start=3)
    docs = tmp_path / "docs"
    docs.mkdir()
    spoiled = write_marked_pdf(docs / "spoiled.pdf", pages)
    ws = tmp_path / "ws"
    rc, out = run_pipeline(ws, reader.url, [spoiled], *FAST, log=tmp_path / "pipeline.log", timeout=180,
                           env={TEST_FAULT_ENV: "blank:spoiled:2,wrongpage:spoiled:3"})
    assert rc == 0, out[-3000:]
    assert_every_page_once(ws, [spoiled])  # nothing in the pipeline's own checks notices
    problems = fidelity_problems(docs_by_source(ws), _expect([(spoiled, pages)]))
    assert problems == [
        f"spoiled.pdf page 2: its words {sorted(pages[1])} are missing",
        f"spoiled.pdf page 3: its words {sorted(pages[2])} are missing",
        *(f"spoiled.pdf page 3: holds {w!r} of spoiled.pdf page 1" for w in sorted(pages[0])),
    ]
