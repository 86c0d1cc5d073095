"""``python -m olmocr.cluster.ready --status-port S --pid P``: wait until a task's supervised deployment
(``python -m olmocr.vllm_server_manager``, pid P) is ready, then print its servers' URLs, comma-separated, for
the pipeline's ``--vllm-url``.

Ready means its status service (``GET /status`` on 127.0.0.1:S, the JSON of ``olmocr-server-status``) answers
200: every server it supervises has passed its health probe. The URLs come from the same JSON: the ``url`` (or
``port``) of each entry of ``servers`` (one per GPU, when the deployment runs several) or the top-level ``port``.

Exit 0 with the URLs; 1 with one line when the manager exits first, gives up on a server, or the wait exceeds
``--timeout``; 3 when a stop signal (SIGTERM, SIGINT, SIGUSR1) arrives while waiting.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from typing import Any

import psutil

STOPPED_EXIT = 3


def server_urls(status: Mapping[str, Any], host: str = "127.0.0.1") -> list[str]:
    """The base URLs of the servers a status JSON describes (pure)."""
    entries = status.get("servers")
    if not (isinstance(entries, list) and entries):
        entries = [status]
    urls = []
    for entry in entries:
        if not isinstance(entry, Mapping):
            continue
        if isinstance(entry.get("url"), str) and entry["url"].startswith(("http://", "https://")):
            urls.append(entry["url"].rstrip("/"))
        elif entry.get("port"):
            urls.append(f"http://{host}:{int(entry['port'])}")
    return urls


def given_up(status: Mapping[str, Any]) -> str | None:
    """Why the deployment will not become ready by itself, else None (pure)."""
    entries = status.get("servers") if isinstance(status.get("servers"), list) else [status]
    for entry in entries:
        if isinstance(entry, Mapping) and (entry.get("gave_up") or entry.get("state") == "FATAL"):
            return str(entry.get("last_failure_reason") or "a server failed to start")
    return None


def read_status(port: int, timeout: float = 5.0) -> tuple[int, dict] | None:
    """(HTTP status, JSON) of the status service, or None when it does not answer (yet)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:  # 503 while not healthy: the body is the same JSON
        try:
            return exc.code, json.loads(exc.read() or b"{}")
        except ValueError:
            return exc.code, {}
    except (OSError, ValueError):
        return None


class _Stopped(Exception):
    pass


def _raise_stopped(signum: int, _frame: object) -> None:
    raise _Stopped(signal.Signals(signum).name)


def wait_ready(status_port: int, pid: int | None, timeout: float, note_every: float = 60.0) -> list[str]:
    started = time.monotonic()
    next_note = started + note_every
    while True:
        reply = read_status(status_port)
        if reply is not None:
            code, status = reply
            if code == 200 and status.get("healthy"):
                urls = server_urls(status)
                if urls:
                    return urls
            reason = given_up(status)
            if reason is not None:
                raise RuntimeError(f"the server was left stopped: {reason}")
        if pid is not None and not psutil.pid_exists(pid):
            raise RuntimeError(f"the server manager (pid {pid}) exited before its servers were ready")
        waited = time.monotonic() - started
        if waited > timeout:
            raise RuntimeError(f"the servers were not ready after {timeout:g} s (OLMOCR_READY_TIMEOUT)")
        if time.monotonic() >= next_note:
            print(f"olmocr: waiting for the servers to load the model ({waited:.0f} s so far)", file=sys.stderr,
                  flush=True)
            next_note += note_every
        time.sleep(1.0)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m olmocr.cluster.ready",
                                     description="Wait for a task's supervised servers; print their URLs.")
    parser.add_argument("--status-port", type=int, required=True, help="the deployment's OLMOCR_STATUS_PORT")
    parser.add_argument("--pid", type=int, default=None, help="the manager's pid: stop waiting when it exits")
    parser.add_argument("--timeout", type=float, default=1200.0, help="longest wait in seconds (default 1200)")
    args = parser.parse_args(argv)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(sig, _raise_stopped)
    try:
        urls = wait_ready(args.status_port, args.pid, args.timeout)
    except _Stopped as exc:
        print(f"olmocr: {exc} while the servers were starting: no work was claimed", file=sys.stderr)
        return STOPPED_EXIT
    except RuntimeError as exc:
        print(f"olmocr: {exc}", file=sys.stderr)
        return 1
    print(",".join(urls))
    return 0


if __name__ == "__main__":
    sys.exit(main())
