"""``--retry_fallback_pages``: only the chosen fallback pages run again, and their document is rewritten in
place, written exactly once, its spans right; upstream olmOCR 0.4.27 still reads the workspace.

The stand-in answers page 3 badly the first time and well the second: the first run's ``--max_model_len``
is too small for its square page (the stand-in counts one prompt token per image patch), the retry's is not.
Page 2 cannot be rendered at all (larger than the PDF limit): it fails again when retried.
"""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

import pytest

from olmocr.pipeline.pages.output import PageResult, build_dolma_document, document_pages
from olmocr.pipeline.pages.page_retry import queue_fallback_pages, replace_pages
from olmocr.pipeline.pages.prompts import PageResponse
from olmocr.pipeline.pages.render import _job_render
from olmocr.pipeline.workspace.storage import open_storage
from tests.pipeline_helpers import docs_by_source, failures, run_pipeline
from tests.sample_docs import write_text_pdf
from tests.test_page_records import write_four_ways_pdf
from tests.test_upstream_compat import _finish, _start_upstream, upstream_python  # noqa: F401 - the fixture

pytestmark = pytest.mark.integration


def _sha16(path: Path, page: int) -> str:
    return hashlib.sha1(base64.b64decode(_job_render(str(path), "pdf", page, 1288, 0))).hexdigest()[:16]


def _results_files(ws: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((ws / "results").glob("*.jsonl"))}


def _check_spans(doc: dict) -> None:
    """Upstream's joining: each page's text plus one newline to the next, spans end to end."""
    pages = document_pages(doc)
    spans = doc["attributes"]["pdf_page_numbers"]
    assert spans[0][0] == 0 and spans[-1][1] == len(doc["text"])
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False))
    assert doc["text"] == "\n".join(p.text for p in pages)  # every page has text here
    assert doc["id"] == hashlib.sha1(doc["text"].encode()).hexdigest()


def test_retry_rewrites_the_document_once_in_place(upstream_python: Path, standin, tmp_path: Path) -> None:  # noqa: F811
    pdf = write_four_ways_pdf(tmp_path / "four.pdf")
    other = write_text_pdf(tmp_path / "other.pdf", 1)
    ws = tmp_path / "ws"
    rc, log = run_pipeline(ws, standin.url, [pdf, other], "--max_page_retries", "2", "--max_page_error_rate", "1",
                           "--max_model_len", "2800", log=tmp_path / "run1.log")
    assert rc == 0, log
    before, other_before = docs_by_source(ws)[str(pdf)], docs_by_source(ws)[str(other)]
    assert [r["fallback_kind"] for r in before["attributes"]["page_records"]] == [None, "render", "model", None]
    files_before = _results_files(ws)

    rc, log = run_pipeline(ws, standin.url, [], "--retry_fallback_pages", "model", log=tmp_path / "run2.log")
    assert rc == 0, log
    assert "--retry_fallback_pages model: 1 pages of 1 documents queued" in log, log
    docs = docs_by_source(ws)  # asserts every document once
    assert set(docs) == {str(pdf), str(other)} and docs[str(other)] == other_before
    after = docs[str(pdf)]
    pages = document_pages(after)
    records = [p.record for p in pages]
    assert [r["produced_by"] for r in records] == ["model", "fallback", "model", "model"]
    assert records[2]["attempts"] == 3 and records[2]["retried"] == 1 and records[2]["fallback_kind"] is None
    assert records[1] == before["attributes"]["page_records"][1]  # not among the reasons asked for
    for n in (1, 3, 4):  # each page holds the stand-in's reading of its own image
        assert pages[n - 1].text.startswith(f"Stand-in OCR of image {_sha16(pdf, n)}")
    assert pages[1].text == document_pages(before)[1].text == "text layer of page 2"
    old_pages = document_pages(before)
    assert [pages[i].text for i in (0, 3)] == [old_pages[i].text for i in (0, 3)]
    _check_spans(after)
    meta, old = after["metadata"], before["metadata"]
    assert meta["total-fallback-pages"] == 1
    assert meta["total-input-tokens"] > old["total-input-tokens"] > 0
    assert list(meta) == list(old) and list(after) == list(before)
    assert after["attributes"]["is_rotation_valid"] == [True, True, True, True]
    assert after["attributes"]["primary_language"] == ["en", None, "en", "en"]
    # Rewritten in place: the same results files, the document's file changed, one empty file for the ticket.
    files_after = _results_files(ws)
    changed = {name for name in files_before if files_after[name] != files_before[name]}
    assert len(changed) == 1 and [n for n in files_after if n not in files_before and files_after[n] == b""]
    assert len(files_after) == len(files_before) + 1
    assert failures(ws) == []

    # Nothing left of that reason: nothing queued. A page that cannot render falls back again.
    rc, log = run_pipeline(ws, standin.url, [], "--retry_fallback_pages", "model", log=tmp_path / "run3.log")
    assert rc == 0 and "0 pages of 0 documents queued" in log and "no work to do" in log, log
    rc, log = run_pipeline(ws, standin.url, [], "--retry_fallback_pages", "render", log=tmp_path / "run4.log")
    assert rc == 0, log
    again = docs_by_source(ws)[str(pdf)]
    assert again["text"] == after["text"]
    record = again["attributes"]["page_records"][1]
    assert record["retried"] == 1 and record["fallback_kind"] == "render" and record["produced_by"] == "fallback"

    # Upstream olmOCR 0.4.27 on the same workspace: a ticket it claims is skipped (not a PDF), the new input is
    # done, and every document is still there once.
    queued = queue_fallback_pages(open_storage(str(ws)), ["render"])
    assert queued == (1, 1)
    third = write_text_pdf(tmp_path / "third.pdf", 2)
    upstream = _start_upstream(upstream_python, ws, standin.url, "--pdfs", str(third), log=tmp_path / "upstream.log")
    _finish(upstream, tmp_path / "upstream.log")
    final = docs_by_source(ws)
    assert set(final) == {str(pdf), str(other), str(third)}
    assert final[str(pdf)] == again
    done_flags = len(list((ws / "done_flags").glob("done_*.flag")))
    assert done_flags == 1 + 2 + 1 + 1  # the first item, our two tickets, the ticket upstream skipped, its item


