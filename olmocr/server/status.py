"""``olmocr-server-status``: the deployment's health from supervisord's XML-RPC interface.

A box may run several servers (one per GPU, ``OLMOCR_GPUS``). The top-level fields describe the whole box
(``healthy`` only when every server is, ``restart_count`` summed, the latest failure named with its
server); ``servers`` lists each server with the same fields plus ``name``, ``gpus`` and ``url``. With one
server the top level is that server's entry, as before.

On a terminal it prints a table (one row per server); piped, redirected or with ``--json`` it prints the
JSON (fields unchanged, for scripts). Exit status: 0 every server healthy, 1 any unhealthy (or stopped), 2
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

from olmocr import __version__, envs
from olmocr.server.rpcclient import connect
from olmocr.server.settings import PROGRAM_NAME, STATUS_PROGRAM

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


def server_entry(server: Mapping[str, Any], info: Mapping[str, Any], stats: Mapping[str, Any],
                 settings: Mapping[str, Any]) -> dict:
    """One server's status: the seed's fields plus its name, GPUs and URL (pure)."""
    entry = build_status(info, stats, {**settings, "port": server.get("port", settings.get("port"))})
    return {"name": server["name"], "gpus": list(server.get("gpus") or []), "url": server.get("url"), **entry}


def _latest(entries: list[dict], time_key: str) -> dict | None:
    dated = [e for e in entries if e.get(time_key)]
    return max(dated, key=lambda e: e[time_key]) if dated else None


def build_box_status(entries: list[dict]) -> dict:
    """The whole box from its servers' entries (pure): healthy only when all are, counts summed."""
    if len(entries) == 1:
        top = {k: v for k, v in entries[0].items() if k not in ("name", "gpus", "url")}
        return {**top, "servers": entries}
    healthy = all(e["healthy"] for e in entries)
    unhealthy = [e for e in entries if not e["healthy"]]
    states = {e["state"] for e in entries}
    failure = _latest(entries, "last_failure_time")
    exited = _latest(entries, "last_exit_time")
    checks = [e["last_health_check"] for e in entries if e.get("last_health_check")]
    return {
        "healthy": healthy,
        "pid": None,  # several processes: see servers[].pid
        "port": entries[0]["port"],
        "model": entries[0]["model"],
        "restart_count": sum(e["restart_count"] for e in entries),
        "uptime_seconds": min(e["uptime_seconds"] for e in entries),
        "last_health_check": min(checks) if len(checks) == len(entries) else None,
        "state": states.pop() if len(states) == 1 else (unhealthy[0] if unhealthy else entries[0])["state"],
        "health_phase": "healthy" if healthy else (unhealthy[0]["health_phase"] or "starting"),
        "last_exit_status": exited["last_exit_status"] if exited else None,
        "last_exit_time": exited["last_exit_time"] if exited else None,
        "last_failure_reason": f"{failure['name']}: {failure['last_failure_reason']}" if failure else None,
        "last_failure_time": failure["last_failure_time"] if failure else None,
        "probe_latency_ms": max((e["probe_latency_ms"] for e in entries if e.get("probe_latency_ms") is not None),
                                default=None),
        "consecutive_failures": max(e["consecutive_failures"] for e in entries),
        "consecutive_restarts": max(e["consecutive_restarts"] for e in entries),
        "health_kills": sum(e["health_kills"] for e in entries),
        "gave_up": all(e["gave_up"] for e in entries),  # the box is left stopped only when every server is
        "description": f"{len(entries) - len(unhealthy)} of {len(entries)} servers healthy"
                       + (f"; not healthy: {', '.join(e['name'] for e in unhealthy)}" if unhealthy else ""),
        "servers": entries,
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


def fetch_servers(proxy: Any, program: str = PROGRAM_NAME) -> list[dict]:
    """The box's servers from the olmocr extension (``program`` alone if it cannot list them)."""
    try:
        servers = proxy.olmocr.getServers()
    except xmlrpc.client.Fault:  # an extension from before getServers
        servers = None
    return servers or [{"name": program, "rpc_name": program, "gpus": []}]


def fetch_box_parts(proxy: Any, program: str = PROGRAM_NAME) -> tuple[list[dict], list[tuple[dict, dict]], dict]:
    """(servers, [(process info, our stats)] per server, settings): two XML-RPC round trips."""
    servers = fetch_servers(proxy, program)
    calls: list[dict] = [{"methodName": "olmocr.getSettings", "params": []}]
    for server in servers:
        calls += [{"methodName": "supervisor.getProcessInfo", "params": [server["rpc_name"]]},
                  {"methodName": "olmocr.getProcessStats", "params": [server["name"]]}]
    calls.append({"methodName": "supervisor.getProcessInfo", "params": [STATUS_PROGRAM]})
    *results, service = proxy.system.multicall(calls)
    for result in results:
        if isinstance(result, dict) and "faultCode" in result and "faultString" in result:
            raise xmlrpc.client.Fault(result["faultCode"], result["faultString"])
    settings = dict(results[0])
    if not (isinstance(service, dict) and "faultCode" in service):  # a layout without the status service
        settings["status_service_info"] = service
    parts = [(results[1 + 2 * i], results[2 + 2 * i]) for i in range(len(servers))]
    for server in servers:
        server.setdefault("port", settings.get("port"))
        server.setdefault("url", settings.get("base_url"))
    return servers, parts, settings


def box_status_from_parts(servers: list[dict], parts: list[tuple[dict, dict]], settings: dict) -> dict:
    status = build_box_status([server_entry(server, info, stats, settings)
                               for server, (info, stats) in zip(servers, parts, strict=True)])
    status["vllm_url"] = settings.get("vllm_url")
    status["status_service"] = status_service_entry(settings)
    return status


def status_service_entry(settings: Mapping[str, Any]) -> dict:
    """The status service's address and supervisord state (pure): ``FATAL`` when it could not start."""
    info = settings.get("status_service_info") or {}
    entry = {"url": settings.get("status_url"), "state": info.get("statename")}
    if info.get("statename") not in (None, "RUNNING", "STARTING"):
        entry["error"] = (f"the status service is {info['statename']}"
                          + (f" ({info['spawnerr']})" if info.get("spawnerr") else "")
                          + f": see {info.get('stdout_logfile') or 'logs/olmocr-status.log'}")
    return entry


def check_status_service(entry: dict, timeout: float = 2.0) -> dict:
    """``entry`` with ``answering``: whether ``GET /livez`` answers at its URL (any HTTP status counts: a
    503 is the service answering), and ``error`` when it does not."""
    import urllib.error
    import urllib.request

    if not entry.get("url"):
        return entry
    try:
        with urllib.request.urlopen(f"{entry['url']}/livez", timeout=timeout):
            pass
        entry["answering"] = True
    except urllib.error.HTTPError:
        entry["answering"] = True
    except (OSError, ValueError) as exc:
        entry["answering"] = False
        reason = getattr(exc, "reason", exc)
        entry.setdefault("error", f"the status service does not answer at {entry['url']} ({reason})")
    return entry


def fetch_status(proxy: Any, program: str = PROGRAM_NAME) -> dict:
    return box_status_from_parts(*fetch_box_parts(proxy, program))


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
                        help="supervisord.conf to find the socket in (default ./supervisord.conf, else the "
                             "checkout's)")
    parser.add_argument("-s", "--server-url", default=envs.text("OLMOCR_SUPERVISOR_URL"),
                        help="unix:///path/to/supervisor.sock or http://127.0.0.1:9001 (env OLMOCR_SUPERVISOR_URL)")
    parser.add_argument("-u", "--username", default=os.environ.get("SUPERVISOR_USERNAME", ""))
    parser.add_argument("--password-file", default=None,
                        help="file holding the password for TCP control (or env SUPERVISOR_PASSWORD); "
                             "never pass a password on the command line")
    parser.add_argument("--program", default=PROGRAM_NAME)
    parser.add_argument("--timeout", type=float, default=10.0)


