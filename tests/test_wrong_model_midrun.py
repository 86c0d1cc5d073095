"""A server that comes back serving the wrong model name (a misconfigured restart) costs no page attempts:
the pipeline waits until ``/v1/models`` lists ``olmocr`` again, as for any outage."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.pdf_builders import text_pdf
from tests.pipeline_helpers import docs_by_source, launch_standin, running_pipeline

pytestmark = pytest.mark.timeout(120)


@pytest.mark.slow
def test_wrong_model_mid_run_waits_instead_of_burning_attempts(tmp_path: Path) -> None:
    docs = []
    for i in range(3):
        path = tmp_path / f"doc{i}.pdf"
        path.write_bytes(text_pdf([f"doc {i} page {p}" for p in range(3)]))
        docs.append(path)
    standin = launch_standin(tmp_path, env={"OLMOCR_STANDIN_LATENCY": "0.5", "OLMOCR_STANDIN_CONCURRENCY": "1"})
    log = tmp_path / "run.log"
    # One attempt per page: a 404 counted as a failed attempt would make pages fall back.
    with running_pipeline(tmp_path / "ws", standin.url, docs, "--max_page_retries", "1", log=log,
                          stop=[standin]) as run:
        run.wait_log("claimed work item", 60, "work claimed")
        standin.control(served_model_name="not-olmocr")
        # Until pages have met the wrong model (on a loaded machine rendering may outlast a fixed pause).
        run.wait_log("model 'olmocr' not served", 60)
        time.sleep(2)
        standin.control(served_model_name="olmocr")
        rc = run.wait(90)
    text = log.read_text()
    assert rc == 0, text
    found = docs_by_source(tmp_path / "ws")
    assert set(found) == set(map(str, docs))
    assert all(d["metadata"]["total-fallback-pages"] == 0 for d in found.values())
