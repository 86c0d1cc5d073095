"""The pipeline through server crashes and hangs, concurrent pipelines, a killed pipeline, and S3 workspaces."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from olmocr.pipeline.runner import LOG_CLAIMED
from olmocr.pipeline.servers.fleet import LOG_PAUSED, LOG_RESUMED
from tests.pipeline_helpers import (
    RESILIENCE_DOCS,
    SAMPLES,
    SMALL_DOCS,
    Standins,
    assert_every_page_once,
    log_line,
    logged,
    run_pipeline,
    running_pipeline,
    wait_for,
)

pytestmark = pytest.mark.timeout(300)

DOCS = RESILIENCE_DOCS


@pytest.mark.slow
def test_server_killed_and_restarted_mid_run(tmp_path: Path, standins: Standins) -> None:
    s = standins(OLMOCR_STANDIN_LATENCY="0.3", OLMOCR_STANDIN_CONCURRENCY="2")
    log = tmp_path / "run.log"
    with running_pipeline(tmp_path / "ws", s.url, DOCS, "--pages_per_group", "6", log=log) as run:
        wait_for(lambda: "work item" in log.read_text() and "done" in log.read_text(), 60, "a first item done")
        s.kill()  # SIGKILL the stand-in's process group: a crash
        # Down until the pipeline has noticed (on a loaded machine a fixed pause may pass with no request out).
        run.wait_log(log_line(LOG_PAUSED), 60, "the outage noticed")
        time.sleep(1)
        assert run.poll() is None, run.output()
        s.restart()
        rc = run.wait(120)
    text = log.read_text()
    assert rc == 0, text
    assert logged(text, LOG_RESUMED)
    assert_every_page_once(tmp_path / "ws", DOCS)


@pytest.mark.slow
def test_hung_server_times_out_then_recovers(tmp_path: Path, standins: Standins) -> None:
    s = standins(OLMOCR_STANDIN_HANG="true")
    log = tmp_path / "run.log"
    docs = SMALL_DOCS[:3]
    with running_pipeline(tmp_path / "ws", s.url, docs, "--request_timeout", "1", log=log) as run:
        # /health and /v1/models keep answering while completions hang: only timeouts reveal it.
        run.wait_log("timeout", 60, "a request timeout")
        assert run.poll() is None, run.output()
        s.control(hang=False)
        rc = run.wait(120)
    text = log.read_text()
    assert rc == 0, text
    assert_every_page_once(tmp_path / "ws", docs)


@pytest.mark.slow
def test_two_pipelines_share_a_workspace_without_duplicates(tmp_path: Path, standins: Standins) -> None:
    s = standins(OLMOCR_STANDIN_LATENCY="0.05")
    ws = tmp_path / "ws"
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    args = (ws, s.url, DOCS, "--pages_per_group", "2", "--workers", "3")
    with running_pipeline(*args, log=logs[0]) as a, running_pipeline(*args, log=logs[1]) as b:
        rcs = [a.wait(180), b.wait(180)]
    assert rcs == [0, 0], [lg.read_text()[-3000:] for lg in logs]
    assert_every_page_once(ws, DOCS)
    claimed = [m.group(2) for lg in logs for m in logged(lg.read_text(), LOG_CLAIMED)]
    assert len(claimed) == len(set(claimed)), "an item was processed twice"


@pytest.mark.slow
def test_pipeline_killed_midway_next_run_does_only_the_rest(tmp_path: Path, standins: Standins) -> None:
    s = standins(OLMOCR_STANDIN_LATENCY="0.2", OLMOCR_STANDIN_CONCURRENCY="2")
    ws = tmp_path / "ws"
    log1 = tmp_path / "run1.log"
    with running_pipeline(ws, s.url, DOCS, "--pages_per_group", "3", "--workers", "2", "--lease_seconds", "4",
                          log=log1) as run:
        wait_for(lambda: (ws / "done_flags").is_dir() and any((ws / "done_flags").iterdir()), 60, "an item done")
        os.killpg(run.pid, signal.SIGKILL)
        run.wait(10)
    done_before = {p.name: p.stat().st_mtime_ns for p in (ws / "done_flags").iterdir()}
    results_before = {p.name: p.read_bytes() for p in (ws / "results").iterdir()}
    assert (ws / "worker_locks").is_dir() and any((ws / "worker_locks").iterdir())  # a lease left behind
    rc, text = run_pipeline(ws, s.url, (), "--workers", "2", "--lease_seconds", "4", timeout=180,
                            log=tmp_path / "run2.log")
    assert rc == 0, text
    assert_every_page_once(ws, DOCS)
    # Items finished by the killed run were neither redone nor rewritten.
    for name, mtime in done_before.items():
        assert (ws / "done_flags" / name).stat().st_mtime_ns == mtime
        item_hash = name.removeprefix("done_").removesuffix(".flag")
        assert item_hash not in [m.group(2) for m in logged(text, LOG_CLAIMED)]
    for name, data in results_before.items():
        assert (ws / "results" / name).read_bytes() == data
    assert logged(text, LOG_CLAIMED)


@pytest.mark.slow
def test_s3_workspace_and_s3_inputs(s3_server, tmp_path: Path, standins: Standins) -> None:
    client = s3_server.client()
    s3_pdf = SAMPLES.report
    client.put_object(Bucket=s3_server.bucket, Key="inputs/olmo-page-1.pdf", Body=s3_pdf.read_bytes())
    s = standins()
    ws = s3_server.url("ws")
    local = [SAMPLES.letter, SAMPLES.scan]
    rc, text = run_pipeline(ws, s.url, [*local, s3_server.url("inputs/*.pdf")], "--pages_per_group", "2",
                            "--markdown", log=tmp_path / "run.log")
    assert rc == 0, text
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=s3_server.bucket, Prefix="ws/").get("Contents", [])]
    docs = {}
    for key in keys:
        if key.startswith("ws/results/") and key.endswith(".jsonl"):
            body = client.get_object(Bucket=s3_server.bucket, Key=key)["Body"].read().decode()
            for line in body.splitlines():
                doc = json.loads(line)
                assert doc["metadata"]["Source-File"] not in docs
                docs[doc["metadata"]["Source-File"]] = doc
    expected = {str(p) for p in local} | {s3_server.url("inputs/olmo-page-1.pdf")}
    assert set(docs) == expected
    assert "ws/markdown/inputs/olmo-page-1.md" in keys
    assert any(k.startswith("ws/done_flags/") for k in keys)
