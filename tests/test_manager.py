"""Integration: ``python -m olmocr.vllm_server_manager`` in the foreground, stopped like an operator does."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from olmocr.port_owner import listening_pids
from olmocr.server.manager import READY_MESSAGE
from tests.deployment_helpers import live, wait_for

pytestmark = pytest.mark.integration


@pytest.mark.slow
def test_ready_status_and_ctrl_c_leaves_nothing_behind(manager_run):
    run = manager_run()
    wait_for(lambda: READY_MESSAGE in run.lines, 40, "ready message")
    # Lines from before the server was ready rightly say it is not healthy yet.
    status = wait_for(lambda: run.status_lines(after=READY_MESSAGE), 15, "a status line after ready")[-1]
    for key in ("healthy", "pid", "port", "model", "restart_count", "uptime_seconds", "last_health_check"):
        assert key in status
    assert status["healthy"] and status["port"] == run.port
    pids = run.descendants()
    assert len(pids) >= 4  # supervisord, listener, server, engine
    run.proc.send_signal(signal.SIGINT)  # Ctrl+C
    assert run.proc.wait(timeout=90) == 0
    wait_for(lambda: not any(live(pid) for pid in pids), 10, "every started process to exit")
    log = (run.dir / "vllm-server-manager.log").read_text()
    assert "DEBUG" in log  # the file gets DEBUG, the console INFO


@pytest.mark.slow
def test_sigterm_stops_everything_and_exits_0(manager_run):
    run = manager_run()
    wait_for(lambda: READY_MESSAGE in run.output(), 40, "ready message")
    pids = run.descendants()
    run.proc.send_signal(signal.SIGTERM)
    assert run.proc.wait(timeout=90) == 0
    wait_for(lambda: not any(live(pid) for pid in pids), 10, "every started process to exit")


@pytest.mark.slow
def test_crash_loop_is_left_stopped_after_max_restart_attempts(manager_run):
    run = manager_run("--max-restart-attempts", "2", "--startsecs", "1", control={"crash_after": 1.5})
    assert run.proc.wait(timeout=90) == 1
    final = run.status_lines()[-1]
    assert not final["healthy"]
    assert final["restart_count"] == 3
    assert "crash loop" in final["last_failure_reason"]


def test_bad_option_fails_fast_with_one_line(manager_run):
    run = manager_run("--gpu-memory-utilization", "1.5")
    assert run.proc.wait(timeout=30) == 2
    assert "gpu memory utilization 1.5" in run.output()


@pytest.mark.slow
def test_manager_killed_with_sigkill_takes_the_deployment_with_it(manager_run):
    # SIGKILL cannot be caught: supervisord (its own session) must notice its parent died and stop the
    # server group, or vLLM would keep the GPU and the port with nothing supervising it.
    run = manager_run()
    wait_for(lambda: READY_MESSAGE in run.lines, 40, "ready message")
    pids = run.descendants()
    assert len(pids) >= 4  # supervisord, listener, server, engine
    run.proc.kill()
    run.proc.wait(timeout=10)
    wait_for(lambda: not any(live(pid) for pid in pids), 90, "every process the manager started to exit")


@pytest.mark.slow
def test_several_gpus_one_server_each_and_one_vllm_url(manager_run):
    run = manager_run("--gpus", "0,1", ports=2)
    wait_for(lambda: READY_MESSAGE in run.lines, 60, "ready message")
    out = run.output()
    assert f"server vllm:vllm-0: http://127.0.0.1:{run.port} on GPU 0" in out
    assert f"server vllm:vllm-1: http://127.0.0.1:{run.port + 1} on GPU 1" in out
    assert f"--vllm-url http://127.0.0.1:{run.port}-{run.port + 1}" in out
    before_ready = run.lines[:run.lines.index(READY_MESSAGE)]
    assert f"all 2 servers ready: --vllm-url http://127.0.0.1:{run.port}-{run.port + 1}" in "\n".join(before_ready)
    status = wait_for(lambda: run.status_lines(after=READY_MESSAGE), 15, "a status line after ready")[-1]
    assert status["healthy"] and [e["name"] for e in status["servers"]] == ["vllm-0", "vllm-1"]
    run.proc.send_signal(signal.SIGINT)
    assert run.proc.wait(timeout=90) == 0


def test_a_gpu_count_above_the_visible_gpus_fails_fast_with_one_line(manager_run):
    run = manager_run("--gpus", "3")  # no GPU here (the tests hide any)
    assert run.proc.wait(timeout=30) == 2
    assert "OLMOCR_GPUS=3 but only 0 GPU(s) are visible" in run.output()
    assert "Traceback" not in run.output()


@pytest.mark.slow
def test_a_run_dir_too_long_for_a_unix_socket_leaves_no_socket_dir_behind(manager_run, tmp_path):
    # AF_UNIX paths end near 107 bytes: the socket then goes to a private /tmp directory, which the
    # manager must remove when it stops (it used to stay forever, one per run).
    long_dir = tmp_path / ("d" * 60) / ("e" * 60)
    before = set(Path(tempfile.gettempdir()).glob("olmocr-*"))
    run = manager_run("--run-dir", str(long_dir))
    wait_for(lambda: READY_MESSAGE in run.lines, 40, "ready message")
    config = (long_dir / "supervisord.conf").read_text()
    made = [d for d in set(Path(tempfile.gettempdir()).glob("olmocr-*")) - before if str(d / "supervisor.sock") in config]
    assert len(made) == 1 and (made[0] / "supervisor.sock").exists(), made
    run.proc.send_signal(signal.SIGTERM)
    assert run.proc.wait(timeout=90) == 0
    assert not made[0].exists()


def test_a_status_service_that_cannot_listen_is_named_with_the_owner_of_its_port(manager_run):
    """Its port taken after the start (the start itself refuses a taken port): the manager says so in one line
    with the port's owner, and olmocr-server-status says the service is not answering."""
    run = manager_run()
    wait_for(lambda: READY_MESSAGE in run.lines, 40, "ready message")
    url = wait_for(lambda: run.status_lines(), 15, "a status line")[-1]["status_service"]["url"]
    port = int(url.rsplit(":", 1)[1])
    holder = socket.socket()
    try:
        (service,) = listening_pids(port)
        os.kill(service, signal.SIGKILL)
        wait_for(lambda: _bind(holder, port), 5, "the status port, before supervisord restarts the service")
        holder.listen()
        line = wait_for(lambda: [x for x in run.lines if "the status service" in x and "is not running" in x],
                        60, "the manager's line")[0]
        assert f"({url})" in line and f"cannot listen on 127.0.0.1:{port}" in line, line
        assert f"held by pid {os.getpid()} (" in line, line
        config = run.dir / "olmocr-server-run" / "supervisord.conf"

        def service() -> dict:
            script = subprocess.run([sys.executable, "-m", "olmocr.server.status", "-c", str(config)],
                                    capture_output=True, text=True, timeout=30)
            return json.loads(script.stdout)["status_service"]

        status = wait_for(lambda: (lambda s: s if s["state"] == "FATAL" else None)(service()), 60,
                          "supervisord to give the status service up")
        assert status["url"] == url and status["answering"] is False, status
        assert status["error"].startswith("the status service is FATAL"), status
    finally:
        holder.close()


def _bind(sock: socket.socket, port: int) -> bool:
    try:
        sock.bind(("127.0.0.1", port))
    except OSError:
        return False
    return True


def test_a_taken_status_port_stops_the_manager_in_one_line_with_its_owner(manager_run, monkeypatch):
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    monkeypatch.setenv("OLMOCR_STATUS_PORT", str(port))  # the manager's environment (tests/manager_helpers.py)
    try:
        run = manager_run()
        assert run.proc.wait(timeout=60) == 2
        errors = [line for line in run.lines if "ERROR" in line]
        assert len(errors) == 1, run.output()
        assert (f"port {port} on 127.0.0.1 (the status service) is already in use by pid {os.getpid()} ("
                in errors[0]) and errors[0].endswith("choose another port with OLMOCR_STATUS_PORT"), errors[0]
    finally:
        holder.close()
