"""The status service: /metrics parsed with prometheus_client's parser, /status, the WebSocket push, the
bearer token, against a real supervisord running the stand-in as vLLM (and in-process for the slow-client
and reading logic)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time

import aiohttp
import pytest
import requests

from olmocr import envs
from olmocr.endpoints import check_exposure, is_loopback
from olmocr.server.errors import EndpointConfigError
from olmocr.server.health import kill_category
from olmocr.server.rpc import ProcessStatsStore
from olmocr.server.status_service import (
    ServiceSettings,
    Snapshot,
    StatusService,
    change_key,
    server_metrics,
)
from tests.deployment_helpers import wait_for
from tests.metrics_helpers import parse_metrics
from tests.standin_helpers import clean_env, free_port

MODEL = "allenai/olmOCR-7B-0825-FP8"


def scrape(url: str, **kw) -> dict[str, float]:
    """``{'name{label=value,...}': value}`` for every sample, parsed by prometheus_client."""
    response = requests.get(f"{url}/metrics", timeout=5, **kw)
    response.raise_for_status()
    assert response.headers["Content-Type"].startswith("text/plain; version=")
    return parse_metrics(response.text)


def m(name: str, **labels: str) -> str:
    labels.setdefault("model", MODEL)
    labels.setdefault("server", "vllm")  # one server, no GPU: the process keeps the name vllm
    labels.setdefault("gpu", "")
    return f"{name}{{{','.join(f'{k}={v}' for k, v in sorted(labels.items()))}}}"


class WsClient:
    """A WebSocket client on its own event loop in a thread-free way: messages are read on demand."""

    def __init__(self, url: str, headers: dict | None = None) -> None:
        self.loop = asyncio.new_event_loop()
        self.session = self.loop.run_until_complete(self._session())
        self.ws = self.loop.run_until_complete(self.session.ws_connect(url, headers=headers or {}))

    @staticmethod
    async def _session() -> aiohttp.ClientSession:
        return aiohttp.ClientSession()

    def receive(self, timeout: float) -> dict:
        msg = self.loop.run_until_complete(self.ws.receive(timeout=timeout))
        assert msg.type == aiohttp.WSMsgType.TEXT, msg
        return json.loads(msg.data)

    def receive_until(self, predicate, timeout: float) -> tuple[dict, float]:
        """The first message satisfying ``predicate`` and the seconds it took."""
        started = time.monotonic()
        while True:
            left = timeout - (time.monotonic() - started)
            assert left > 0, f"no matching WebSocket message within {timeout} s"
            message = self.receive(left)
            if predicate(message):
                return message, time.monotonic() - started

    def close(self) -> None:
        self.loop.run_until_complete(self.ws.close())
        self.loop.run_until_complete(self.session.close())
        self.loop.close()


@pytest.mark.slow
@pytest.mark.integration
def test_kill_9_counts_a_restart_in_metrics_and_is_pushed_over_websocket(deployments):
    dep = deployments()
    before = dep.wait_status(lambda s: s["healthy"], 30, "healthy")
    wait_for(lambda: scrape(dep.status_url)[m("olmocr_server_healthy")] == 1.0, 10, "healthy in /metrics")
    metrics = scrape(dep.status_url)
    assert metrics[m("olmocr_server_up")] == 1.0
    assert metrics[m("olmocr_server_restarts_total")] == 0.0
    assert metrics[m("olmocr_server_health_phase", phase="healthy")] == 1.0
    assert metrics["olmocr_supervisor_up{}"] == 1.0
    assert metrics[m("olmocr_server_last_probe_duration_seconds")] > 0
    assert abs(metrics[m("olmocr_server_last_probe_timestamp_seconds")] - time.time()) < 30

    # /status is the status script's JSON, plus the status page's history.
    status = requests.get(f"{dep.status_url}/status", timeout=5)
    assert status.status_code == 200
    script = json.loads(dep.run_status_script().stdout)
    volatile = {"uptime_seconds", "last_health_check", "probe_latency_ms", "description"}
    history = {"last_exit_signal", "recent_failures", "health_decisions", "probe_history"}

    def steady(part: dict, drop: set) -> dict:  # the box and each of its servers, without what ticks
        return {k: ([steady(e, drop) for e in v] if k == "servers" else v) for k, v in part.items() if k not in drop}

    assert steady(status.json(), volatile | history) == steady(script, volatile)
    assert [e["name"] for e in script["servers"]] == ["vllm"]
    assert status.json()["probe_history"] and status.json()["health_decisions"][-1]["decision"] == "healthy"

    client = WsClient(f"{dep.status_url}/ws")
    try:
        first = client.receive(timeout=2)  # the current state at once
        assert first["healthy"] and first["pid"] == before["pid"] and first["restart_count"] == 0
        killed_at = time.monotonic()
        os.kill(before["pid"], signal.SIGKILL)
        pushed, _ = client.receive_until(lambda s: s["restart_count"] == 1, timeout=10)
        assert time.monotonic() - killed_at < 10
        assert pushed["pid"] != before["pid"]
        metrics = wait_for(lambda: (lambda s: s if s[m("olmocr_server_restarts_total")] == 1.0 else None)(
            scrape(dep.status_url)), 5, "restart in /metrics")
        assert metrics[m("olmocr_server_starts_total")] == 2.0
        # ... and when the new process passes its probes, that is pushed too.
        back, _ = client.receive_until(lambda s: s["healthy"], timeout=30)
        assert back["pid"] == pushed["pid"]
    finally:
        client.close()


@pytest.mark.slow
@pytest.mark.integration
def test_health_kill_is_counted_by_reason(deployments):
    dep = deployments(control={"load_delay": 60}, env={"OLMOCR_HEALTH_STARTUP_TIMEOUT": "3"})
    metrics = wait_for(lambda: (lambda s: s if s.get(m("olmocr_server_health_kills_total", reason="startup_timeout"))
                                else None)(scrape(dep.status_url)), 40, "kill counted in /metrics")
    assert metrics[m("olmocr_server_healthy")] == 0.0


@pytest.mark.integration
def test_token_is_required_on_every_endpoint_when_set(deployments, tmp_path):
    token = "st-Zk4-token"
    token_file = tmp_path / "status.token"
    token_file.write_text(token + "\n")
    dep = deployments(env={"OLMOCR_STATUS_TOKEN_FILE": str(token_file)})
    wait_for(lambda: requests.get(dep.status_url, timeout=2).status_code, 20, "status service listening")
    for path in ("/", "/metrics", "/status", "/ws"):
        assert requests.get(f"{dep.status_url}{path}", timeout=5).status_code == 401, path
        wrong = {"Authorization": "Bearer not-it"}
        assert requests.get(f"{dep.status_url}{path}", headers=wrong, timeout=5).status_code == 401, path
    good = {"Authorization": f"Bearer {token}"}
    assert scrape(dep.status_url, headers=good)["olmocr_supervisor_up{}"] == 1.0
    client = WsClient(f"{dep.status_url}/ws", headers=good)
    try:
        assert "healthy" in client.receive(timeout=5)
    finally:
        client.close()
    assert token not in dep.log_text("olmocr-status")


def test_refuses_to_listen_beyond_loopback_without_a_token():
    # Only the refusal is run: the service checks before it binds anything.
    env = clean_env({"OLMOCR_STATUS_HOST": "0.0.0.0"})
    env.pop("OLMOCR_STATUS_TOKEN", None)
    env.pop("OLMOCR_STATUS_TOKEN_FILE", None)
    done = subprocess.run([sys.executable, "-m", "olmocr.server.status_service", "--server-url",
                           "unix:///nonexistent.sock"], env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert "OLMOCR_STATUS_TOKEN" in done.stderr and "0.0.0.0" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    with pytest.raises(EndpointConfigError):
        check_exposure("x", "::", None, "T", "F")
    check_exposure("x", "0.0.0.0", "a-token", "T", "F")
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("") and not is_loopback("example.org")


@pytest.mark.slow
@pytest.mark.integration
def test_standalone_service_survives_a_supervisord_restart_and_counters_never_go_back(deployments, tmp_path):
    dep = deployments()
    first = dep.wait_status(lambda s: s["healthy"], 30, "healthy")
    os.kill(first["pid"], signal.SIGKILL)
    dep.wait_status(lambda s: s["restart_count"] == 1, 20, "restart counted")
    port = free_port()
    with open(tmp_path / "service.log", "wb") as service_log:
        service = subprocess.Popen(
            [sys.executable, "-m", "olmocr.server.status_service", "-c", str(dep.config), "--port", str(port)],
            env=clean_env({"OLMOCR_STATUS_POLL_INTERVAL": "0.3"}), stdout=subprocess.DEVNULL, stderr=service_log,
            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: scrape(url)["olmocr_supervisor_up{}"] == 1.0, 20, "service reading supervisord")
        dep.stop()
        metrics = wait_for(lambda: (lambda s: s if s["olmocr_supervisor_up{}"] == 0.0 else None)(scrape(url)),
                           10, "supervisord down in /metrics")
        assert metrics[m("olmocr_server_up")] == 0.0 and metrics[m("olmocr_server_healthy")] == 0.0
        assert metrics[m("olmocr_server_restarts_total")] == 1.0  # last known, not gone, not reset
        assert requests.get(f"{url}/status", timeout=5).status_code == 503
        assert "unreachable" in requests.get(f"{url}/status", timeout=5).json()["error"]
        dep.start()
        metrics = wait_for(lambda: (lambda s: s if s["olmocr_supervisor_up{}"] == 1.0 else None)(scrape(url)),
                           20, "supervisord back in /metrics")
        assert metrics[m("olmocr_server_restarts_total")] == 1.0  # the RPC extension's persisted count
        assert service.poll() is None
    finally:
        service.send_signal(signal.SIGTERM)
        assert service.wait(timeout=10) == 0


# ------------------------------------------------------------------------------------ in-process


def _status(n: int, pad: int = 0) -> dict:
    return {"healthy": True, "restart_count": n, "uptime_seconds": n, "state": "RUNNING",
            "health_phase": "healthy", "description": "x" * pad}


def test_slow_client_is_dropped_and_never_stalls_the_others():
    """A client that stops reading fills its socket buffers; it is cut off after the send timeout while a
    reading client keeps getting every change promptly."""

    async def scenario() -> None:
        counter = {"n": 0}

        def read() -> Snapshot:
            counter["n"] += 1
            return Snapshot(_status(counter["n"], pad=100_000), info={}, stats={}, settings={"model": "m"})

        port = free_port()
        settings = ServiceSettings(port=port, poll_interval=0.1, send_timeout=2.0, queue_size=2)
        service = StatusService(settings, read)
        stop = asyncio.Event()
        from olmocr.server.status_service import serve

        server = asyncio.create_task(serve(service, stop))
        await asyncio.sleep(0.5)
        # The stalled client: a raw socket with a tiny receive buffer that completes the handshake and
        # then never reads.
        stalled = socket.socket()
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stalled.setblocking(False)
        loop = asyncio.get_running_loop()
        await loop.sock_connect(stalled, ("127.0.0.1", port))
        key = base64.b64encode(os.urandom(16)).decode()
        await loop.sock_sendall(stalled, (
            f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        async with aiohttp.ClientSession() as session, session.ws_connect(f"http://127.0.0.1:{port}/ws",
                                                                          max_msg_size=0) as ws:
            seen, gaps, last = 0, [], time.monotonic()
            deadline = time.monotonic() + 6.0
            while time.monotonic() < deadline:
                msg = await ws.receive(timeout=2)
                now = time.monotonic()
                gaps.append(now - last)
                last = now
                seen = json.loads(msg.data)["restart_count"]
            # Had the service waited on the stalled client, a gap would last its send timeout (2 s).
            assert max(gaps) < 1.5, f"a reading client waited on the stalled one ({max(gaps):.2f} s)"
            assert seen >= counter["n"] - 10
        # The stalled client was cut off, and says so in the service's own metrics.
        assert service.registry.get_sample_value("olmocr_status_websocket_slow_disconnects_total") >= 1
        assert len(service.broadcaster.clients) == 0
        stalled.close()
        stop.set()
        await server

    asyncio.run(scenario())


def test_pushes_on_change_and_heartbeat_but_not_for_uptime_alone():
    clock = {"t": 0.0}
    service = StatusService(ServiceSettings(push_interval=5.0), read=lambda: None, clock=lambda: clock["t"])
    client = service.broadcaster.add()
    good = Snapshot(_status(0), info={}, stats={}, settings={})
    assert service.update(good)  # first reading
    clock["t"] = 1.0
    assert not service.update(Snapshot({**good.status, "uptime_seconds": 1, "description": "uptime 0:00:01"},
                                       {}, {}, {}))
    clock["t"] = 2.0
    assert service.update(Snapshot({**good.status, "restart_count": 1}, {}, {}, {}))
    clock["t"] = 7.5
    assert service.update(Snapshot({**good.status, "restart_count": 1, "uptime_seconds": 7}, {}, {}, {}))
    assert [json.loads(msg)["restart_count"] for msg in client.messages] == [0, 1, 1]
    # A client's queue is bounded: the oldest message goes first.
    for n in range(10):
        client.offer(str(n))
    assert list(client.messages) == [str(n) for n in range(10 - client.messages.maxlen, 10)]
    assert change_key({"a": 1, "uptime_seconds": 1}) == change_key({"a": 1, "uptime_seconds": 99})


def test_metrics_keep_last_known_counters_while_supervisord_is_unreachable():
    stats = {"restarts": 3, "starts": 4, "kills_by_reason": {"completion_timeout": 2},
             "health": {"time": 1000.0, "latency_ms": 250.0, "consecutive_failures": 1}}
    good = Snapshot({"healthy": True, "state": "RUNNING", "health_phase": "healthy", "uptime_seconds": 5},
                    info={"statename": "RUNNING"}, stats=stats, settings={"model": "mdl"})
    down = Snapshot({"healthy": False, "error": "supervisord unreachable"})
    text_good = parse_metrics(_exposition(server_metrics(good, good)))
    assert text_good['olmocr_server_restarts_total{gpu=,model=mdl,server=vllm}'] == 3.0
    assert text_good['olmocr_server_health_kills_total{gpu=,model=mdl,reason=completion_timeout,server=vllm}'] == 2.0
    assert text_good['olmocr_server_last_probe_duration_seconds{gpu=,model=mdl,server=vllm}'] == 0.25
    assert text_good['olmocr_server_consecutive_probe_failures{gpu=,model=mdl,server=vllm}'] == 1.0
    text_down = parse_metrics(_exposition(server_metrics(down, good)))
    assert text_down['olmocr_server_restarts_total{gpu=,model=mdl,server=vllm}'] == 3.0
    assert text_down['olmocr_server_up{gpu=,model=mdl,server=vllm}'] == 0.0
    assert text_down['olmocr_server_health_phase{gpu=,model=mdl,phase=unknown,server=vllm}'] == 1.0
    assert text_down['olmocr_server_uptime_seconds{gpu=,model=mdl,server=vllm}'] == 0.0


def _exposition(families) -> str:
    from prometheus_client import CollectorRegistry, generate_latest

    class Fixed:
        def collect(self):
            return families

        def describe(self):
            return []

    registry = CollectorRegistry()
    registry.register(Fixed())
    return generate_latest(registry).decode()


def test_kills_are_counted_by_reason_and_persisted(tmp_path):
    state = tmp_path / "state.json"
    store = ProcessStatsStore(str(state))
    store.record_kill("vllm", "completion probe timed out after 18 s (engine hung?) (3 consecutive failed probes)")
    store.record_kill("vllm", "server did not start listening within the startup timeout (600 s): refused")
    store.record_kill("vllm", "GET /health returned 503 (3 consecutive failed probes)")
    assert ProcessStatsStore(str(state)).stats("vllm")["kills_by_reason"] == {
        "completion_timeout": 1, "startup_timeout": 1, "health_endpoint": 1}
    assert kill_category("something new") == "other"
    # A state file written before kills were split by reason keeps its total.
    state.write_text(json.dumps({"processes": {"vllm": {"kills": 2}}}))
    assert ProcessStatsStore(str(state)).stats("vllm")["kills_by_reason"] == {"other": 2}


def test_settings_from_environment_with_clear_errors(tmp_path):
    assert ServiceSettings.from_env({}).port == envs.DEFAULT_STATUS_PORT == 29999
    assert ServiceSettings.from_env({"OLMOCR_STATUS_PORT": "31000"}).port == 31000
    with pytest.raises(EndpointConfigError, match="OLMOCR_STATUS_PORT='x' is not an integer"):
        ServiceSettings.from_env({"OLMOCR_STATUS_PORT": "x"})
    with pytest.raises(EndpointConfigError, match="cannot read the token file"):
        ServiceSettings.from_env({"OLMOCR_STATUS_TOKEN_FILE": str(tmp_path / "missing")})
    token_file = tmp_path / "t"
    token_file.write_text("tok\n")
    settings = ServiceSettings.from_env({"OLMOCR_STATUS_HOST": "0.0.0.0", "OLMOCR_STATUS_TOKEN_FILE": str(token_file)})
    assert settings.token == "tok" and "tok" not in repr(settings)


def test_every_rendered_configuration_runs_the_status_service():
    from olmocr.server.supervisor_config import ConfigLayout, render_supervisord_config
    from tests.standin_helpers import REPO_ROOT

    manager_config = render_supervisord_config(ConfigLayout(python="/venv/bin/python"))
    section = manager_config.split("[program:olmocr-status]")[1]
    assert "command = /venv/bin/python -m olmocr.server.status_service" in section
    checked_in = (REPO_ROOT / "supervisord.conf").read_text()
    assert "command = %(here)s/scripts/olmocr-status-service" in checked_in
    assert (REPO_ROOT / "scripts" / "olmocr-status-service").stat().st_mode & 0o111
    include = (REPO_ROOT / "deploy" / "olmocr-vllm.conf").read_text()
    assert "command = /opt/olmocr-serve/.venv/bin/python -m olmocr.server.status_service" in include