#: The checkout's supervisord.conf (this file is olmocr/server/status.py in a checkout or an editable install).
CHECKOUT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                               "supervisord.conf")


def default_configuration() -> str:
    """``./supervisord.conf`` when there is one, else the checkout's: the script works from any directory."""
    if os.path.exists("supervisord.conf") or not os.path.exists(CHECKOUT_CONFIG):
        return "supervisord.conf"
    return CHECKOUT_CONFIG


def connection_from_args(args: argparse.Namespace) -> tuple[str, Any]:
    """(URL, proxy) for the parsed connection arguments; raises OSError/ValueError if no URL is found."""
    password = os.environ.get("SUPERVISOR_PASSWORD", "")
    if args.password_file:
        with open(args.password_file, encoding="utf-8") as handle:
            password = handle.read().strip()
    url = args.server_url or server_url_from_config(args.configuration or default_configuration())
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
             f"(model {model})"]
    if status.get("vllm_url"):
        lines.append(f"pipeline: --vllm-url {status['vllm_url']}")
    service = status.get("status_service") or {}
    if service.get("url"):
        lines.append(f"status service: {service['url']}" + (f"  NOT ANSWERING: {service['error']}"
                                                           if service.get("error") else ""))
    lines.append("")
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]
    if notes:
        lines += [""] + notes
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:  # `olmocr-server-status | head`: the reader has gone, which is not an error
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # Python's own flush at exit must not fail again
        return 0


def _main(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(prog="olmocr-server-status", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"olmocr-serve {__version__}")
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
            check_status_service(status["status_service"])
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
