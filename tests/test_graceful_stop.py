"""Stopping a pipeline on purpose: SIGTERM hands unfinished work back at once; a second Ctrl+C exits at once."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from olmocr.pipeline.runner import LOG_CLAIMED, LOG_STOPPED
from olmocr.pipeline.stopping import BURST_S, LOG_GRACEFUL, LOG_HARD_EXIT
from tests.pipeline_helpers import (
    Standins,
    docs_by_source,
    failures,
    log_line,
    logged,
    run_pipeline,
    running_pipeline,
    wait_for,
)
from tests.sample_docs import write_text_docs
from tests.standin_helpers import pid_alive, pids_in_group

pytestmark = pytest.mark.timeout(180)


def _locks(ws: Path) -> list[str]:
    folder = ws / "worker_locks"
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) if folder.is_dir() else []


@pytest.mark.slow
def test_sigterm_hands_work_back_and_another_pipeline_takes_it_at_once(tmp_path: Path, standins: Standins) -> None:
    docs = write_text_docs(tmp_path / "docs", 4, 2)
    ws = tmp_path / "ws"
    # Slow answers: items are still in progress when the stop comes.
    standin = standins(OLMOCR_STANDIN_LATENCY="2", OLMOCR_STANDIN_CONCURRENCY="4")
    log = tmp_path / "first.log"
    # The default 300 s lease: only an explicit release lets the second pipeline start at once.
    with running_pipeline(ws, standin.url, docs, "--pages_per_group", "2", "--workers", "2",
                          "--stop_timeout", "1", log=log) as run:
        run.wait_log(log_line(LOG_CLAIMED), 60, "two items claimed", count=2)
        assert len(_locks(ws)) == 2
        t0 = time.monotonic()
        os.kill(run.pid, signal.SIGTERM)
        rc = run.wait(30)
        stop_s = time.monotonic() - t0
    text = log.read_text()
    assert rc == 0, text
    assert stop_s < 15, stop_s
    assert logged(text, LOG_GRACEFUL, "SIGTERM") and logged(text, LOG_STOPPED, "SIGTERM"), text
    assert "finished in" in text  # the summary
    assert _locks(ws) == [], "leases left behind"
    done_before = len(list((ws / "done_flags").glob("*.flag"))) if (ws / "done_flags").is_dir() else 0
    assert done_before < 4

    t1 = time.monotonic()
    rc2, text2 = run_pipeline(ws, standin.url, (), "--workers", "4", timeout=120, log=tmp_path / "second.log")
    assert rc2 == 0, text2
    assert "took over an expired lease" not in text2  # nothing had to expire
    assert time.monotonic() - t1 < 100
    assert set(docs_by_source(ws)) == {str(p) for p in docs}  # each exactly once
    assert failures(ws) == []


def test_sigterm_lets_work_in_progress_finish_within_the_stop_timeout(tmp_path: Path, standins: Standins) -> None:
    docs = write_text_docs(tmp_path / "docs", 1, 2)
    ws = tmp_path / "ws"
    standin = standins(OLMOCR_STANDIN_LATENCY="2")
    log = tmp_path / "run.log"
    with running_pipeline(ws, standin.url, docs, "--stop_timeout", "60", log=log) as run:
        run.wait_log(log_line(LOG_CLAIMED), 60, "the item claimed")
        os.kill(run.pid, signal.SIGTERM)
        rc = run.wait(60)
    text = log.read_text()
    assert rc == 0, text
    assert logged(text, LOG_STOPPED, "SIGTERM", 1, 0), text  # the item finished, none handed back
    assert set(docs_by_source(ws)) == {str(docs[0])}


def test_second_ctrl_c_exits_at_once(tmp_path: Path, standins: Standins) -> None:
    docs = write_text_docs(tmp_path / "docs", 2, 2)
    ws = tmp_path / "ws"
    standin = standins(OLMOCR_STANDIN_LATENCY="1")
    log = tmp_path / "run.log"
    with running_pipeline(ws, standin.url, docs, "--stop_timeout", "120", log=log) as run:
        run.wait_log(log_line(LOG_CLAIMED), 60, "an item claimed")
        standin.control(hang=True)  # nothing in progress can finish now
        wait_for(lambda: len(pids_in_group(run.pid)) > 1, 20, "render workers started")
        workers = [p for p in pids_in_group(run.pid) if p != run.pid]
        os.kill(run.pid, signal.SIGINT)
        run.wait_log(log_line(LOG_GRACEFUL), 10, "the first signal noticed")
        time.sleep(BURST_S)  # sooner, it would be the same signal delivered twice (tests/test_mistakes.py)
        t0 = time.monotonic()
        os.kill(run.pid, signal.SIGINT)
        rc = run.wait(10)
        assert time.monotonic() - t0 < 5
    assert rc == 130, log.read_text()
    assert logged(log.read_text(), LOG_HARD_EXIT)
    wait_for(lambda: not any(pid_alive(p) for p in workers), 5, "render workers gone")
    assert _locks(ws), "a hard exit leaves its lease to expire, like kill -9"


@pytest.mark.slow
def test_stop_exit_code_tells_a_job_controller_the_run_was_cut_short(tmp_path: Path, standins: Standins) -> None:
    """A Kubernetes Job counts an exit 0 as a completed index: --stop_exit_code 143 makes a drained or
    preempted pod's index run again (deploy/kubernetes), while the work is still handed back."""
    docs = write_text_docs(tmp_path / "docs", 2, 2)
    ws = tmp_path / "ws"
    standin = standins(OLMOCR_STANDIN_LATENCY="2")
    log = tmp_path / "run.log"
    with running_pipeline(ws, standin.url, docs, "--pages_per_group", "2", "--stop_timeout", "1",
                          "--stop_exit_code", "143", log=log) as run:
        run.wait_log(log_line(LOG_CLAIMED), 60, "an item claimed")
        os.kill(run.pid, signal.SIGTERM)
        rc = run.wait(30)
    assert rc == 143, log.read_text()
    assert _locks(ws) == [], "leases left behind"
    # The rerun (the Job's next pod for that index) finishes the work and exits 0.
    rc2, text2 = run_pipeline(ws, standin.url, (), "--stop_exit_code", "143", timeout=120,
                              log=tmp_path / "second.log")
    assert rc2 == 0, text2
    assert set(docs_by_source(ws)) == {str(p) for p in docs}


