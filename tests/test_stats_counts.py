"""``--stats`` counts true after retries: documents and pages once each, tokens summed from the results.

A known workspace made by two real runs against the stand-in: the first writes ``a.pdf`` and fails
``b.pdf`` (its square pages' answers are all over ``--max_model_len``: more fallback pages than
``--max_page_error_rate``, a retryable failure); the second retries ``b.pdf`` and writes it.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from olmocr.pipeline.stats import true_page_totals
from tests.pipeline_helpers import docs_by_source, failures, run_pipeline
from tests.sample_docs import write_text_pdf
from tests.standin_helpers import REPO_ROOT, clean_env

pytestmark = pytest.mark.integration


def test_totals_after_a_retry_exactly(standin, tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    a = write_text_pdf(folder / "a.pdf", 2)
    b = write_text_pdf(folder / "b.pdf", 2, size=(792, 792))
    ws = tmp_path / "ws"
    rc, log = run_pipeline(ws, standin.url, [a, b], "--pages_per_group", "2", "--max_page_retries", "1",
                           "--max_model_len", "2800", log=tmp_path / "run1.log")
    assert rc == 0, log
    assert set(docs_by_source(ws)) == {str(a)} and [f["source"] for f in failures(ws)] == [str(b)]
    rc, log = run_pipeline(ws, standin.url, log=tmp_path / "run2.log")  # the retry item: b.pdf
    assert rc == 0, log
    docs = docs_by_source(ws)
    assert set(docs) == {str(a), str(b)}

    out = subprocess.run([sys.executable, "-m", "olmocr.pipeline", str(ws), "--stats"], cwd=str(REPO_ROOT),
                         env=clean_env(), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    tokens_in = sum(d["metadata"]["total-input-tokens"] for d in docs.values())
    tokens_out = sum(d["metadata"]["total-output-tokens"] for d in docs.values())
    assert tokens_in > 4 * 1000 and tokens_out > 4 * 500
    assert "Work items: 3 total, 3 done, 0 in progress, 0 pending" in text, text
    assert "Documents: 2 queued, 2 with results, 0 failed (0 will be retried by the next run)" in text, text
    assert "Pages: 4 in results, 0 fallback pages (0.0%)" in text, text
    assert re.search(r"^Progress: 4/4 pages \(100\.0%\), 0 remaining", text, re.M), text  # not 6/6
    assert f"Tokens: {tokens_in} input, {tokens_out} output" in text, text
    # Answers per server: every attempt answered (run 1: 2 for a, 2 failed for b; run 2: 2 for b).
    assert re.search(rf"{re.escape(standin.url)}: 6 answers, .* in 2 runs", text), text


def test_progress_counts_a_retry_items_pages_once() -> None:
    index = {"orig": ("a.pdf", "b.pdf"), "retry1": ("b.pdf",), "retry2": ("b.pdf",)}
    pages = {"orig": 5, "retry1": 2, "retry2": 2}
    assert true_page_totals(index, pages, {"orig", "retry1"}, None).as_dict()["pages_total"] == 5
    # b.pdf still to do (its second retry): its 2 pages are not done yet.
    pending = true_page_totals(index, pages, {"orig", "retry1"}, 0.5)
    assert (pending.total, pending.done, pending.remaining, pending.eta_seconds) == (5, 3, 2, 4.0)
    assert true_page_totals(index, pages, {"orig", "retry1", "retry2"}, None).done == 5
    # An item without a stored count (queued by upstream) is estimated at the mean of the known ones.
    unknown = true_page_totals({"x": ("x.pdf",), "y": ("y.pdf",)}, {"x": 4}, set(), None)
    assert (unknown.total, unknown.unknown_items) == (8, 1)
