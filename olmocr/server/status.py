"""``olmocr-server-status``: the deployment's health from supervisord's XML-RPC interface.

On a terminal it prints a table (one row per server); piped, redirected or with ``--json`` it prints
the JSON (fields unchanged, for scripts). Exit status: 0 healthy, 1 unhealthy (or stopped), 2
supervisord unreachable.
"""

from __future__ import annotations

import argparse
import configparser
import json
import os
import sys
import time
import xmlrpc.client
from collections.abc import Mapping
from typing import Any

from olmocr.server.rpcclient import connect
from olmocr.server.settings import PROGRAM_NAME

EXIT_HEALTHY, EXIT_UNHEALTHY, EXIT_UNREACHABLE = 0, 1, 2


def build_status(info: Mapping[str, Any], stats: Mapping[str, Any], settings: Mapping[str, Any]) -> dict:
    """Combine supervisord's process info, our restart/health stats and the settings (pure)."""
    probe = stats.get("health") or {}
    running = info.get("statename") == "RUNNING"
    healthy = bool(running and probe.get("healthy"))
    uptime = info["now"] - info["start"] if running and info.get("start") else 0
    return {
        "healthy": healthy,
        "pid": info.get("pid") or None,
        "port": settings.get("port"),
        "model": settings.get("model"),
        "restart_count": stats.get("restarts", 0),
        "uptime_seconds": uptime,
        "last_health_check": _iso(probe.get("time")),
        "state": info.get("statename"),
        "health_phase": probe.get("phase"),
        "last_exit_status": stats.get("last_exit_status"),
        "last_exit_time": _iso(stats.get("last_exit_time")),
        "last_failure_reason": stats.get("gave_up_reason") or stats.get("last_failure_reason"),
        "last_failure_time": _iso(stats.get("last_failure_time")),
        "probe_latency_ms": probe.get("latency_ms"),
        "consecutive_failures": probe.get("consecutive_failures", 0),
        "consecutive_restarts": stats.get("consecutive_restarts", 0),
        "health_kills": stats.get("kills", 0),
        "gave_up": bool(stats.get("gave_up")),
        "description": info.get("description"),
    }


def history_fields(stats: Mapping[str, Any]) -> dict:
    """What the status page adds to :func:`build_status` (oldest first): the reasons of the last failures
    and restarts (a signal named), the health check's last decisions, ``[time, latency_ms, ok]`` of the
    last probes. The status service sends them; this script's JSON keeps the fields above only."""
    return {
        "last_exit_signal": stats.get("last_exit_signal"),
        "recent_failures": list(stats.get("recent_failures") or []),
        "health_decisions": list(stats.get("recent_decisions") or []),
        "probe_history": list(stats.get("probe_history") or []),
    }


def unreachable_status(url: str, exc: BaseException) -> dict:
    return {"healthy": False, "error": f"supervisord unreachable at {url}: {exc}"}


def _iso(timestamp: float | None) -> str | None:
    if not timestamp:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))


def fetch_parts(proxy: Any, program: str = PROGRAM_NAME) -> tuple[dict, dict, dict]:
    """supervisord's process info, our stats and the settings, in one XML-RPC round trip (multicall)."""
    # supervisord's system.multicall returns results unwrapped (the multicall convention wraps each in a
    # list, which xmlrpc.client.MultiCall expects), and a failed call as a {faultCode, faultString} struct.
    results = proxy.system.multicall([
        {"methodName": "supervisor.getProcessInfo", "params": [program]},
        {"methodName": "olmocr.getProcessStats", "params": [program]},
        {"methodName": "olmocr.getSettings", "params": []},
    ])
    for result in results:
        if isinstance(result, dict) and "faultCode" in result and "faultString" in result:
            raise xmlrpc.client.Fault(result["faultCode"], result["faultString"])
    info, stats, settings = results
    return info, stats, settings


def fetch_status(proxy: Any, program: str = PROGRAM_NAME) -> dict:
    return build_status(*fetch_parts(proxy, program))


def server_url_from_config(path: str) -> str:
    """The XML-RPC URL supervisorctl would use for this supervisord.conf."""
    parser = configparser.RawConfigParser()
    if not parser.read(path):
        raise FileNotFoundError(f"cannot read supervisord config {path}")
    here = os.path.dirname(os.path.abspath(path))
    if parser.has_option("supervisorctl", "serverurl"):
        url = parser.get("supervisorctl", "serverurl")
    elif parser.has_option("unix_http_server", "file"):
        url = "unix://" + parser.get("unix_http_server", "file")
    else:
        raise ValueError(f"{path} has no [supervisorctl] serverurl nor [unix_http_server] file")
    return url.replace("%(here)s", here)