def _pages_answered(url: str) -> int:
    import requests

    return int(requests.get(f"{url}/admin/info", timeout=5).json()["image_requests_served"])


def _pages_asked(url: str) -> int:
    """The pages the stand-in was asked for, once it has answered every request it took: one that a stop cut
    off is still answered (to nobody) up to a latency later, and counted then."""
    import requests

    def settled() -> dict | None:
        info = requests.get(f"{url}/admin/info", timeout=5).json()
        return info if info["completions_seen"] == info["requests_served"] else None

    return int(wait_for(settled, 30, "the stand-in's last answers")["image_requests_served"])


def test_sigterm_in_a_40_document_item_keeps_its_finished_documents(tmp_path: Path, standins: Standins) -> None:
    """Issue 29: the stop writes the item's finished documents and queues only the rest; the next run
    redoes no more pages than were in flight at the stop, and every document is written once."""
    docs = write_text_docs(tmp_path / "docs", 40, 1)
    ws = tmp_path / "ws"
    standin = standins(OLMOCR_STANDIN_LATENCY="0.4")
    log = tmp_path / "first.log"
    in_flight = 2
    with running_pipeline(ws, standin.url, docs, "--pages_per_group", "100", "--workers", "1",
                          "--max_concurrent_requests", str(in_flight), "--stop_timeout", "1", log=log) as run:
        run.wait_log(log_line(LOG_CLAIMED), 60, "the item claimed")
        wait_for(lambda: _pages_answered(standin.url) >= 12, 60, "a dozen pages answered")
        os.kill(run.pid, signal.SIGTERM)
        rc = run.wait(30)
    text = log.read_text()
    assert rc == 0, text
    kept = docs_by_source(ws)  # one page each
    assert _locks(ws) == [], "leases left behind"
    first_asked = _pages_asked(standin.url)
    rc2, text2 = run_pipeline(ws, standin.url, (), "--workers", "1", timeout=120, log=tmp_path / "second.log")
    assert rc2 == 0, text2
    redone = _pages_asked(standin.url) - len(docs)  # pages the stand-in was asked for twice
    # The pages in flight at the stop: asked for by the first run, and not in what it kept. At most the
    # requests the pipeline has out at once; every page answered before the stop is kept, not redone.
    cut_off = first_asked - len(kept)
    assert redone <= cut_off <= in_flight, f"{redone} pages redone, {cut_off} cut off ({first_asked} asked, " \
                                           f"{len(kept)} kept, at most {in_flight} in flight)\n{text[-3000:]}"
    assert 10 <= len(kept) < 40, text
    assert set(docs_by_source(ws)) == {str(p) for p in docs}  # each exactly once
    assert [f for f in failures(ws) if not f.get("unfinished")] == []  # handed back, not failed


