"""The pipeline CLI end to end against the stand-in server on 127.0.0.1, over generated sample PDFs."""

from __future__ import annotations

import base64
import datetime
import hashlib
import io
import re
from pathlib import Path

import pytest
from PIL import Image

from olmocr.pipeline.pages.output import markdown_text
from olmocr.pipeline.pages.render import _job_render
from olmocr.pipeline.servers.checks import LOG_NO_OLMOCR_MODEL, MODEL_NAME
from tests.pipeline_helpers import (
    SAMPLES,
    SMALL_DOCS,
    StandIn,
    Standins,
    _close_cached_render_docs,  # noqa: F401 - autouse fixture
    docs_by_source,
    failures,
    logged,
    page_count,
    results,
    run_pipeline,
    standin,  # noqa: F401 - fixture
)
from tests.sample_docs import bad_inputs

pytestmark = pytest.mark.timeout(240)


def _image_sha16(path: Path, page: int, rotation: int = 0) -> str:
    return hashlib.sha1(base64.b64decode(_job_render(str(path), "pdf", page, 1288, rotation))).hexdigest()[:16]


def _image_size(path: Path, page: int, rotation: int = 0) -> tuple[int, int]:
    return Image.open(io.BytesIO(base64.b64decode(_job_render(str(path), "pdf", page, 1288, rotation)))).size


def test_output_schema_spans_order_and_markdown(standin: StandIn, tmp_path: Path) -> None:  # noqa: F811
    ws = tmp_path / "ws"
    rc, log = run_pipeline(ws, standin.url + "/v1", SMALL_DOCS, "--pages_per_group", "3", "--markdown",
                           log=tmp_path / "run.log")
    assert rc == 0, log
    docs = docs_by_source(ws)
    assert set(docs) == {str(p) for p in SMALL_DOCS}
    assert failures(ws) == []
    today = datetime.datetime.now().strftime("%Y-%m-%d")
    for source, doc in docs.items():
        n = page_count(Path(source))
        assert list(doc) == ["id", "text", "source", "added", "created", "metadata", "attributes"]
        assert doc["id"] == hashlib.sha1(doc["text"].encode()).hexdigest()
        assert doc["source"] == "olmocr" and doc["added"] == today and doc["created"] == today
        meta = doc["metadata"]
        assert meta["Source-File"] == source and meta["olmocr-version"].startswith("0.4.27+olmocrserve.")
        assert meta["producer"] == "olmocr-serve"
        assert meta["pdf-total-pages"] == n and meta["total-fallback-pages"] == 0
        assert meta["total-input-tokens"] > 0 and meta["total-output-tokens"] > 0
        attrs = doc["attributes"]
        for key in ("primary_language", "is_rotation_valid", "rotation_correction", "is_table", "is_diagram"):
            assert len(attrs[key]) == n, key
        spans = attrs["pdf_page_numbers"]
        # Contiguous spans covering the text, one per page, in page order.
        assert [s[2] for s in spans] == list(range(1, n + 1))
        assert spans[0][0] == 0 and spans[-1][1] == len(doc["text"])
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False))
        for start, end, page in spans:
            # The stand-in names the image it was sent: each span holds its own page's image.
            assert f"Stand-in OCR of image {_image_sha16(Path(source), page)}" in doc["text"][start:end]
            if page < n:
                assert doc["text"][end - 1] == "\n"
        md = ws / "markdown" / (source.lstrip("/")[: -len(".pdf")] + ".md")
        # The markdown keeps the page breaks (olmocr/pipeline/pages/output.py): the Dolma text, pages apart.
        assert md.read_text() == markdown_text(doc)
        assert md.read_text().replace("\n\n<!-- page ", "\n<!-- page ").count("<!-- page ") == n - 1
    assert re.search(r"workspace (\d+)/\1 pages \(100\.0%\), 0 remaining, .* ETA 0s \| this process \d+ pages, "
                     r"[\d.]+ pages/s", log), log
    assert "finished in" in log


