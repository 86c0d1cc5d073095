"""The status service's one port (issue 28, item 1): ``envs.DEFAULT_STATUS_PORT`` on every box, whatever its
GPU count, never a server's; everything that names it (Dockerfile, Prometheus, Kubernetes, Slurm, the docs)
names that port; a real box of 1, 2 and 8 stand-in servers serves its status there and nowhere else."""

from __future__ import annotations

import contextlib
import re
import socket
import subprocess
import sys
import time

import pytest
import requests
import yaml

from olmocr import envs
from olmocr.cluster.port_block import BLOCK, choose_block
from olmocr.port_owner import port_owner, port_taken
from olmocr.server.box_ports import check_status_port
from olmocr.server.errors import SettingsError
from olmocr.server.gpus import plan_servers
from tests.deployment_helpers import Deployment, wait_for
from tests.metrics_helpers import parse_metrics
from tests.standin_helpers import REPO_ROOT

STATUS_PORT = envs.DEFAULT_STATUS_PORT


def test_the_default_status_port_is_outside_every_server_range_from_the_default_port():
    for servers in range(1, 65):  # up to 64 servers (GPUs) on one box
        slots = plan_servers([str(i) for i in range(servers)], 1, envs.DEFAULT_PORT)
        assert STATUS_PORT not in {s.port for s in slots}
        check_status_port(STATUS_PORT, slots)
    # A status port set inside the servers' range is refused in one line that says what to do.
    slots = plan_servers(["0", "1", "2"], 1, envs.DEFAULT_PORT)
    with pytest.raises(SettingsError, match=r"OLMOCR_STATUS_PORT=30025 is a vLLM server's port \(the servers use "
                                            r"30024-30026\): unset it \(default 29999\)"):
        check_status_port(30025, slots)


def test_the_slurm_block_keeps_the_status_port_apart_from_its_servers():
    for servers in range(1, BLOCK - 1):
        start = choose_block(7, servers, lambda _port: True)
        status = start + BLOCK - 1  # what port_block prints as OLMOCR_STATUS_PORT
        assert status not in range(start, start + servers)


def _ports_in(text: str) -> set[int]:
    return {int(p) for p in re.findall(r"\b(\d{5})\b", text)}


def test_everything_that_names_the_status_port_names_the_one_default():
    dockerfile = (REPO_ROOT / "Dockerfile").read_text()
    healthcheck = re.search(r"HEALTHCHECK.*?CMD (\[.*?\])\n", dockerfile, re.S).group(1)
    assert f"http://127.0.0.1:{STATUS_PORT}/livez" in healthcheck
    assert re.search(rf"^EXPOSE {envs.DEFAULT_PORT} {STATUS_PORT}$", dockerfile, re.M)

    prom = yaml.safe_load((REPO_ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job["static_configs"][0]["targets"] for job in prom["scrape_configs"]}
    assert jobs["olmocr-status"] == [f"127.0.0.1:{STATUS_PORT}"]
    assert jobs["olmocr-vllm"] == [f"127.0.0.1:{envs.DEFAULT_PORT}"]

    kube = REPO_ROOT / "deploy" / "kubernetes" / "base"
    config = yaml.safe_load((kube / "server-config.yaml").read_text())
    assert config["data"]["OLMOCR_STATUS_PORT"] == str(STATUS_PORT)
    service = yaml.safe_load((kube / "server-service.yaml").read_text())
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]}["status"] == STATUS_PORT
    deployment = yaml.safe_load((kube / "server-deployment.yaml").read_text())
    pod = deployment["spec"]["template"]
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(STATUS_PORT)
    server = next(c for c in pod["spec"]["containers"] if c["name"] == "server")
    assert {p["name"]: p["containerPort"] for p in server["ports"]}["status"] == STATUS_PORT

    # No guide, shipped file or comment still names the old "port after the last server" (30025).
    files = [REPO_ROOT / "README.md", REPO_ROOT / "supervisord.conf", REPO_ROOT / "Dockerfile",
             *(REPO_ROOT / "deploy").rglob("*.*"), *(REPO_ROOT / "docs").glob("*.md"),
             REPO_ROOT / "scripts" / "demo", REPO_ROOT / "scripts" / "olmocr-status-service"]
    for path in files:
        text = path.read_text(errors="replace")
        assert "port after the last" not in text, path
        for line in text.splitlines():
            if "30025" in line and str(STATUS_PORT) not in line and re.search(r"status (service|port|on)|STATUS_PORT|olmocr-status", line, re.I):
                raise AssertionError(f"{path}: {line}")
    observability = (REPO_ROOT / "docs" / "observability.md").read_text()
    assert f"http://127.0.0.1:{STATUS_PORT}/" in observability


