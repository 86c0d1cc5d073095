"""Issue 29: a workspace queued from a sample shows an estimated total until its items are counted, then the
exact one, and says which in the progress line, ``--stats`` and ``/metrics`` (a real pipeline run against
the stand-in, ``--stats`` in a subprocess, ``/metrics`` scraped while it runs)."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from olmocr.pipeline.workspace import queue as queue_module
from olmocr.pipeline.workspace.queue import WorkQueue
from olmocr.pipeline.workspace.storage import open_storage
from olmocr.pipeline.workspace.totals import APPROX_MARK, ESTIMATED_NOTE, PageTotals, eta_text, pages_text
from tests.metrics_helpers import parse_metrics
from tests.pdf_builders import text_pdf
from tests.pipeline_helpers import launch_standin, running_pipeline
from tests.standin_helpers import REPO_ROOT, clean_env, free_port

ESTIMATED_GAUGE = "olmocr_pipeline_workspace_pages_estimated{}"
PAGES = [1, 1, 1, 1, 4, 4, 4, 4]  # 20 pages; a sample of 3 sizes 8 documents at 8, 16, 24 or 32: never 20
TRUE_TOTAL = sum(PAGES)


def _note(counted: int, items: int) -> str:
    return ESTIMATED_NOTE.format(counted=counted, items=items)


@pytest.mark.parametrize(("totals", "pages", "eta"), [
    (PageTotals(total=500, done=120, items=10, items_done=3, rate=2.0),
     "120/500 pages (24.0%), 380 remaining", "3m 10s"),
    (PageTotals(total=500, done=120, items=10, items_done=3, rate=2.0, estimated_items=7),
     f"120/~500 pages (24.0%; {_note(3, 10)}), ~380 remaining", "~3m 10s"),
    (PageTotals(total=500, done=120, items=10, items_done=3, rate=None, unknown_items=2, estimated_items=1),
     f"120/~500 pages (24.0%; {_note(7, 10)}), ~380 remaining", "unknown"),
    (PageTotals(total=500, done=500, items=10, items_done=10, rate=2.0, estimated_items=1),
     f"500/~500 pages (100.0%; {_note(9, 10)}), ~0 remaining", "0s"),
])
def test_figures_are_marked_while_estimated_and_plain_when_exact(totals: PageTotals, pages: str, eta: str) -> None:
    assert (pages_text(totals), eta_text(totals)) == (pages, eta)


def _queue_from_a_sample(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, int]:
    """8 documents queued the way the pipeline queues them, with a sample of 3 (instead of 100): the
    estimate path of ``populate``, at a size a test can run. Returns the workspace and its item count."""
    folder = tmp_path / "docs"
    folder.mkdir()
    paths = []
    for i, n in enumerate(PAGES):
        path = folder / f"doc{i}.pdf"
        path.write_bytes(text_pdf([f"document {i} page {p}" for p in range(n)]))
        paths.append(str(path))
    ws = tmp_path / "ws"
    monkeypatch.setattr(queue_module, "SAMPLE_SIZE", 3)
    added = WorkQueue(open_storage(str(ws))).populate(paths, pages_per_group=4)
    assert added >= 3
    return ws, added


def _stats(ws: Path) -> str:
    out = subprocess.run([sys.executable, "-m", "olmocr.pipeline", str(ws), "--stats"], capture_output=True,
                         text=True, timeout=60, cwd=REPO_ROOT, env=clean_env())
    assert out.returncode == 0, out.stderr
    return out.stdout


def _scrape(port: int) -> dict[str, float] | None:
    try:
        response = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
    except requests.ConnectionError:
        return None
    response.raise_for_status()
    return parse_metrics(response.text)


PROGRESS = re.compile(r"workspace (\d+)/(~?)([\d,]+) pages \([\d.]+%(?:; estimated: (\d+) of (\d+) items counted)?\), "
                      r"(~?)[\d,]+ remaining, .*?ETA (\S+)")


@pytest.mark.slow
@pytest.mark.integration
def test_estimated_until_counted_then_exact_in_the_progress_line_stats_and_metrics(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ws, items = _queue_from_a_sample(tmp_path, monkeypatch)
    before = _stats(ws)
    estimate = re.search(rf"Progress: 0/{re.escape(APPROX_MARK)}([\d,]+) pages \(0\.0%; "
                         rf"{re.escape(_note(0, items))}\), {re.escape(APPROX_MARK)}[\d,]+ remaining", before)
    assert estimate, before
    assert int(estimate.group(1).replace(",", "")) != TRUE_TOTAL

    standin = launch_standin(tmp_path, env={"OLMOCR_STANDIN_LATENCY": "0.3", "OLMOCR_STANDIN_CONCURRENCY": "1"})
    port = free_port()
    scrapes: list[dict[str, float]] = []
    # --follow: the pipeline stays up once every item is done, so /metrics can be read after the last count.
    with running_pipeline(ws, standin.url, (), "--follow", "--workers", "1", "--max_concurrent_requests", "1",
                          "--progress_interval", "0.5", "--metrics_port", str(port), log=tmp_path / "run.log",
                          stop=[standin]) as run:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            got = _scrape(port)
            if got is not None and ESTIMATED_GAUGE in got:
                scrapes.append(got)
                if got[ESTIMATED_GAUGE] == 0 and got["olmocr_pipeline_workspace_pages{state=remaining}"] == 0:
                    break
            assert run.poll() is None, run.output()[-3000:]
            time.sleep(0.2)
        run.wait_log(f"workspace {TRUE_TOTAL}/{TRUE_TOTAL} pages (100.0%), 0 remaining", 30, "the exact last line")
        log = run.output()
    assert scrapes and scrapes[0][ESTIMATED_GAUGE] == 1, scrapes[:1]
    assert scrapes[-1][ESTIMATED_GAUGE] == 0, scrapes[-1]
    assert scrapes[-1]["olmocr_pipeline_workspace_pages{state=total}"] == TRUE_TOTAL

    lines = PROGRESS.findall(log)
    assert len(lines) >= 3, log[-3000:]
    first, last = lines[0], lines[-1]
    assert first[1] == APPROX_MARK and first[3] == "0" and first[4] == str(items), first  # marked, none counted
    assert first[5] == APPROX_MARK
    counted = [int(line[3]) for line in lines if line[3]]
    assert counted == sorted(counted), counted  # counting only moves forward
    assert any(0 < n < items for n in counted), counted  # partly counted along the way
    assert last[1:6] == ("", f"{TRUE_TOTAL:,}", "", "", ""), last  # exact: no mark, no note
    marked_etas = [line[6] for line in lines if line[1] and line[6] not in ("unknown", "0s")]
    assert marked_etas and all(eta.startswith(APPROX_MARK) for eta in marked_etas), marked_etas

    after = _stats(ws)
    assert re.search(rf"Progress: {TRUE_TOTAL}/{TRUE_TOTAL} pages \(100\.0%\), 0 remaining, workspace", after), after
    progress = next(line for line in after.splitlines() if line.startswith("Progress:"))
    assert "estimated" not in progress and APPROX_MARK not in progress, progress
