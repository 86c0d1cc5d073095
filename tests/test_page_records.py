"""A record for every page: how it was produced and why it fell back, in the results, ``--stats`` and /metrics.

One real run against the stand-in on a document whose pages each end differently: page 1 answered by the
model, page 2 too big to render, page 3 never answered well (every answer over ``--max_model_len``: the
stand-in counts one prompt token per image patch, and a square page has more patches than a portrait one),
page 4 stuck in the renderer past ``--render_timeout``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from olmocr.pipeline.stats import FallbackPage, ResultTotals, format_fallback_pages, result_totals
from olmocr.pipeline.workspace.queue import WorkQueue
from olmocr.pipeline.workspace.storage import open_storage
from tests.metrics_helpers import parse_metrics
from tests.pipeline_helpers import docs_by_source, running_pipeline, wait_for
from tests.sample_docs import write_text_pdf
from tests.standin_helpers import REPO_ROOT, clean_env, free_port

pytestmark = pytest.mark.integration

MAX_MODEL_LEN = 2800  # a letter page's request and answer fit (~2,550 tokens), a square page's do not (~3,030)


def write_four_ways_pdf(path: Path) -> Path:
    from fpdf import FPDF

    pdf = FPDF(unit="pt", format=(612, 792))
    pdf.set_auto_page_break(False)
    for number, size in ((1, (612, 792)), (2, (612, 20000)), (3, (792, 792)), (4, (612, 792))):
        pdf.add_page(format=size)
        pdf.set_font("Helvetica", size=11)
        pdf.multi_cell(0, 15, f"text layer of page {number}")
    path.write_bytes(bytes(pdf.output()))
    return path


def _metrics(port: int) -> dict[str, float] | None:
    import requests

    try:
        return parse_metrics(requests.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text)
    except requests.ConnectionError:
        return None


def test_every_fallback_page_with_its_reason_in_results_stats_and_metrics(standin, tmp_path: Path) -> None:
    doc = write_four_ways_pdf(tmp_path / "four.pdf")
    held = write_text_pdf(tmp_path / "held.pdf", 1)
    ws = tmp_path / "ws"
    # Another (live) pipeline holds an item: this one waits for it once its own work is written, and its
    # /metrics stays up to be read.
    other = WorkQueue(open_storage(str(ws)), worker_id="other-host-1-x", lease_seconds=600)
    other.populate([str(held)])
    claimed = other.claim()
    assert claimed is not None
    port = free_port()
    with running_pipeline(ws, standin.url, [doc], "--max_page_retries", "2", "--max_page_error_rate", "1",
                          "--max_model_len", str(MAX_MODEL_LEN), "--render_timeout", "3", "--metrics_port",
                          str(port), env={"OLMOCR_TEST_RENDER_FAULT": "hang-render:four:4"},
                          log=tmp_path / "run.log") as run:
        wait_for(lambda: (ws / "results").is_dir() and any((ws / "results").iterdir()) or run.poll() is not None,
                 120, "the document to be written")
        assert run.poll() is None, run.output()[-3000:]
        scraped = _metrics(port)
        assert scraped is not None
        os.kill(run.pid, signal.SIGTERM)
        assert run.wait(60) == 0, run.output()[-3000:]
    other.release(claimed)

    by_reason = {k: v for k, v in scraped.items() if k.startswith("olmocr_pipeline_pages_fallback_by_reason")}
    assert by_reason == {"olmocr_pipeline_pages_fallback_by_reason_total{reason=model}": 1,
                         "olmocr_pipeline_pages_fallback_by_reason_total{reason=refused}": 0,
                         "olmocr_pipeline_pages_fallback_by_reason_total{reason=render}": 1,
                         "olmocr_pipeline_pages_fallback_by_reason_total{reason=time_limit}": 1}
    assert scraped["olmocr_pipeline_pages_fallback_total{}"] == 3

    written = docs_by_source(ws)[str(doc)]
    records = written["attributes"]["page_records"]
    assert [r["page"] for r in records] == [1, 2, 3, 4]
    assert [r["produced_by"] for r in records] == ["model", "fallback", "fallback", "fallback"]
    assert [r["fallback_kind"] for r in records] == [None, "render", "model", "time_limit"]
    assert [r["attempts"] for r in records] == [1, 0, 2, 0]
    one, two, three, four = records
    assert one["input_tokens"] > 1000 and one["output_tokens"] > 500 and one["primary_language"] == "en"
    assert one["input_tokens"] == written["metadata"]["total-input-tokens"]  # the only answer used
    assert "enormous page 2" in two["fallback_reason"]
    assert ("no usable model answer after 2 attempts (last: finish_reason=stop" in three["fallback_reason"]
            and f"(--max_model_len {MAX_MODEL_LEN})" in three["fallback_reason"])
    assert three["input_tokens"] > 2 * 2000  # both attempts cost tokens, though neither answer was used
    assert three["primary_language"] is None  # a fallback has no front matter of the model's
    assert "render time limit" in four["fallback_reason"]
    # Upstream's fields are as they were.
    assert written["metadata"]["total-fallback-pages"] == 3
    assert written["attributes"]["is_rotation_valid"] == [True] * 4

    stats = subprocess.run([sys.executable, "-m", "olmocr.pipeline", str(ws), "--stats"], cwd=str(REPO_ROOT),
                           env=clean_env(), capture_output=True, text=True, timeout=60)
    assert stats.returncode == 0, stats.stderr
    assert "Fallback pages (3; by reason: model 1, render 1, time_limit 1)" in stats.stdout, stats.stdout
    assert f"  {doc} page 2 [render]: page 2: " in stats.stdout
    assert f"  {doc} page 3 [model]: page 3: no usable model answer after 2 attempts" in stats.stdout
    assert f"  {doc} page 4 [time_limit]: page 4: " in stats.stdout


def test_stats_lists_the_first_n_then_a_count() -> None:
    totals = ResultTotals(fallback=[FallbackPage("a.pdf", n, "model", f"page {n}: x") for n in range(1, 8)])
    lines = format_fallback_pages(totals, listed=3)
    assert lines == ["Fallback pages (7; by reason: model 7):", "  a.pdf page 1 [model]: page 1: x",
                     "  a.pdf page 2 [model]: page 2: x", "  a.pdf page 3 [model]: page 3: x", "  ... and 4 more"]


def test_upstream_documents_count_fallback_pages_without_naming_them() -> None:
    upstream = {"text": "x", "metadata": {"Source-File": "u.pdf", "pdf-total-pages": 3, "total-input-tokens": 9,
                                          "total-output-tokens": 4, "total-fallback-pages": 2}, "attributes": {}}
    totals = result_totals([upstream, json.loads(json.dumps(upstream))])  # the same document twice: once
    assert (totals.documents, totals.pages, totals.input_tokens, len(totals.fallback)) == (1, 3, 9, 2)
    assert totals.fallback[0] == FallbackPage("u.pdf", None, None, None)
