"""Runs the real deployment (real supervisord, the checked-in supervisord.conf, the stand-in as vLLM)
in a short temporary directory, for integration tests and benchmarks."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import psutil

from olmocr.server.rpcclient import connect
from olmocr.server.status import fetch_status
from tests.standin_helpers import REPO_ROOT, STANDIN_SHIM, clean_env, free_port
from tests.waiting import wait_for  # noqa: F401 - re-exported for the tests

FAST_HEALTH = {
    "OLMOCR_HEALTH_INTERVAL": "1",
    "OLMOCR_HEALTH_TIMEOUT": "2",
    "OLMOCR_HEALTH_COMPLETION_TIMEOUT": "2",
    "OLMOCR_HEALTH_FAILURE_THRESHOLD": "2",
    "OLMOCR_HEALTH_STARTUP_TIMEOUT": "60",
    "OLMOCR_HEALTH_KILL_GRACE": "3",
    "OLMOCR_RESTART_DELAY": "0.5",
}


class Deployment:
    """supervisord -c <copy of supervisord.conf> with the stand-in as OLMOCR_VLLM_BIN."""

    def __init__(self, env: Mapping[str, str] | None = None, config_edits: Mapping[str, str] | None = None,
                 control: Mapping[str, Any] | None = None) -> None:
        # AF_UNIX socket paths must stay short: use /tmp directly, not pytest's deep tmp_path.
        self.dir = Path(tempfile.mkdtemp(prefix="olmocr-dep-"))
        (self.dir / "run").mkdir()
        (self.dir / "logs").mkdir()
        config = (REPO_ROOT / "supervisord.conf").read_text()
        for old, new in (config_edits or {}).items():
            assert old in config, f"{old!r} not in supervisord.conf"
            config = config.replace(old, new)
        (self.dir / "scripts").symlink_to(REPO_ROOT / "scripts")  # %(here)s/scripts/... as in a checkout
        self.config = self.dir / "supervisord.conf"
        self.config.write_text(config)
        self.control_file = self.dir / "standin-control.json"
        self.set_control(dict(control or {}))
        self.port = free_port()
        self.status_port = free_port()
        self.env = clean_env({
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "OLMOCR_VLLM_BIN": str(STANDIN_SHIM),
            "OLMOCR_PYTHON": sys.executable,
            "OLMOCR_PORT": str(self.port),
            "OLMOCR_STATUS_PORT": str(self.status_port),
            "OLMOCR_STANDIN_CONTROL": str(self.control_file),
            **FAST_HEALTH,
            **(env or {}),
        })
        self.supervisord: subprocess.Popen | None = None
        self.seen_pids: set[int] = set()
        self.proxy = connect(f"unix://{self.dir}/run/supervisor.sock", timeout=10)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def status_url(self) -> str:
        """The status service supervisord runs beside the server ([program:olmocr-status])."""
        return f"http://127.0.0.1:{self.status_port}"

    def set_control(self, control: Mapping[str, Any]) -> None:
        tmp = self.control_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(control))
        os.replace(tmp, self.control_file)

    def start(self) -> Deployment:
        self.supervisord = subprocess.Popen(
            [sys.executable, "-m", "supervisor.supervisord", "-n", "-c", str(self.config)],
            env=self.env, cwd=str(self.dir), start_new_session=True,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_for(lambda: self.proxy.supervisor.getState()["statename"] == "RUNNING", 20, "supervisord")
        return self

    def status(self) -> dict:
        self.remember_pids()
        return fetch_status(self.proxy)

    def wait_status(self, predicate: Callable[[dict], bool], timeout: float, what: str) -> dict:
        return wait_for(lambda: (lambda s: s if predicate(s) else None)(self.status()), timeout, what)

    def run_status_script(self) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "olmocr.server.status", "-c", str(self.config)],
                              capture_output=True, text=True, timeout=30, env=self.env)

    def supervisorctl(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "supervisor.supervisorctl", "-c", str(self.config), *args],
                              capture_output=True, text=True, timeout=30, env=self.env)

    def remember_pids(self) -> None:
        if self.supervisord is None:
            return
        try:
            for proc in psutil.Process(self.supervisord.pid).children(recursive=True):
                self.seen_pids.add(proc.pid)
        except psutil.NoSuchProcess:
            pass

    def stop(self) -> None:
        if self.supervisord is None:
            return
        self.remember_pids()
        try:
            self.proxy.supervisor.shutdown()
        except Exception:
            self.supervisord.send_signal(signal.SIGTERM)
        try:
            self.supervisord.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.supervisord.pid, signal.SIGKILL)
            self.supervisord.wait(timeout=10)
        for pid in self.seen_pids:  # hygiene: nothing this test started may survive it
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self.supervisord = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def log_text(self, name: str) -> str:
        return "".join(p.read_text(errors="replace") for p in sorted((self.dir / "logs").glob(f"{name}*")))

    def standin_info(self) -> dict:
        import requests

        return requests.get(f"{self.base_url}/admin/info", timeout=5,
                            headers=self._auth()).json()

    def _auth(self) -> dict:
        key = self.env.get("VLLM_API_KEY")
        return {"Authorization": f"Bearer {key}"} if key else {}


def live(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
