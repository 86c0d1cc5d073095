"""One box, many GPUs: the real supervisord with the checked-in supervisord.conf runs one supervised
stand-in per "GPU" (OLMOCR_GPUS), each placed on its GPU and port, each probed, restarted and counted on
its own, with one status service for the box."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import stat
import subprocess
import sys
import time

import aiohttp
import psutil
import pytest
import requests

from olmocr.port_owner import port_taken
from olmocr.server.box_ports import STATUS_PORT_FIX
from tests.deployment_helpers import Deployment, wait_for
from tests.metrics_helpers import parse_metrics
from tests.standin_helpers import free_port_run

pytestmark = pytest.mark.integration

MODEL = "allenai/olmOCR-7B-0825-FP8"


def all_healthy(n: int):
    return lambda s: s["healthy"] and len(s["servers"]) == n and all(e["healthy"] for e in s["servers"])


def info(url: str) -> dict:
    return requests.get(f"{url}/admin/info", timeout=5).json()


def metric(metrics: dict[str, float], name: str, server: str, gpu: str, **labels: str) -> float:
    labels = {"model": MODEL, "server": server, "gpu": gpu, **labels}
    return metrics[f"{name}{{{','.join(f'{k}={v}' for k, v in sorted(labels.items()))}}}"]


@pytest.fixture
def box():
    """Three "GPUs" 0,1,2 behind one supervisord."""
    base = free_port_run(3)
    dep = Deployment(env={"OLMOCR_GPUS": "0,1,2", "OLMOCR_PORT": str(base)})
    dep.port = base
    try:
        yield dep.start()
    finally:
        dep.cleanup()


@pytest.mark.slow
def test_three_gpus_three_servers_placed_on_their_gpu_and_port(box):
    status = box.wait_status(all_healthy(3), 60, "three healthy servers")
    assert status["restart_count"] == 0 and status["port"] == box.port
    for i, entry in enumerate(status["servers"]):
        assert entry["name"] == f"vllm-{i}"
        assert entry["gpus"] == [str(i)]
        assert entry["url"] == f"http://127.0.0.1:{box.port + i}"
        assert entry["port"] == box.port + i and entry["state"] == "RUNNING"
        seen = info(entry["url"])  # the stand-in says where it runs
        assert seen["cuda_visible_devices"] == str(i)
        assert seen["port"] == box.port + i and seen["pid"] == entry["pid"]
        assert seen["tmpdir"].endswith(f"/run/vllm-tmp-{i}")
        assert (box.dir / "logs" / f"vllm-{i}.log").stat().st_size > 0
    assert len({e["pid"] for e in status["servers"]}) == 3

    ctl = box.supervisorctl("status").stdout
    for i in range(3):
        assert any(line.startswith(f"vllm:vllm-{i} ") and "RUNNING" in line for line in ctl.splitlines()), ctl
    # reread finds the expanded program unchanged (the RPC extension expands the re-read file too)
    assert "No config updates" in box.supervisorctl("reread").stdout

    script = box.run_status_script()
    assert script.returncode == 0, script.stdout

    # one status service for the box: every server in /metrics with its server and gpu labels
    metrics = wait_for(lambda: (lambda m: m if all(
        metric(m, "olmocr_server_healthy", f"vllm-{i}", str(i)) == 1.0 for i in range(3)) else None)(
        parse_metrics(requests.get(f"{box.status_url}/metrics", timeout=5).text)), 15, "metrics per server")
    for i in range(3):
        assert metric(metrics, "olmocr_server_up", f"vllm-{i}", str(i)) == 1.0
        assert metric(metrics, "olmocr_server_restarts_total", f"vllm-{i}", str(i)) == 0.0
    body = requests.get(f"{box.status_url}/status", timeout=5).json()
    assert [e["name"] for e in body["servers"]] == ["vllm-0", "vllm-1", "vllm-2"]
    pushed = asyncio.run(_first_ws_message(box.status_url.replace("http://", "ws://") + "/ws"))
    assert [(e["name"], e["gpus"], e["healthy"]) for e in pushed["servers"]] == [
        (f"vllm-{i}", [str(i)], True) for i in range(3)]


async def _first_ws_message(url: str) -> dict:
    async with aiohttp.ClientSession() as session, session.ws_connect(url) as ws:
        return json.loads((await ws.receive(timeout=10)).data)


@pytest.mark.slow
def test_a_hang_on_one_gpu_restarts_that_server_alone(box):
    before = box.wait_status(all_healthy(3), 60, "three healthy servers")
    pids = [e["pid"] for e in before["servers"]]
    hung = before["servers"][1]
    requests.post(f"{hung['url']}/admin/control", json={"hang": True}, timeout=5).raise_for_status()

    down = box.wait_status(lambda s: not s["healthy"], 30, "the box unhealthy while one server hangs")
    assert "vllm-1" in down["description"]
    assert box.run_status_script().returncode == 1  # exits 0 only when every server is healthy

    after = box.wait_status(lambda s: all_healthy(3)(s) and s["servers"][1]["restart_count"] == 1, 60,
                            "the hung server restarted and healthy")
    assert [e["restart_count"] for e in after["servers"]] == [0, 1, 0]
    assert after["restart_count"] == 1  # summed for the box
    assert [e["pid"] for e in after["servers"]][0::2] == pids[0::2]  # the others never stopped
    assert after["servers"][1]["pid"] != pids[1]
    assert after["servers"][1]["health_kills"] == 1
    assert after["last_failure_reason"].startswith("vllm-1: ")
    metrics = parse_metrics(requests.get(f"{box.status_url}/metrics", timeout=5).text)
    assert metric(metrics, "olmocr_server_restarts_total", "vllm-1", "1") == 1.0
    assert metric(metrics, "olmocr_server_restarts_total", "vllm-0", "0") == 0.0
    assert sum(v for k, v in metrics.items() if k.startswith("olmocr_server_health_kills_total")
               and "server=vllm-1" in k) == 1.0


def _fake_nvidia_smi(directory, gpus: int) -> None:
    path = directory / "nvidia-smi"
    lines = "".join(f"GPU {i}: NVIDIA H100 80GB HBM3 (UUID: GPU-{i:04d})\n" for i in range(gpus))
    path.write_text(f"#!/bin/sh\n[ \"$1\" = -L ] || exit 9\ncat <<'OUT'\n{lines}OUT\n")
    os.chmod(path, stat.S_IRWXU)


@pytest.mark.slow
def test_all_uses_every_gpu_nvidia_smi_lists_in_tensor_parallel_pairs(tmp_path):
    _fake_nvidia_smi(tmp_path, 4)
    base = free_port_run(2)
    dep = Deployment(env={"OLMOCR_PORT": str(base), "OLMOCR_TENSOR_PARALLEL_SIZE": "2",
                          "CUDA_VISIBLE_DEVICES": None})  # OLMOCR_GPUS unset: all
    dep.env["PATH"] = f"{tmp_path}{os.pathsep}{dep.env['PATH']}"
    try:
        dep.start()
        status = dep.wait_status(all_healthy(2), 60, "two healthy servers")
        assert [e["gpus"] for e in status["servers"]] == [["0", "1"], ["2", "3"]]
        assert [info(e["url"])["cuda_visible_devices"] for e in status["servers"]] == ["0,1", "2,3"]
        cmdline = open(f"/proc/{status['servers'][1]['pid']}/cmdline").read().split("\0")
        assert cmdline[cmdline.index("--tensor-parallel-size") + 1] == "2"
        assert cmdline[cmdline.index("--port") + 1] == str(base + 1)
    finally:
        dep.cleanup()


def run_supervisord(dep: Deployment, *flags: str) -> subprocess.CompletedProcess:
    """``supervisord -c supervisord.conf`` as a user runs it (daemonizing unless ``-n``), to its exit. A
    supervisord that starts instead (the code under test broken) is stopped with everything it started."""
    proc = subprocess.Popen([sys.executable, "-m", "supervisor.supervisord", *flags, "-c", str(dep.config)],
                            env=dep.env, cwd=str(dep.dir), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        kill_supervisord(dep)
        out, err = proc.communicate()
    if proc.returncode == 0:  # it daemonized
        time.sleep(2)
        kill_supervisord(dep)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def kill_supervisord(dep: Deployment) -> None:
    """Every supervisord of ``dep``'s config and what it started: frozen first, so it starts nothing more."""
    for daemon in [d for d in psutil.process_iter(["cmdline"]) if str(dep.config) in (d.info["cmdline"] or [])]:
        with contextlib.suppress(psutil.Error):
            daemon.suspend()
            for process in [*daemon.children(recursive=True), daemon]:
                process.kill()


