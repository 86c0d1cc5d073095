"""Integration: the deployment (supervisord), the manager and internal mode start clean, with no restart, on
the stand-in playing the oldest (0.11.2, upstream olmOCR's pin) and the newest (0.33.0) tested vLLM; the
newest gets the graceful drain, the oldest is told why it has none; a vLLM that cannot serve olmOCR is
refused in one line. The stand-in rejects every flag its release lacks as vLLM does (exit 2), so a flag
passed to the wrong release would show up here as a failed start."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import pytest
import requests

from olmocr.server.manager import READY_MESSAGE
from olmocr.server.vllm_versions import NEWEST_TESTED, OLDEST_TESTED, show
from tests.deployment_helpers import wait_for
from tests.pipeline_helpers import assert_every_page_once
from tests.sample_docs import write_text_docs
from tests.standin_helpers import STANDIN_SHIM, chat_payload, clean_env, free_port, make_png
from tests.test_internal_mode import InternalRun

pytestmark = pytest.mark.integration

OLDEST, NEWEST = show(OLDEST_TESTED), show(NEWEST_TESTED)
NO_DRAIN = f"vLLM {OLDEST} has no --shutdown-timeout: in-flight requests are aborted on stop"


def _started_line(log: str) -> str:
    return next(line for line in log.splitlines() if "starting:" in line)


def _complete_in_background(url: str, result: dict) -> threading.Thread:
    def run() -> None:
        try:
            response = requests.post(f"{url}/v1/chat/completions", json=chat_payload(make_png(64, 64)), timeout=30)
            result["status"] = response.status_code
        except requests.RequestException as exc:
            result["error"] = type(exc).__name__
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@pytest.mark.slow
@pytest.mark.parametrize("version", [OLDEST, NEWEST])
def test_deployment_starts_clean_and_stops_as_the_release_can(deployments, version: str) -> None:
    # A 3 s answer: the health probe's completion timeout must allow it.
    dep = deployments(control={"vllm_version": version}, env={"OLMOCR_HEALTH_COMPLETION_TIMEOUT": "10"})
    status = dep.wait_status(lambda s: s["healthy"], 40, "healthy")
    assert status["restart_count"] == 0 and status["state"] == "RUNNING"
    assert requests.get(f"{dep.base_url}/version", timeout=5).json()["version"].startswith(version)
    log = dep.log_text("vllm")
    assert "unrecognized arguments" not in log
    started = _started_line(log)
    if version == OLDEST:
        assert "--shutdown-timeout" not in started
        assert log.count(NO_DRAIN) == 1  # said once, with what it costs
    else:
        assert "--shutdown-timeout 30" in started
        assert "has no --" not in log and "newer than" not in log

    # A planned stop with a request in flight: drained on the newest, aborted on the oldest.
    dep.set_control({"vllm_version": version, "latency": 3})
    result: dict = {}
    thread = _complete_in_background(dep.base_url, result)
    wait_for(lambda: dep.standin_info()["control"]["latency"] == 3 and "status" not in result, 5, "request sent")
    ctl = dep.supervisorctl("stop", "vllm")
    thread.join(timeout=40)
    assert "stopped" in ctl.stdout, ctl.stdout + ctl.stderr
    if version == NEWEST:
        assert result == {"status": 200}, result  # finished inside --shutdown-timeout
    else:
        assert "status" not in result, result  # vLLM 0.11.2 aborts it
    assert dep.status()["restart_count"] == 0


@pytest.mark.slow
@pytest.mark.parametrize("version", [OLDEST, NEWEST, "0.34.0"])
def test_manager_starts_clean(manager_run, version: str) -> None:
    run = manager_run(control={"vllm_version": version})
    wait_for(lambda: READY_MESSAGE in run.lines, 40, "ready message")
    status = wait_for(lambda: run.status_lines(after=READY_MESSAGE), 15, "a status line after ready")[-1]
    assert status["healthy"] and status["restart_count"] == 0
    log = (run.dir / "olmocr-server-run" / "logs" / "vllm.log").read_text()
    assert "unrecognized arguments" not in log
    assert ("--shutdown-timeout" in _started_line(log)) == (version != OLDEST)
    newer = "vLLM 0.34.0 is newer than the newest tested release (0.33.0)"
    assert log.count(newer) == (1 if version == "0.34.0" else 0)


def test_manager_refuses_a_vllm_that_cannot_serve_olmocr_in_one_line(manager_run) -> None:
    run = manager_run(control={"vllm_version": "0.7.1"})
    assert run.proc.wait(timeout=30) == 2
    errors = [line for line in run.lines if "cannot serve olmOCR" in line]
    assert len(errors) == 1 and "Traceback" not in run.output()
    assert "vLLM 0.7.1 cannot serve olmOCR" in errors[0] and "0.11.2-0.33.0" in errors[0]
    assert run.descendants() == set()  # nothing was started


def test_the_wrapper_refuses_it_too(tmp_path: Path) -> None:
    """Under a supervisord the operator runs: one line, exit 2, vLLM never started."""
    control = tmp_path / "control.json"
    control.write_text('{"vllm_version": "0.6.6"}')
    env = clean_env({"OLMOCR_STANDIN_CONTROL": str(control), "OLMOCR_VLLM_BIN": str(STANDIN_SHIM),
                     "OLMOCR_PORT": str(free_port()), "OLMOCR_VLLM_VERSION_CACHE": str(tmp_path / "v.json")})
    proc = subprocess.run([sys.executable, "-m", "olmocr.server.wrapper"], env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "olmocr-vllm-wrapper: error: vLLM 0.6.6 cannot serve olmOCR: olmOCR's model architecture (Qwen2.5-VL) "
        "is unknown to it before vLLM 0.7.2; install a vLLM in the tested range 0.11.2-0.33.0 "
        "(pip install 'olmocr-serve[gpu]') or point OLMOCR_VLLM_BIN at one"]


@pytest.mark.slow
@pytest.mark.parametrize("version", [OLDEST, NEWEST])
def test_internal_mode_starts_clean(tmp_path: Path, version: str) -> None:
    pdfs = write_text_docs(tmp_path / "docs", 1, 2)
    run = InternalRun(tmp_path, pdfs, "--guided_decoding", control={"vllm_version": version})
    try:
        assert run.wait(90) == 0, run.output()[-3000:]
        assert_every_page_once(run.workspace, pdfs)
        log = (run.run_dir / "logs" / "vllm.log").read_text()
        assert "unrecognized arguments" not in log and log.count("starting:") == 1  # no restart
        assert ("--shutdown-timeout" in _started_line(log)) == (version == NEWEST)
        # The pipeline constrains the output with the field this release honours.
        assert f"'structured_outputs' request field (vLLM {version}+standin)" in run.output()
    finally:
        run.close()


def test_internal_mode_refuses_a_vllm_that_cannot_serve_olmocr(tmp_path: Path) -> None:
    pdfs = write_text_docs(tmp_path / "docs", 1, 1)
    run = InternalRun(tmp_path, pdfs, control={"vllm_version": "0.7.1"})
    try:
        assert run.wait(60) == 2, run.output()[-3000:]
        out = run.output()
        assert out.count("vLLM 0.7.1 cannot serve olmOCR") == 1 and "Traceback" not in out
        assert "started a vLLM server" not in out
        assert not (run.run_dir / "logs" / "vllm.log").exists()  # supervisord never started it
    finally:
        run.close()
