"""The manager (``python -m olmocr.vllm_server_manager``) run in the foreground with the stand-in as vLLM,
for the tests that start it (the ``manager_run`` fixture in tests/conftest.py)."""

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

from tests.standin_helpers import STANDIN_SHIM, clean_env, free_port_run


class ManagerRun:
    def __init__(self, *args: str, control: dict | None = None, ports: int = 1) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="olmocr-mgr-"))
        self.port = free_port_run(ports)
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