def test_rotation_retries_rotate_counter_clockwise(tmp_path: Path, standins: Standins) -> None:
    s = standins(OLMOCR_STANDIN_ROTATION="landscape")
    ws = tmp_path / "ws"
    pdf = SAMPLES.letter_rotated
    rc, log = run_pipeline(ws, s.url, [pdf], log=tmp_path / "run.log")
    assert rc == 0, log
    doc = docs_by_source(ws)[str(pdf)]
    # The page renders landscape (/Rotate 90); the stand-in asks for 90 degrees; the accepted answer is for
    # the image turned counter-clockwise by 90.
    width, height = _image_size(pdf, 1, 90)
    assert height == 1288 and width < height
    assert f"image {_image_sha16(pdf, 1, 90)} ({width}x{height})" in doc["text"]
    assert doc["attributes"]["is_rotation_valid"] == [True]
    assert doc["metadata"]["total-fallback-pages"] == 0
    assert "rotation is invalid" in log


def test_fallback_to_text_layer_after_retries(tmp_path: Path, standins: Standins) -> None:
    s = standins(OLMOCR_STANDIN_ANSWER="garbage")
    ws = tmp_path / "ws"
    pdf = SAMPLES.letter
    rc, log = run_pipeline(ws, s.url, [pdf], "--max_page_retries", "3", "--max_page_error_rate", "1",
                           log=tmp_path / "run.log")
    assert rc == 0, log
    doc = docs_by_source(ws)[str(pdf)]
    assert doc["metadata"]["total-fallback-pages"] == 1
    assert doc["metadata"]["total-input-tokens"] == 0
    assert "Edgar" in doc["text"] and "Stand-in" not in doc["text"]
    assert doc["attributes"]["primary_language"] == [None]
    assert "no usable answer after 3 attempts" in log


def test_document_over_error_rate_is_failed_then_retried(tmp_path: Path, standins: Standins) -> None:
    ws = tmp_path / "ws"
    pdfs = [SAMPLES.letter, SAMPLES.report]
    s = standins(OLMOCR_STANDIN_ANSWER="garbage")
    rc, log = run_pipeline(ws, s.url, pdfs, "--max_page_retries", "2", log=tmp_path / "run1.log")
    assert rc == 1 and "nothing written: all 2 documents this run finished failed" in log, log  # (#28)
    assert results(ws) == []
    failed = failures(ws)
    assert sorted(f["source"] for f in failed) == sorted(map(str, pdfs))
    assert all(f["retryable"] for f in failed)
    assert all("max_page_error_rate" in f["reason"] for f in failed)
    # Next run, the model behaves: the failed documents are retried and written.
    s.control(answer="ok")
    rc, log = run_pipeline(ws, s.url, (), log=tmp_path / "run2.log")
    assert rc == 0, log
    docs = docs_by_source(ws)
    assert set(docs) == set(map(str, pdfs))
    assert all(d["metadata"]["total-fallback-pages"] == 0 for d in docs.values())


def test_wrong_model_fails_fast_before_claiming(tmp_path: Path, standins: Standins) -> None:
    s = standins(served_model_name="some-other-model")
    ws = tmp_path / "ws"
    rc, log = run_pipeline(ws, s.url, [SAMPLES.letter], timeout=60, log=tmp_path / "run.log")
    assert rc != 0
    assert logged(log, LOG_NO_OLMOCR_MODEL, MODEL_NAME, "some-other-model", MODEL_NAME), log
    locks = ws / "worker_locks"
    assert not locks.exists() or not any(locks.iterdir())
    assert results(ws) == []