def _result(num: int, text: str | None, fallback: bool = False, tokens: int = 10) -> PageResult:
    language = None if fallback else "en"
    return PageResult("d.pdf", num, PageResponse(language, True, 0, num == 3, False, text), tokens, tokens // 2,
                      fallback, attempts=1, spent_input_tokens=tokens, spent_output_tokens=tokens // 2)


def test_replace_pages_keeps_upstream_joining_in_every_position() -> None:
    old = [_result(1, "one", fallback=True, tokens=0), _result(2, None), _result(3, "three", fallback=True, tokens=0),
           _result(4, "four", fallback=True, tokens=0)]
    doc = build_dolma_document("d.pdf", old)
    assert doc is not None
    # The first and the last page now answered; page 3 fell back again; page 2 (no text) untouched.
    new = replace_pages(doc, {1: _result(1, "ONE"), 4: _result(4, "FOUR"), 3: _result(3, "x", fallback=True)})
    expected = build_dolma_document("d.pdf", [_result(1, "ONE"), old[1], old[2], _result(4, "FOUR")])
    assert expected is not None
    assert new["text"] == expected["text"] == "ONE\nthree\nFOUR"
    assert new["attributes"]["pdf_page_numbers"] == expected["attributes"]["pdf_page_numbers"]
    assert new["id"] == expected["id"]
    assert new["metadata"]["total-fallback-pages"] == 1
    assert new["metadata"]["total-input-tokens"] == 10 + 10 + 10 and new["metadata"]["total-output-tokens"] == 15
    assert [r["retried"] for i, r in enumerate(new["attributes"]["page_records"]) if i != 1] == [1, 1, 1]
    assert new["attributes"]["page_records"][2]["attempts"] == 2  # 1 before, 1 now
    assert new["attributes"]["is_table"] == [False, False, True, False]


def test_retry_on_an_s3_workspace(s3_server, standin, tmp_path: Path) -> None:
    pdf = write_four_ways_pdf(tmp_path / "four.pdf")
    ws = s3_server.url("ws")
    rc, log = run_pipeline(ws, standin.url, [pdf], "--max_page_retries", "1", "--max_page_error_rate", "1",
                           "--max_model_len", "2800", log=tmp_path / "run1.log")
    assert rc == 0, log
    rc, log = run_pipeline(ws, standin.url, [], "--retry_fallback_pages", "model", log=tmp_path / "run2.log")
    assert rc == 0 and "1 pages of 1 documents queued" in log, log
    client = s3_server.client()
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=s3_server.bucket, Prefix="ws/results/")["Contents"]]
    lines = [line for k in keys for line in client.get_object(Bucket=s3_server.bucket, Key=k)["Body"].read()
             .decode().splitlines() if line.strip()]
    assert len(lines) == 1  # the document once; the ticket's results file is empty
    doc = json.loads(lines[0])
    assert [r["produced_by"] for r in doc["attributes"]["page_records"]] == ["model", "fallback", "model", "model"]
    assert document_pages(doc)[2].text.startswith(f"Stand-in OCR of image {_sha16(pdf, 3)}")
    _check_spans(doc)


def test_unknown_reason_is_one_line_and_leaves_nothing(tmp_path: Path) -> None:
    import subprocess
    import sys

    from tests.standin_helpers import REPO_ROOT, clean_env

    ws = tmp_path / "ws"
    done = subprocess.run([sys.executable, "-m", "olmocr.pipeline", str(ws), "--vllm-url", "http://127.0.0.1:9",
                           "--retry_fallback_pages", "modle"], cwd=str(REPO_ROOT), env=clean_env(),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "--retry_fallback_pages 'modle': reasons are model, refused, render, time_limit" in done.stderr
    assert not ws.exists()