@pytest.mark.parametrize("flags", [(), ("-n",)], ids=["daemon", "foreground"])
@pytest.mark.parametrize("gpus, visible, reason", [
    ("4", "0", "OLMOCR_GPUS=4 but only 1 GPU(s) are visible (0): lower it or use 'all'"),
    ("0,0", "", "OLMOCR_GPUS='0,0' lists GPU 0 twice"),
])
def test_supervisord_refuses_what_the_box_cannot_serve_in_one_line(flags, gpus, visible, reason):
    """As the foreground manager does: one line, exit 2, nothing started (it used to start one server on the
    default port while the listener and status service watched another)."""
    dep = Deployment(env={"OLMOCR_GPUS": gpus, "CUDA_VISIBLE_DEVICES": visible})
    try:
        done = run_supervisord(dep, *flags)
        assert done.returncode == 2, done.stdout + done.stderr
        assert done.stderr.strip() == f"Error: olmocr: {reason}", done.stderr
        assert "Traceback" not in dep.log_text("supervisord")
        assert not (dep.dir / "run" / "supervisord.pid").exists()
        assert not list((dep.dir / "logs").glob("vllm*")) and not list((dep.dir / "logs").glob("olmocr-status*"))
        assert not port_taken("127.0.0.1", dep.port)
    finally:
        dep.cleanup()


def test_supervisord_names_a_taken_status_port_and_its_owner():
    dep = Deployment()
    holder = socket.socket()
    try:
        holder.bind(("127.0.0.1", dep.status_port))
        holder.listen()
        done = run_supervisord(dep)
        assert done.returncode == 2, done.stdout + done.stderr
        line = done.stderr.strip()
        assert "\n" not in line and line.startswith(f"Error: olmocr: port {dep.status_port} on 127.0.0.1 (the status "
                                                    f"service) is already in use by pid {os.getpid()} ("), line
        assert line.endswith(STATUS_PORT_FIX), line
        assert not port_taken("127.0.0.1", dep.port)  # no server was started
    finally:
        holder.close()
        dep.cleanup()


def test_the_status_port_inside_the_servers_range_is_refused():
    base = free_port_run(2)
    dep = Deployment(env={"CUDA_VISIBLE_DEVICES": "0,1", "OLMOCR_PORT": str(base),
                          "OLMOCR_STATUS_PORT": str(base + 1)})
    try:
        done = run_supervisord(dep)
        assert done.returncode == 2
        assert done.stderr.strip() == (f"Error: olmocr: OLMOCR_STATUS_PORT={base + 1} is a vLLM server's port (the "
                                       f"servers use {base}-{base + 1}): unset it (default 29999) or choose a port "
                                       "outside the servers' range"), done.stderr
    finally:
        dep.cleanup()