def test_a_pipeline_killed_with_9_is_resumed_at_once_by_a_rerun_on_the_same_host(tmp_path: Path, standins: Standins) -> None:
    """Issue 29: the lease of a dead process on this host is free at once (its pid is gone), not after the
    300 s lease: a re-run after kill -9 starts work at once."""
    docs = write_text_docs(tmp_path / "docs", 2, 2)
    ws = tmp_path / "ws"
    standin = standins(OLMOCR_STANDIN_LATENCY="1")
    with running_pipeline(ws, standin.url, docs, "--pages_per_group", "2", log=tmp_path / "first.log") as run:
        run.wait_log(log_line(LOG_CLAIMED), 60, "an item claimed")
        os.killpg(run.pid, signal.SIGKILL)
        run.wait(10)
    assert _locks(ws), "kill -9 leaves its leases behind"
    t0 = time.monotonic()
    rc, text = run_pipeline(ws, standin.url, (), timeout=120, log=tmp_path / "second.log")
    assert rc == 0, text
    assert time.monotonic() - t0 < 60  # not after the 300 s lease
    assert "is gone" in text, text  # took the dead process's lease over
    assert set(docs_by_source(ws)) == {str(p) for p in docs}


def test_sigterm_in_a_300_page_document_keeps_its_finished_pages(tmp_path: Path, standins: Standins) -> None:
    """Issue 29: a stop in the middle of a long document keeps the pages already answered
    (partial_pages/); the next run asks only for the others, and the document is written once, whole."""
    docs = write_text_docs(tmp_path / "docs", 1, 300)
    ws = tmp_path / "ws"
    standin = standins(OLMOCR_STANDIN_LATENCY="0.1")
    in_flight = 4
    with running_pipeline(ws, standin.url, docs, "--max_concurrent_requests", str(in_flight),
                          "--stop_timeout", "1", log=tmp_path / "first.log") as run:
        run.wait_log(log_line(LOG_CLAIMED), 60, "the item claimed")
        wait_for(lambda: _pages_answered(standin.url) >= 60, 120, "60 pages answered")
        os.kill(run.pid, signal.SIGTERM)
        rc = run.wait(30)
    text = (tmp_path / "first.log").read_text()
    assert rc == 0, text
    assert "finished pages of documents in flight kept" in text, text
    first = _pages_answered(standin.url)
    assert docs_by_source(ws) == {}  # nothing written yet: the document is not finished
    rc2, text2 = run_pipeline(ws, standin.url, (), timeout=170, log=tmp_path / "second.log")
    assert rc2 == 0, text2
    total = _pages_answered(standin.url)
    assert total <= 300 + in_flight + 1, (first, total)  # redone: at most the pages in flight at the stop
    (doc,) = docs_by_source(ws).values()
    assert doc["metadata"]["pdf-total-pages"] == 300
    assert [span[2] for span in doc["attributes"]["pdf_page_numbers"]] == list(range(1, 301))
