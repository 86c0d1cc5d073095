"""A real Prometheus (Debian's ``prometheus``) on loopback for tests: started on a free port with a given
configuration and data directory under the test's tmp dir, stopped by its process group."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import requests

from tests.deployment_helpers import wait_for
from tests.standin_helpers import free_port, stop_process_group


class Prometheus:
    def __init__(self, binary: str, directory: Path, config: str) -> None:
        self.port = free_port()
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "prometheus.yml").write_text(config)
        self.log = directory / "prometheus.log"
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                [binary, f"--config.file={directory / 'prometheus.yml'}", f"--storage.tsdb.path={directory / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}"],
                stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
        self.api = f"http://127.0.0.1:{self.port}/api/v1"
        wait_for(lambda: requests.get(f"http://127.0.0.1:{self.port}/-/ready", timeout=2).ok, 30, "Prometheus ready")

    def query(self, expr: str) -> dict[str, Any]:
        """The API's whole answer (``status``, ``data`` or ``error``) for an instant query."""
        return requests.get(f"{self.api}/query", params={"query": expr}, timeout=10).json()

    def result(self, expr: str) -> list:
        answer = self.query(expr)
        assert answer["status"] == "success", (expr, answer)
        return answer["data"]["result"]

    def targets(self) -> list[tuple[str, str]]:
        """``(job, health)`` of each active target (several targets may share a job)."""
        active = requests.get(f"{self.api}/targets", timeout=5).json()["data"]["activeTargets"]
        return sorted((t["labels"]["job"], t["health"]) for t in active)

    def stop(self) -> None:
        stop_process_group(self.process, timeout=20)
