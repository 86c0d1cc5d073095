"""What the status service costs, and how fast it tells: ``bench/run statusd``.

The repository's supervisord deployment (as in the recovery section, the stand-in as vLLM, default
health settings) runs the status service as ``[program:olmocr-status]``. Measured on that process
(psutil), in windows of equal length:

1. idle: no client; its RSS/USS and CPU time per second, next to supervisord's own in the same window;
2. 50 WebSocket clients connected (aiohttp clients in this process, each reading every push): the same;
3. supervisord's CPU with the service stopped (``stopProcess``): what the service's polling adds;
4. ``kill -9`` of the server with the 50 clients connected: time until every client got the
   status saying so (a restart counted), compared with the nominal poll interval + supervisord's
   respawn (1 s each).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import psutil

from bench.common import Figure, log
from bench.recovery import Deployment

SERVICE = "olmocr-status"
CLIENTS = 50


def _cpu_seconds(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return times.user + times.system


class Window:
    """CPU seconds per wall second and memory of some processes over one measurement window."""

    def __init__(self, procs: dict[str, psutil.Process]) -> None:
        self.procs = procs
        self.t0 = time.monotonic()
        self.cpu0 = {name: _cpu_seconds(p) for name, p in procs.items()}

    def close(self) -> dict[str, dict[str, float]]:
        elapsed = time.monotonic() - self.t0
        out = {}
        for name, proc in self.procs.items():
            mem = proc.memory_full_info()
            out[name] = {"cpu_percent": 100.0 * (_cpu_seconds(proc) - self.cpu0[name]) / elapsed,
                         "rss_mb": mem.rss / 1e6, "uss_mb": mem.uss / 1e6, "seconds": elapsed}
        return out


async def _clients_session(url: str, count: int, hold: float, kill: Any) -> dict[str, Any]:
    """Connect ``count`` clients, check each gets the state at once, hold them ``hold`` s, then call
    ``kill()`` and time until every client has a message with a higher restart count."""
    import aiohttp

    received = [0] * count
    restart_seen_at: list[float | None] = [None] * count
    baseline: list[int] = [0] * count
    first_latency: list[float] = []

    async with aiohttp.ClientSession() as session:
        sockets = []
        for _ in range(count):
            started = time.monotonic()
            ws = await session.ws_connect(url)
            first = json.loads((await ws.receive(timeout=5)).data)
            first_latency.append(time.monotonic() - started)
            baseline[len(sockets)] = first.get("restart_count", 0)
            sockets.append(ws)

        async def read(i: int, ws: Any) -> None:
            async for msg in ws:
                received[i] += 1
                status = json.loads(msg.data)
                if restart_seen_at[i] is None and status.get("restart_count", 0) > baseline[i]:
                    restart_seen_at[i] = time.monotonic()

        readers = [asyncio.create_task(read(i, ws)) for i, ws in enumerate(sockets)]
        await asyncio.sleep(hold)
        messages_while_holding = sum(received)
        killed_at = time.monotonic()
        await asyncio.to_thread(kill)
        deadline = killed_at + 30
        while any(t is None for t in restart_seen_at) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for task in readers:
            task.cancel()
        for ws in sockets:
            await ws.close()
    seen = [t - killed_at for t in restart_seen_at if t is not None]
    return {"messages_per_client_per_s": messages_while_holding / count / hold,
            "first_message_s_max": max(first_latency), "notified": len(seen),
            "kill_to_all_notified_s": max(seen) if len(seen) == count else None,
            "kill_to_first_notified_s": min(seen) if seen else None}


def run(quick: bool = False, log_dir: Path | None = None) -> tuple[list[Figure], dict]:
    window = 10.0 if quick else 30.0
    log_dir = log_dir or Path("bench/out/logs/statusd")
    log_dir.mkdir(parents=True, exist_ok=True)
    dep = Deployment(log_dir)
    detail: dict[str, Any] = {"window_s": window, "clients": CLIENTS}
    try:
        dep.wait_healthy(60)
        rpc = dep.rpc()
        service = psutil.Process(rpc.supervisor.getProcessInfo(SERVICE)["pid"])
        supervisord = psutil.Process(dep.proc.pid)
        url = f"http://127.0.0.1:{dep.status_port}/ws"
        time.sleep(3)  # past start-up work
        log(f"statusd: idle window {window:g} s")
        w = Window({"service": service, "supervisord": supervisord})
        time.sleep(window)
        idle = w.close()
        log(f"statusd: {CLIENTS} WebSocket clients, {window:g} s")

        def kill() -> None:
            os.kill(dep.info()["pid"], signal.SIGKILL)

        w = Window({"service": service, "supervisord": supervisord})
        holder: dict[str, Any] = {}

        def hold_and_measure() -> None:
            holder["ws"] = asyncio.run(_clients_session(url, CLIENTS, window, kill))

        # The clients' own CPU is this process's; the window covers only the service and supervisord.
        hold_and_measure()
        busy = w.close()
        clients = holder["ws"]
        dep.wait_healthy(60, since=time.time())
        log(f"statusd: supervisord without the service, {window:g} s")
        dep.rpc().supervisor.stopProcess(SERVICE, True)
        time.sleep(2)
        w = Window({"supervisord": supervisord})
        time.sleep(window)
        without = w.close()
        dep.rpc().supervisor.startProcess(SERVICE, True)
        detail.update(idle=idle, with_clients=busy, supervisord_without_service=without, websocket=clients)
    finally:
        dep.stop()

    s_idle, s_busy = idle["service"], busy["service"]
    sup_with, sup_without = idle["supervisord"]["cpu_percent"], without["supervisord"]["cpu_percent"]
    detail["supervisord_cpu_percent"] = {"with_service": sup_with, "without_service": sup_without}
    notify = clients["kill_to_all_notified_s"]
    nominal = 2.0  # supervisord respawn ~1 s + one poll interval (OLMOCR_STATUS_POLL_INTERVAL 1 s)
    figures = [
        Figure("statusd", "status service RSS, idle", s_idle["rss_mb"], "MB", "supervisord RSS, same moment",
               ratio=s_idle["rss_mb"] / idle["supervisord"]["rss_mb"],
               context=f"USS {s_idle['uss_mb']:.1f} MB; supervisord {idle['supervisord']['rss_mb']:.1f} MB"),
        Figure("statusd", f"status service RSS, {CLIENTS} WebSocket clients", s_busy["rss_mb"], "MB",
               "status service RSS idle", ratio=s_busy["rss_mb"] / s_idle["rss_mb"],
               context=f"USS {s_busy['uss_mb']:.1f} MB; {clients['messages_per_client_per_s']:.2f} "
                       "messages/s per client"),
        Figure("statusd", "status service CPU, idle", s_idle["cpu_percent"], "% of a core",
               "supervisord CPU, same window", ratio=_ratio(s_idle["cpu_percent"], sup_with),
               context=f"supervisord {sup_with:.2f} %; polls supervisord every 1 s"),
        Figure("statusd", f"status service CPU, {CLIENTS} WebSocket clients", s_busy["cpu_percent"],
               "% of a core", "status service CPU idle", ratio=_ratio(s_busy["cpu_percent"], s_idle["cpu_percent"]),
               context=f"first message to a new client within {clients['first_message_s_max'] * 1000:.0f} ms"),
        Figure("statusd", "supervisord CPU with the service polling", sup_with, "% of a core",
               "supervisord CPU with the service stopped", ratio=_ratio(sup_with, sup_without),
               context=f"without: {sup_without:.2f} %"),
        Figure("statusd", f"kill -9 -> all {CLIENTS} clients told", notify, "s",
               "nominal 2 s (respawn 1 s + poll 1 s)", ratio=notify / nominal if notify else None,
               context=f"{clients['notified']}/{CLIENTS} notified; first after "
                       f"{clients['kill_to_first_notified_s'] or float('nan'):.2f} s", target="all, within a few s",
               ok=notify is not None and notify < 5.0),
    ]
    return figures, detail


def _ratio(a: float, b: float) -> float | None:
    return a / b if b > 0 else None
