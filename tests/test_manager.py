"""Integration: ``python -m olmocr.vllm_server_manager`` in the foreground, stopped like an operator does."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import psutil
import pytest

from olmocr.server.manager import READY_MESSAGE
from tests.deployment_helpers import live, wait_for
from tests.standin_helpers import STANDIN_SHIM, clean_env, free_port

pytestmark = pytest.mark.integration


class ManagerRun:
    def __init__(self, *args: str, control: dict | None = None) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="olmocr-mgr-"))
        self.port = free_port()
        control_file = self.dir / "control.json"
        control_file.write_text(json.dumps(control or {}))
        env = clean_env({"OLMOCR_PYTHON": sys.executable, "OLMOCR_STANDIN_CONTROL": str(control_file),
                         "OLMOCR_HEALTH_COMPLETION_TIMEOUT": "2", "OLMOCR_HEALTH_FAILURE_THRESHOLD": "2"})
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "olmocr.vllm_server_manager", "--vllm-bin", str(STANDIN_SHIM),
             "--port", str(self.port), "--health-check-interval", "1", "--restart-delay", "0.5",
             "--status-interval", "2", *args],
            cwd=self.dir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True,
        )
        self.lines: list[str] = []
        self.seen: set[int] = set()  # every descendant observed, for teardown
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def output(self) -> str:
        return "\n".join(self.lines)

    def descendants(self) -> set[int]:
        try:
            pids = {p.pid for p in psutil.Process(self.proc.pid).children(recursive=True)}
        except psutil.NoSuchProcess:
            return set()
        self.seen |= pids
        return pids

    def status_lines(self, after: str | None = None) -> list[dict]:
        """The status JSON lines printed so far (only those after the line ``after``, if given)."""
        lines = list(self.lines)
        if after is not None:
            lines = lines[lines.index(after) + 1:] if after in lines else []
        return [json.loads(line) for line in lines if line.startswith("{")]

    def kill(self) -> None:
        """Teardown: the manager's group and, by pid, everything it started (supervisord has its own)."""
        started = self.descendants() | self.seen
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        for pid in started:
            with contextlib.suppress(psutil.Error):
                psutil.Process(pid).kill()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def manager_run():
    runs: list[ManagerRun] = []

    def make(*args: str, **kwargs) -> ManagerRun:
        run = ManagerRun(*args, **kwargs)
        runs.append(run)
        return run

    yield make
    for run in runs:
        run.kill()


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


def test_sigterm_stops_everything_and_exits_0(manager_run):
    run = manager_run()
    wait_for(lambda: "ready and accepting" in run.output(), 40, "ready message")
    pids = run.descendants()
    run.proc.send_signal(signal.SIGTERM)
    assert run.proc.wait(timeout=90) == 0
    wait_for(lambda: not any(live(pid) for pid in pids), 10, "every started process to exit")


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