def test_bad_inputs_each_fail_with_a_reason_and_the_batch_completes(standin: StandIn, tmp_path: Path) -> None:  # noqa: F811
    good = SAMPLES.letter
    src = tmp_path / "in"
    src.mkdir()
    bad = bad_inputs(good)
    for name, (content, _) in bad.items():
        (src / name).write_bytes(content)
    image = src / "scan.png"
    Image.new("RGB", (800, 600), "white").save(image)
    inputs = [good, image, *(src / n for n in bad)]
    rc, log = run_pipeline(tmp_path / "ws", standin.url, inputs, "--pages_per_group", "4", log=tmp_path / "run.log")
    assert rc == 0, log
    docs = docs_by_source(tmp_path / "ws")
    assert set(docs) == {str(good), str(image)}
    assert docs[str(image)]["metadata"]["pdf-total-pages"] == 1
    failed = {f["source"]: f for f in failures(tmp_path / "ws")}
    assert set(failed) == {str(src / n) for n in bad}
    for name, (_, reason) in bad.items():
        path = str(src / name)
        assert reason in failed[path]["reason"], failed[path]
        assert failed[path]["retryable"] is False
        lines = [line for line in log.splitlines() if "document failed" in line and path in line]
        assert len(lines) == 1, (name, lines)


def test_api_key_from_environment_as_bearer_and_never_logged(tmp_path: Path, standins: Standins) -> None:
    key = "s3cr3t-key-for-test"
    s = standins(VLLM_API_KEY=key)
    rc, log = run_pipeline(tmp_path / "ws", s.url, [SAMPLES.letter], env={"OLMOCR_API_KEY": key},
                           log=tmp_path / "run.log")
    assert rc == 0, log
    assert len(results(tmp_path / "ws")) == 1
    rc2, log2 = run_pipeline(tmp_path / "ws2", s.url, [SAMPLES.letter], "--api_key", "wrong",
                             timeout=60, log=tmp_path / "run2.log")
    assert rc2 != 0 and "rejected the API key" in log2
    assert key not in log and key not in log2


def test_stats_summarises_the_workspace(standin: StandIn, tmp_path: Path) -> None:  # noqa: F811
    import subprocess
    import sys

    ws = tmp_path / "ws"
    rc, log = run_pipeline(ws, standin.url, [SAMPLES.letter], log=tmp_path / "run.log")
    assert rc == 0, log
    out = subprocess.run([sys.executable, "-m", "olmocr.pipeline", str(ws), "--stats"], capture_output=True,
                         text=True, timeout=60, check=True).stdout
    assert out.strip()


def test_unreachable_server_gives_a_clear_error(tmp_path: Path) -> None:
    from tests.standin_helpers import free_port

    url = f"http://127.0.0.1:{free_port()}/v1/"
    rc, log = run_pipeline(tmp_path / "ws", url, [SAMPLES.letter], "--max_server_ready_timeout", "3",
                           timeout=60, log=tmp_path / "run.log")
    assert rc == 1
    # Said at the first attempt: a 3 s wait is 3 attempts (1 s, then 2 s apart), not the default 10 over 243 s.
    assert "Cannot reach the vLLM server" in log and "up to 3 attempts over 3s" in log, log
    locks = tmp_path / "ws" / "worker_locks"
    assert not locks.exists() or not any(locks.iterdir())


@pytest.mark.parametrize("status", ["429", "503"])
def test_busy_or_failing_server_does_not_use_up_page_attempts(tmp_path: Path, status: str, standins: Standins) -> None:
    s = standins(OLMOCR_STANDIN_ERROR_RATE="0.4", OLMOCR_STANDIN_ERROR_STATUS=status)
    docs = [SAMPLES.letter, SAMPLES.guide]
    # One attempt per page: if a 429/5xx counted as a failed attempt, pages would fall back.
    rc, log = run_pipeline(tmp_path / "ws", s.url, docs, "--max_page_retries", "1", log=tmp_path / "run.log")
    assert rc == 0, log
    found = docs_by_source(tmp_path / "ws")
    assert set(found) == set(map(str, docs))
    assert all(d["metadata"]["total-fallback-pages"] == 0 for d in found.values())
    assert f"HTTP {status}" in log
