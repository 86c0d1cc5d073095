"""Fast checks of the pipeline's contracts: prompt, front matter, request, Dolma, markdown paths, rendering."""

from __future__ import annotations

import base64
import hashlib
import io
import json

import pytest
from PIL import Image

import olmocr
from olmocr.pipeline.errors import FrontMatterError, RenderError
from olmocr.pipeline.pages.output import PageResult, build_dolma_document, markdown_relpath
from olmocr.pipeline.pages.page import TEMPERATURE_BY_ATTEMPT, request_template
from olmocr.pipeline.pages.prompts import PROMPT_V4_YAML, PageResponse, parse_page_response
from olmocr.pipeline.pages.render import _job_probe, _job_render, _job_text
from olmocr.pipeline.servers.client import normalize_base_url
from tests.pipeline_helpers import SAMPLES

UPSTREAM_PROMPT = (
    "Attached is one page of a document that you must process. Just return the plain text representation of "
    "this document as if you were reading it naturally. Convert equations to LateX and tables to HTML.\n"
    "If there are any figures or charts, label them with the following markdown syntax ![Alt text describing "
    "the contents of the figure](page_startx_starty_width_height.png)\n"
    "Return your output as markdown, with a front matter section on top specifying values for the "
    "primary_language, is_rotation_valid, rotation_correction, is_table, and is_diagram parameters."
)

GOOD = (
    "---\nprimary_language: en\nis_rotation_valid: True\nrotation_correction: 0\nis_table: False\n"
    "is_diagram: false\n---\nHello world\n"
)


def test_prompt_is_upstream_v4_byte_for_byte() -> None:
    assert PROMPT_V4_YAML == UPSTREAM_PROMPT
    assert hashlib.sha256(PROMPT_V4_YAML.encode()).hexdigest() == hashlib.sha256(UPSTREAM_PROMPT.encode()).hexdigest()


def test_parse_good_answer() -> None:
    r = parse_page_response(GOOD)
    assert r == PageResponse("en", True, 0, False, False, "Hello world")


@pytest.mark.parametrize("lang", ["no", "false", "yes", "null", "''"])
def test_yaml_boolean_or_empty_language_means_none(lang: str) -> None:
    r = parse_page_response(GOOD.replace("primary_language: en", f"primary_language: {lang}"))
    assert r.primary_language is None


def test_front_matter_only_answer_has_no_text() -> None:
    r = parse_page_response(GOOD.replace("Hello world\n", ""))
    assert r.natural_text is None


@pytest.mark.parametrize(
    "content",
    [
        "Just text, no front matter",
        GOOD.replace("is_table: False\n", ""),  # missing field
        GOOD.replace("is_diagram: false\n", "is_diagram: false\nextra: 1\n"),  # extra field
        GOOD.replace("rotation_correction: 0", "rotation_correction: 45"),
        GOOD.replace("is_table: False", "is_table: 3"),
        "---\n[unclosed\n---\ntext",
    ],
)
def test_invalid_front_matter_is_rejected(content: str) -> None:
    with pytest.raises(FrontMatterError):
        parse_page_response(content)


def test_rotation_as_string_and_bool_strings() -> None:
    r = parse_page_response(GOOD.replace("rotation_correction: 0", "rotation_correction: '270'")
                            .replace("is_rotation_valid: True", "is_rotation_valid: 'false'"))
    assert r.rotation_correction == 270 and r.is_rotation_valid is False


def test_request_matches_upstream_fields() -> None:
    before, after = request_template(0.3, guided=False)
    body = json.loads(before + base64.b64encode(b"png") + after)
    assert body["model"] == "olmocr" and body["max_tokens"] == 8000 and body["temperature"] == 0.3
    (message,) = body["messages"]
    assert message["role"] == "user"
    text, image = message["content"]
    assert text == {"type": "text", "text": UPSTREAM_PROMPT}
    assert image == {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(b"png").decode()}}
    assert "guided_regex" not in body and "structured_outputs" not in body
    # Guided decoding: structured_outputs for current vLLM, guided_regex (upstream's field) for old ones.
    guided = json.loads(b"".join((*request_template(0.1, guided=True)[:1], b"x", request_template(0.1, True)[1])))
    assert guided["structured_outputs"]["regex"].startswith("---\\nprimary_language")
    assert "guided_regex" not in guided
    before, after = request_template(0.1, True, guided_field="guided_regex", max_tokens=797)
    old = json.loads(before + b"x" + after)
    assert old["guided_regex"].startswith("---\\nprimary_language") and "structured_outputs" not in old
    assert old["max_tokens"] == 797
    assert TEMPERATURE_BY_ATTEMPT == (0.1, 0.1, 0.2, 0.3, 0.5, 0.8, 0.9, 1.0)