@contextlib.contextmanager
def default_ports_held(timeout: float = 600.0):
    """The box's default ports are one per machine: tests that use them take turns. The lock is an abstract
    unix socket (Linux): nothing on disk, released when the process ends however it ends."""
    lock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    deadline = time.monotonic() + timeout
    while True:
        try:
            lock.bind(f"\0olmocr-serve-tests-default-ports-{STATUS_PORT}")
            break
        except OSError:
            if time.monotonic() > deadline:
                raise AssertionError("another test kept the default ports for 10 minutes") from None
            time.sleep(0.5)
    try:
        yield
    finally:
        lock.close()


def wait_free(ports: list[int], timeout: float = 60.0) -> None:
    def free() -> bool:
        return not any(port_taken("127.0.0.1", p) for p in ports)
    with contextlib.suppress(AssertionError):
        wait_for(free, timeout, "the default ports")
    taken = [f"{p} ({port_owner(p) or 'owner not visible'})" for p in ports if port_taken("127.0.0.1", p)]
    assert not taken, f"default ports taken on this machine, stop what holds them: {', '.join(taken)}"


@pytest.mark.integration
@pytest.mark.parametrize("servers", [1, 2, 8])
def test_the_status_service_answers_on_the_fixed_port_whatever_the_gpu_count(servers):
    """The user's box with every port at its default: OLMOCR_PORT and OLMOCR_STATUS_PORT unset, N "GPUs"."""
    prom = yaml.safe_load((REPO_ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    target = next(j for j in prom["scrape_configs"] if j["job_name"] == "olmocr-status")["static_configs"][0]
    healthcheck = re.search(r"urlopen\('([^']+)'", (REPO_ROOT / "Dockerfile").read_text()).group(1)
    ports = [envs.DEFAULT_PORT + i for i in range(servers)]
    with default_ports_held():
        wait_free([*ports, STATUS_PORT])
        # N stand-in "GPUs" on a machine without one, as docs/standin.md says: OLMOCR_GPUS=all (the default)
        # serves every device CUDA_VISIBLE_DEVICES names.
        dep = Deployment(env={"CUDA_VISIBLE_DEVICES": ",".join(str(i) for i in range(servers)),
                              "OLMOCR_HEALTH_INTERVAL": "2"})
        for name in ("OLMOCR_PORT", "OLMOCR_STATUS_PORT"):
            dep.env.pop(name)
        dep.port, dep.status_port = envs.DEFAULT_PORT, STATUS_PORT
        try:
            dep.start()
            status = dep.wait_status(lambda s: s["healthy"] and len(s["servers"]) == servers, 120,
                                     f"{servers} healthy servers")
            assert [e["port"] for e in status["servers"]] == ports
            vllm_url = (f"http://127.0.0.1:{ports[0]}" if servers == 1
                        else f"http://127.0.0.1:{ports[0]}-{ports[-1]}")
            assert status["vllm_url"] == vllm_url
            assert status["status_service"]["url"] == f"http://127.0.0.1:{STATUS_PORT}"

            # Prometheus' status job scrapes the status service (its olmocr_server_* series, one per server),
            # not a vLLM server's metrics.
            text = requests.get(f"http://{target['targets'][0]}/metrics", timeout=5).text
            up = {k: v for k, v in parse_metrics(text).items() if k.startswith("olmocr_server_up{")}
            assert len(up) == servers and "vllm:" not in text, text[:500]
            # The container's health check asks the status service too.
            assert requests.get(healthcheck, timeout=5).text.strip() == "ok"
            # And the status page is there (a vLLM server answers / with 404).
            page = requests.get(f"http://127.0.0.1:{STATUS_PORT}/", timeout=5)
            assert page.status_code == 200 and "<html" in page.text.lower()

            # olmocr-server-status names both addresses, in the JSON and on the table's header.
            script = subprocess.run([sys.executable, "-m", "olmocr.server.status", "-c", str(dep.config)],
                                    capture_output=True, text=True, timeout=30, env=dep.env)
            assert script.returncode == 0, script.stdout + script.stderr
            assert f'"vllm_url": "{vllm_url}"' in script.stdout
            assert f'"url": "http://127.0.0.1:{STATUS_PORT}"' in script.stdout and '"answering": true' in script.stdout
        finally:
            dep.cleanup()
