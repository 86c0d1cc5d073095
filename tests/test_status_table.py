"""``olmocr-server-status``: a table on a terminal (a real pseudo-terminal), JSON when piped or with --json, the
seed's JSON fields unchanged; against a real supervisord deployment with the stand-in."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import struct
import subprocess
import sys
import termios

import pytest

from olmocr.server.status import format_table

#: The JSON fields scripts rely on (the seed's), in its order.
SEED_FIELDS = ["healthy", "pid", "port", "model", "restart_count", "uptime_seconds", "last_health_check", "state",
               "health_phase", "last_exit_status", "last_exit_time", "last_failure_reason", "last_failure_time",
               "probe_latency_ms", "consecutive_failures", "consecutive_restarts", "health_kills", "gave_up",
               "description"]


def run_on_terminal(args: list[str], env: dict[str, str]) -> tuple[int, str]:
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "olmocr.server.status", *args], stdin=slave, stdout=slave,
                            stderr=slave, env=env, start_new_session=True)
    os.close(slave)
    out = b""
    try:
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
        return proc.wait(timeout=30), out.decode().replace("\r\n", "\n")
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_table_rows():
    one = {"healthy": True, "pid": 123, "port": 30024, "model": "m", "restart_count": 2, "consecutive_restarts": 1,
           "uptime_seconds": 3725, "last_health_check": "2026-12-01T17:00:00Z", "state": "RUNNING",
           "health_phase": "healthy", "probe_latency_ms": 41.2, "health_kills": 1,
           "last_failure_reason": "process exited (EXITED: killed by SIGKILL)",
           "last_failure_time": "2026-12-01T16:59:00Z"}
    lines = format_table(one).splitlines()
    assert lines[0] == "olmocr deployment: 1 of 1 server healthy (model m)"
    assert lines[2].split() == ["SERVER", "HEALTH", "PHASE", "PID", "UPTIME", "RESTARTS", "KILLS", "PROBE", "LAST",
                                "CHECK", "(UTC)"]
    assert lines[3].split() == ["port", "30024", "healthy", "healthy", "123", "1h", "02m", "2", "(1", "in", "a",
                                "row)", "1", "41", "ms", "2026-12-01", "17:00:00"]
    assert lines[-1] == "port 30024: last failure 2026-12-01 16:59:00 UTC: process exited (EXITED: killed by SIGKILL)"
    # Several servers (one per GPU): one row each; a stopped one says so.
    stopped = {**one, "healthy": False, "state": "FATAL", "pid": None, "gave_up": True, "url": "http://127.0.0.1:30025",
               "gpus": [1]}
    many = {"healthy": False, "model": "m", "servers": [{**one, "url": "http://127.0.0.1:30024", "gpus": [0]}, stopped]}
    table = format_table(many)
    assert table.startswith("olmocr deployment: 1 of 2 servers healthy")
    row = [line for line in table.splitlines() if line.startswith("http://127.0.0.1:30025")][0]
    assert row.split()[:7] == ["http://127.0.0.1:30025", "(GPU", "1)", "UNHEALTHY", "gave", "up", "-"]
    assert format_table({"healthy": False, "error": "supervisord unreachable at unix:///x: refused"}) == \
        "olmocr deployment: UNREACHABLE\n  supervisord unreachable at unix:///x: refused"


@pytest.mark.slow
@pytest.mark.integration
def test_terminal_gets_a_table_and_a_pipe_gets_the_seed_json(deployments):
    dep = deployments()
    dep.wait_status(lambda s: s["healthy"], 30, "healthy")
    args = ["-c", str(dep.config)]
    rc, out = run_on_terminal(args, dep.env)
    assert rc == 0, out
    assert out.startswith("olmocr deployment: 1 of 1 server healthy (model allenai/olmOCR-7B-0825-FP8)"), out
    # The box's servers list names each server by its URL (issue 17).
    row = [line for line in out.splitlines() if line.startswith(f"http://127.0.0.1:{dep.port}")]
    assert row and row[0].split()[1:3] == ["healthy", "healthy"], out
    # Piped: the JSON, fields unchanged.
    piped = dep.run_status_script()
    assert piped.returncode == 0
    # the seed's, plus the box's servers, its one --vllm-url and its status service
    assert list(json.loads(piped.stdout)) == [*SEED_FIELDS, "servers", "vllm_url", "status_service"]
    # --json on a terminal too.
    rc, out = run_on_terminal([*args, "--json"], dep.env)
    assert rc == 0 and list(json.loads(out)) == [*SEED_FIELDS, "servers", "vllm_url", "status_service"]
    # Unreachable: one line, exit 2.
    rc, out = run_on_terminal(["--server-url", f"unix://{dep.dir}/nothing.sock"], dep.env)
    assert rc == 2 and out.startswith("olmocr deployment: UNREACHABLE\n  supervisord unreachable at"), out
