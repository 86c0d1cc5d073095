"""Cancel of a running job (issue #32): the worker holding the job's item drops the pages not yet started;
pages in flight finish; finished documents stay readable; nobody redoes the item.

Real HTTP on loopback: ``python -m olmocr.service`` without workers, a ``--follow`` pipeline (as on another
machine) doing the work against the stand-in, local and moto-S3 workspaces."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import requests

from olmocr.service.jobs import CANCEL_DROPPED_REASON
from tests.pipeline_helpers import SAMPLES, StandIn, start_pipeline
from tests.standin_helpers import stop_process_group
from tests.test_service import running_service
from tests.waiting import wait_for


def pages_served(standin: StandIn) -> int:
    return int(requests.get(f"{standin.url}/admin/info", timeout=10).json()["image_requests_served"])


@pytest.mark.slow
def test_cancel_of_a_running_job_drops_pages_not_started(workspace: str, standin: StandIn, tmp_path: Path) -> None:
    """One page at a time at a slow server: cancelled after its first pages, the job's other pages never
    reach the server, the item is done once, and a later worker does not redo it."""
    standin.control(latency=1.0)
    docs = [SAMPLES.letter, SAMPLES.manual, SAMPLES.guide]  # 1 + 6 + 3 pages
    plog = tmp_path / "pipeline.log"
    follower = None
    with running_service(workspace, None, tmp_path / "service.log") as svc:
        try:
            follower = start_pipeline(workspace, standin.url, (), "--follow", "--workers", "1",
                                      "--max_concurrent_requests", "1", log=plog)
            job = svc.submit(*docs).json()
            assert job["pages_total"] == 10
            wait_for(lambda: pages_served(standin) >= 2, 90, "two of the job's pages answered")
            r = requests.delete(f"{svc.url}/v1/jobs/{job['id']}", timeout=30)
            assert r.status_code == 200, r.text
            at_cancel = pages_served(standin)
            assert r.json()["state"] == "cancelled"

            def finished() -> dict | None:
                status = svc.get(f"/v1/jobs/{job['id']}").json()
                return status if all(d["outcome"] != "pending" for d in status["documents"]) else None

            status = wait_for(finished, 60, "the cancelled job's item completed by its worker")
            served = pages_served(standin)
            # After the cancel only the page at the server and those started before the worker's next look
            # (every 2 s, at 1 s a page: 3; 4 under load) reach the server; never all 10.
            assert served <= at_cancel + 4 and served < 10, (at_cancel, served, status)
            assert status["state"] == "cancelled"
            outcomes = [d["outcome"] for d in status["documents"]]
            assert set(outcomes) <= {"done", "cancelled"} and "cancelled" in outcomes, status
            result = svc.get(f"/v1/jobs/{job['id']}/result").json()["documents"]
            for entry, doc in zip(status["documents"], result, strict=True):
                if entry["outcome"] == "done":  # its pages all finished before the cancel: readable
                    assert doc["markdown"].startswith("Stand-in OCR"), doc
                else:
                    assert doc["markdown"] is None and entry["reason"].startswith(CANCEL_DROPPED_REASON), entry
            assert sum(d["pages"] for d in status["documents"] if d["outcome"] == "done") <= served
            assert status["pages_done"] == sum(d["pages"] for d in status["documents"] if d["outcome"] == "done")
            assert plog.read_text().count("claimed work item") == 1
            assert "was cancelled: its pages not yet started are dropped" in plog.read_text()

            # Another worker (a second run) finds nothing to do: the item is done, nothing is re-queued.
            stop_process_group(follower)
            follower = start_pipeline(workspace, standin.url, (), "--follow", "--workers", "1", log=plog)
            wait_for(lambda: plog.read_text().count("is ready and serves") >= 2, 60, "the second pipeline ready")
            time.sleep(3)
            assert pages_served(standin) == served
            assert plog.read_text().count("claimed work item") == 1, plog.read_text()
            assert svc.get(f"/v1/jobs/{job['id']}").json() == status
        finally:
            if follower is not None:
                stop_process_group(follower)
