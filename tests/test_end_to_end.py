"""Both halves together: the pipeline against the supervised deployment (real supervisord, wrapper,
health listener, stand-in as vLLM) while the server is killed with -9 and then hangs. Every page of
every document must come out exactly once."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import requests

from tests.pipeline_helpers import RESILIENCE_DOCS as DOCS
from tests.pipeline_helpers import assert_every_page_once, running_pipeline

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


@pytest.mark.slow
def test_pipeline_survives_server_kill_and_hang_under_supervisord(tmp_path: Path, deployments) -> None:
    dep = deployments(control={"latency": 0.4, "concurrency": 2})
    log = tmp_path / "pipeline.log"
    first = dep.wait_status(lambda s: s["healthy"], 30, "healthy")
    with running_pipeline(tmp_path / "ws", dep.base_url, DOCS, "--pages_per_group", "6", "--request_timeout", "3",
                          log=log) as run:
        run.wait_log("done:", 90, "a first work item done")
        os.kill(first["pid"], signal.SIGKILL)
        second = dep.wait_status(lambda s: s["healthy"] and s["pid"] != first["pid"], 60, "restart after -9")
        time.sleep(1)
        requests.post(f"{dep.base_url}/admin/control", json={"hang": True}, timeout=5)
        dep.wait_status(lambda s: s["healthy"] and s["pid"] != second["pid"], 90, "restart after hang")
        rc = run.wait(180)
        status = dep.status()
    output = log.read_text()
    assert rc == 0, output[-3000:]
    assert status["restart_count"] == 2 and status["health_kills"] == 1
    assert_every_page_once(tmp_path / "ws", DOCS)
