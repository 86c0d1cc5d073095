"""What a Kubernetes probe costs: ``bench/run probes``.

The kubelet probes every server pod every few seconds (readiness every 5 s, liveness every 10 s in
deploy/kubernetes). The status service answers ``/readyz`` and ``/livez`` from its latest reading; the
alternative, a probe that asks supervisord itself (an exec probe running ``olmocr-server-status``, or an
HTTP handler doing the XML-RPC multicall per request), costs a round trip on supervisord every time.

On the repository's supervisord deployment (the stand-in as vLLM), in one run:

1. ``PROBES`` sequential ``GET /readyz`` over HTTP: latency (median, p99) and the CPU seconds that
   supervisord and the status service spend per probe (psutil, over the window);
2. ``PROBES`` sequential XML-RPC multicalls (``olmocr.server.status.fetch_status``), what a per-probe round
   trip costs: the same figures;
3. one ``olmocr-server-status`` process, what an exec probe costs: wall time (a new Python interpreter);
4. supervisord wedged (SIGSTOP for a few seconds): ``/readyz`` latency, against one XML-RPC round trip,
   which waits for its timeout.
"""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import requests

from bench.common import Figure, log
from bench.recovery import Deployment
from olmocr.server.status import fetch_status

SERVICE = "olmocr-status"
PROBES = 1000
WEDGED_RPC_TIMEOUT_S = 5.0


def _cpu(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return times.user + times.system


def _measure(call: Any, count: int, procs: dict[str, psutil.Process]) -> dict[str, Any]:
    cpu0 = {name: _cpu(p) for name, p in procs.items()}
    latencies = []
    for _ in range(count):
        started = time.perf_counter()
        call()
        latencies.append(time.perf_counter() - started)
    latencies.sort()
    return {"count": count, "median_ms": 1000 * statistics.median(latencies),
            "p99_ms": 1000 * latencies[int(0.99 * (count - 1))],
            "cpu_ms_per_call": {name: 1000 * (_cpu(p) - cpu0[name]) / count for name, p in procs.items()}}


def run(quick: bool = False, log_dir: Path | None = None) -> tuple[list[Figure], dict]:
    count = PROBES // 4 if quick else PROBES
    log_dir = log_dir or Path("bench/out/logs/probes")
    log_dir.mkdir(parents=True, exist_ok=True)
    dep = Deployment(log_dir)
    try:
        dep.wait_healthy(60)
        rpc = dep.rpc()
        procs = {"supervisord": psutil.Process(dep.proc.pid),
                 "status service": psutil.Process(rpc.supervisor.getProcessInfo(SERVICE)["pid"])}
        session = requests.Session()
        url = f"http://127.0.0.1:{dep.status_port}/readyz"
        time.sleep(3)  # past start-up work
        assert session.get(url, timeout=5).status_code == 200

        def probe() -> None:
            assert session.get(url, timeout=5).status_code == 200

        def round_trip() -> None:
            assert fetch_status(rpc)["healthy"]

        log(f"probes: {count} GET /readyz")
        http = _measure(probe, count, procs)
        log(f"probes: {count} XML-RPC status round trips")
        xmlrpc = _measure(round_trip, count, procs)
        started = time.perf_counter()
        subprocess.run(dep.status_argv(), capture_output=True, timeout=60, check=False)
        exec_s = time.perf_counter() - started
        log("probes: supervisord wedged (SIGSTOP)")
        from olmocr.server.rpcclient import connect

        short = connect(f"unix://{dep.socket_path}", timeout=WEDGED_RPC_TIMEOUT_S)
        os.kill(dep.proc.pid, signal.SIGSTOP)
        try:
            wedged = _measure(probe, 20, {})
            started = time.perf_counter()
            try:
                fetch_status(short)
                wedged_rpc = {"answered": True}
            except Exception as exc:  # noqa: BLE001 - the timeout is what we measure
                wedged_rpc = {"answered": False, "error": type(exc).__name__}
            wedged_rpc["seconds"] = time.perf_counter() - started
        finally:
            os.kill(dep.proc.pid, signal.SIGCONT)
        detail = {"readyz": http, "xmlrpc": xmlrpc, "exec_status_script_s": exec_s,
                  "readyz_supervisord_wedged": wedged, "xmlrpc_supervisord_wedged": wedged_rpc,
                  "python": sys.version.split()[0]}
    finally:
        dep.stop()

    sup_http = http["cpu_ms_per_call"]["supervisord"]
    sup_rpc = xmlrpc["cpu_ms_per_call"]["supervisord"]
    figures = [
        Figure("probes", "GET /readyz latency (median)", http["median_ms"], "ms",
               "XML-RPC status round trip (median)", ratio=http["median_ms"] / xmlrpc["median_ms"],
               context=f"p99 {http['p99_ms']:.2f} ms vs {xmlrpc['p99_ms']:.2f} ms"),
        Figure("probes", "supervisord CPU per /readyz", sup_http, "ms",
               "supervisord CPU per XML-RPC round trip", ratio=sup_http / sup_rpc if sup_rpc > 0 else None,
               context=f"status service {http['cpu_ms_per_call']['status service']:.2f} ms per probe; "
                       f"round trip {sup_rpc:.2f} ms on supervisord"),
        Figure("probes", "exec probe (olmocr-server-status)", exec_s * 1000, "ms",
               "GET /readyz (median)", ratio=exec_s * 1000 / http["median_ms"],
               context="a new interpreter per probe; exec probes time out after 1 s by default"),
        Figure("probes", "GET /readyz, supervisord wedged (median)", wedged["median_ms"], "ms",
               f"XML-RPC round trip, supervisord wedged ({WEDGED_RPC_TIMEOUT_S:g} s timeout)",
               ratio=wedged["median_ms"] / (1000 * wedged_rpc["seconds"]),
               context=f"round trip {'answered' if wedged_rpc['answered'] else 'timed out'} after "
                       f"{wedged_rpc['seconds']:.1f} s; /livez turns 503 after 30 s without a reading"),
    ]
    return figures, detail