def add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    """How to reach supervisord: shared by this script and the status service."""
    parser.add_argument("-c", "--configuration", default=None,
                        help="supervisord.conf to find the socket in (default ./supervisord.conf)")
    parser.add_argument("-s", "--server-url", default=os.environ.get("OLMOCR_SUPERVISOR_URL"),
                        help="unix:///path/to/supervisor.sock or http://127.0.0.1:9001 (env OLMOCR_SUPERVISOR_URL)")
    parser.add_argument("-u", "--username", default=os.environ.get("SUPERVISOR_USERNAME", ""))
    parser.add_argument("--password-file", default=None,
                        help="file holding the password for TCP control (or env SUPERVISOR_PASSWORD); "
                             "never pass a password on the command line")
    parser.add_argument("--program", default=PROGRAM_NAME)
    parser.add_argument("--timeout", type=float, default=10.0)


def connection_from_args(args: argparse.Namespace) -> tuple[str, Any]:
    """(URL, proxy) for the parsed connection arguments; raises OSError/ValueError if no URL is found."""
    password = os.environ.get("SUPERVISOR_PASSWORD", "")
    if args.password_file:
        with open(args.password_file, encoding="utf-8") as handle:
            password = handle.read().strip()
    url = args.server_url or server_url_from_config(args.configuration or "supervisord.conf")
    return url, connect(url, username=args.username, password=password, timeout=args.timeout)


def _duration(seconds: float | None) -> str:
    seconds = int(seconds or 0)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes:02d}m"
    return f"{minutes}m {secs:02d}s" if minutes else f"{secs}s"


def _phase(status: Mapping[str, Any]) -> str:
    if status.get("gave_up"):
        return "gave up"
    state = str(status.get("state") or "unknown").lower()
    if state in ("running", "starting"):
        return str(status.get("health_phase") or "starting")
    return state


COLUMNS = ("SERVER", "HEALTH", "PHASE", "PID", "UPTIME", "RESTARTS", "KILLS", "PROBE", "LAST CHECK (UTC)")


def format_table(status: Mapping[str, Any]) -> str:
    """The status as a table, one row per server (``servers`` when present, else the top level), each
    server's last failure below it (pure)."""
    if status.get("error") and "state" not in status and not status.get("servers"):
        return f"olmocr deployment: UNREACHABLE\n  {status['error']}"
    servers = status.get("servers") or [status]
    rows = [COLUMNS]
    notes: list[str] = []
    for index, server in enumerate(servers):
        name = str(server.get("url") or (f"port {server['port']}" if server.get("port") else f"server {index + 1}"))
        if server.get("gpus") not in (None, "", []):
            gpus = server["gpus"]
            name += f" (GPU {','.join(map(str, gpus)) if isinstance(gpus, list) else gpus})"
        latency = server.get("probe_latency_ms")
        restarts = f"{server.get('restart_count', 0)}"
        if server.get("consecutive_restarts"):
            restarts += f" ({server['consecutive_restarts']} in a row)"
        rows.append((
            name,
            "healthy" if server.get("healthy") else "UNHEALTHY",
            _phase(server),
            str(server.get("pid") or "-"),
            _duration(server.get("uptime_seconds")) if server.get("state") == "RUNNING" else "-",
            restarts,
            str(server.get("health_kills", 0)),
            "-" if latency is None else f"{latency:.0f} ms",
            (server.get("last_health_check") or "never").replace("T", " ").rstrip("Z"),
        ))
        if server.get("last_failure_reason"):
            when = (server.get("last_failure_time") or "").replace("T", " ").rstrip("Z")
            notes.append(f"{name}: last failure {when} UTC: {server['last_failure_reason']}")
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    healthy = sum(1 for s in servers if s.get("healthy"))
    model = status.get("model") or servers[0].get("model") or "?"
    lines = [f"olmocr deployment: {healthy} of {len(servers)} server{'s' if len(servers) != 1 else ''} healthy "
             f"(model {model})", ""]
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]
    if notes:
        lines += [""] + notes
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="olmocr-server-status", description=__doc__.split("\n")[0])
    add_connection_arguments(parser)
    parser.add_argument("--watch", nargs="?", type=float, const=5.0, default=None, metavar="SECONDS",
                        help="refresh every SECONDS (default 5) until interrupted")
    parser.add_argument("--json", action="store_true",
                        help="print JSON even on a terminal (it is the default when the output is piped)")
    args = parser.parse_args(argv)
    table = not args.json and sys.stdout.isatty()

    try:
        url, proxy = connection_from_args(args)
    except (OSError, ValueError) as exc:
        failure = {"healthy": False, "error": f"{exc}; pass -c CONFIG or --server-url"}
        print(format_table(failure) if table else json.dumps(failure))
        return EXIT_UNREACHABLE

    while True:
        try:
            status = fetch_status(proxy, args.program)
            code = EXIT_HEALTHY if status["healthy"] else EXIT_UNHEALTHY
        except Exception as exc:
            status = unreachable_status(url, exc)
            code = EXIT_UNREACHABLE
        if table:
            clear = "\033[H\033[J" if args.watch else ""  # redraw in place
            print(clear + format_table(status), flush=True)
        else:
            print(json.dumps(status, indent=None if args.watch else 2), flush=True)
        if args.watch is None:
            return code
        try:
            time.sleep(args.watch)
        except KeyboardInterrupt:
            return code


if __name__ == "__main__":
    sys.exit(main())