@pytest.mark.parametrize("url", ["http://h:1", "http://h:1/", "http://h:1/v1", "http://h:1/v1/", " h:1/v1 "])
def test_base_url_with_or_without_v1(url: str) -> None:
    assert normalize_base_url(url) == "http://h:1"


def _page(num: int, text: str | None, fallback: bool = False) -> PageResult:
    return PageResult("s3://b/doc.pdf", num, PageResponse("en", True, 0, False, num == 2, text), 10, 5, fallback)


def test_dolma_document_spans_and_fields() -> None:
    doc = build_dolma_document("s3://b/doc.pdf", [_page(1, "one"), _page(2, None), _page(3, "three", True)])
    assert doc is not None
    assert doc["text"] == "one\nthree"
    assert doc["id"] == hashlib.sha1(b"one\nthree").hexdigest()
    assert doc["attributes"]["pdf_page_numbers"] == [[0, 4, 1], [4, 4, 2], [4, 9, 3]]
    assert doc["attributes"]["is_diagram"] == [False, True, False]
    assert doc["source"] == "olmocr"
    assert doc["metadata"] == {
        "Source-File": "s3://b/doc.pdf", "olmocr-version": f"0.4.27+olmocrserve.{olmocr.__version__}",
        "pdf-total-pages": 3, "total-input-tokens": 30, "total-output-tokens": 15, "total-fallback-pages": 1,
        "producer": "olmocr-serve", "producer-version": olmocr.__version__,
    }
    assert list(doc) == ["id", "text", "source", "added", "created", "metadata", "attributes"]
    assert build_dolma_document("x.pdf", [_page(1, None)]) is None


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("/data/in/a.pdf", "markdown/data/in/a.md"),
        ("s3://bucket/x/y/b.pdf", "markdown/x/y/b.md"),
        ("../../etc/passwd.pdf", "markdown/etc/passwd.md"),
        ("/a/../../b/./c.pdf", "markdown/a/b/c.md"),
        ("s3://bucket/../../up.pdf", "markdown/up.md"),
        ("/x/archive.tar.gz::inner/d.pdf", "markdown/archive/inner/d.md"),
        ("plain.png", "markdown/plain.png.md"),  # not a PDF: the full name (no clash with plain.jpg)
    ],
)
def test_markdown_path_guard(source: str, expected: str) -> None:
    assert markdown_relpath(source) == expected


def _png_size(b64: bytes) -> tuple[int, int]:
    return Image.open(io.BytesIO(base64.b64decode(b64))).size


def test_render_longest_side_and_rotate_flag() -> None:
    upright = _png_size(_job_render(str(SAMPLES.letter), "pdf", 1, 1288, 0))
    assert max(upright) == 1288 and upright[1] > upright[0]
    # /Rotate 90 is honoured: the page renders landscape ...
    rotated = _png_size(_job_render(str(SAMPLES.letter_rotated), "pdf", 1, 1288, 0))
    assert rotated[0] == 1288 and rotated[0] > rotated[1]
    # ... and a rotation correction turns the image counter-clockwise.
    corrected = _png_size(_job_render(str(SAMPLES.letter_rotated), "pdf", 1, 1288, 90))
    assert corrected == (rotated[1], rotated[0])
    assert max(_png_size(_job_render(str(SAMPLES.letter), "pdf", 1, 500, 0))) == 500


def test_image_input_is_one_page(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "scan.jpg"
    Image.new("RGB", (300, 600), "white").save(path, format="JPEG")
    assert _job_probe(str(path), "jpeg").page_count == 1
    assert _png_size(_job_render(str(path), "jpeg", 1, 1288, 0)) == (644, 1288)
    assert _job_text(str(path), "jpeg", 1) == ""


def test_text_layer_fallback_text() -> None:
    assert "Edgar" in _job_text(str(SAMPLES.letter), "pdf", 1)


def test_bad_pdfs_have_clear_reasons(tmp_path) -> None:  # type: ignore[no-untyped-def]
    data = (SAMPLES.letter).read_bytes()
    trunc = tmp_path / "t.pdf"
    trunc.write_bytes(data[: len(data) // 2])
    junk = tmp_path / "j.pdf"
    junk.write_bytes(b"%PDF-1.4\n" + bytes(range(256)) * 40 + b"\n%%EOF\n")
    with pytest.raises(RenderError, match="truncated"):
        _job_probe(str(trunc), "pdf")
    with pytest.raises(RenderError, match="corrupt"):
        _job_probe(str(junk), "pdf")
