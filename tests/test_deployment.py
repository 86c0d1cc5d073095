"""Integration: the real supervisord with the checked-in supervisord.conf, the real wrapper, listener and
RPC extension, and the stand-in launched exactly as vLLM would be."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys

import pytest
import requests

from tests.deployment_helpers import live, wait_for

pytestmark = pytest.mark.integration


def healthy(status: dict) -> bool:
    return status["healthy"]


@pytest.mark.slow
def test_reaches_healthy_and_reports_status(deployments):
    dep = deployments()
    status = dep.wait_status(healthy, 30, "healthy")
    assert status["state"] == "RUNNING"
    assert status["restart_count"] == 0
    assert status["port"] == dep.port
    assert status["model"] == "allenai/olmOCR-7B-0825-FP8"
    assert status["uptime_seconds"] >= 0 and status["last_health_check"]
    # The server really is the program supervisord runs, launched with vLLM's command line.
    info = dep.standin_info()
    assert info["pid"] == status["pid"]
    cmdline = " ".join(open(f"/proc/{status['pid']}/cmdline").read().split("\0"))
    assert "serve allenai/olmOCR-7B-0825-FP8 --served-model-name olmocr" in cmdline
    assert f"--port {dep.port}" in cmdline and "--limit-mm-per-prompt" in cmdline

    script = dep.run_status_script()
    assert script.returncode == 0, script.stdout + script.stderr
    assert '"healthy": true' in script.stdout

    ctl = dep.supervisorctl("status")
    assert "vllm" in ctl.stdout and "RUNNING" in ctl.stdout

    sock = dep.dir / "run" / "supervisor.sock"
    assert stat.S_IMODE(os.stat(sock).st_mode) == 0o700


@pytest.mark.slow
def test_rpc_faults_as_supervisor_does_and_a_misspelt_name_records_nothing(deployments):
    import xmlrpc.client

    dep = deployments()
    dep.wait_status(healthy, 30, "healthy")
    assert dep.proxy.olmocr.getProcessStats("vllm")["restarts"] == 0
    for call in (lambda: dep.proxy.olmocr.getProcessStats("vlm"),
                 lambda: dep.proxy.olmocr.recordKill("vlm", "test")):
        with pytest.raises(xmlrpc.client.Fault) as fault:
            call()
        assert fault.value.faultCode == 10 and "BAD_NAME" in fault.value.faultString  # supervisor's Faults.BAD_NAME
    assert "vlm" not in dep.proxy.olmocr.getAllProcessStats()
    state = (dep.dir / "run" / "olmocr-state.json")
    assert not state.exists() or '"vlm"' not in state.read_text()


@pytest.mark.slow
def test_kill_9_is_restarted_counted_and_orphans_reaped(deployments):
    dep = deployments()
    before = dep.wait_status(healthy, 30, "healthy")
    engine_pid = dep.standin_info()["engine_pid"]
    os.kill(before["pid"], signal.SIGKILL)
    after = dep.wait_status(lambda s: s["healthy"] and s["pid"] != before["pid"], 40, "healthy after kill -9")
    assert after["restart_count"] == 1
    assert after["last_exit_status"] == -1  # killed by a signal
    # vLLM's engine process, orphaned by the kill, must not keep the GPU (and the port).
    wait_for(lambda: not live(engine_pid), 10, "orphaned engine process to be killed")


@pytest.mark.slow
def test_hung_completions_are_killed_and_restarted(deployments):
    dep = deployments()
    before = dep.wait_status(healthy, 30, "healthy")
    requests.post(f"{dep.base_url}/admin/control", json={"hang": True}, timeout=5)
    # /health and /v1/models stay 200 while hung: only the completion probe can tell.
    assert requests.get(f"{dep.base_url}/health", timeout=5).status_code == 200
    after = dep.wait_status(lambda s: s["healthy"] and s["pid"] != before["pid"], 60, "restart after hang")
    assert after["health_kills"] == 1
    assert after["restart_count"] == 1
    assert "completion probe timed out" in after["last_failure_reason"]


@pytest.mark.slow
def test_slow_load_inside_startup_grace_is_not_killed(deployments):
    dep = deployments(control={"load_delay": 6})
    status = dep.wait_status(healthy, 40, "healthy after slow load")
    assert status["restart_count"] == 0
    assert status["health_kills"] == 0


@pytest.mark.slow
def test_slow_load_past_startup_timeout_is_killed(deployments):
    dep = deployments(control={"load_delay": 60}, env={"OLMOCR_HEALTH_STARTUP_TIMEOUT": "3"})
    status = dep.wait_status(lambda s: s["health_kills"] >= 1, 40, "kill after startup timeout")
    assert "startup timeout" in status["last_failure_reason"]


@pytest.mark.slow
def test_crash_loop_is_left_stopped_with_reason(deployments):
    dep = deployments(control={"crash_after": 1.0, "crash_exit_code": 0},
                     env={"OLMOCR_MAX_RESTART_ATTEMPTS": "2"})
    status = dep.wait_status(lambda s: s["state"] in ("STOPPED", "FATAL"), 60, "server left stopped")
    assert not status["healthy"]
    assert status["restart_count"] >= 2
    script = dep.run_status_script()
    assert script.returncode == 1
    # Either our limit or supervisord's startretries stopped it; both must say why.
    reason = status["last_failure_reason"]
    assert "crash loop" in reason or "FATAL" in reason


@pytest.mark.slow
def test_crash_loop_after_running_hits_max_restart_attempts(deployments):
    dep = deployments(control={"crash_after": 1.5}, env={"OLMOCR_MAX_RESTART_ATTEMPTS": "2"},
                     config_edits={"startsecs = 5": "startsecs = 1"})
    status = dep.wait_status(lambda s: s["gave_up"], 60, "restart limit")
    assert status["state"] == "STOPPED"
    assert status["restart_count"] == 3
    assert "crash loop: restarted 2 times in a row" in status["last_failure_reason"]
    # An operator's start gives it a fresh budget.
    dep.set_control({})
    assert dep.supervisorctl("start", "vllm").returncode == 0
    dep.wait_status(healthy, 30, "healthy after manual start")


@pytest.mark.slow
def test_wrong_model_is_unhealthy_with_reason_and_not_killed(deployments):
    dep = deployments(control={"served_model_name": "some-other-model"})
    status = dep.wait_status(lambda s: s["health_phase"] == "unhealthy", 30, "unhealthy")
    assert "model olmocr not served" in status["last_failure_reason"]
    assert status["health_kills"] == 0 and status["restart_count"] == 0
    assert dep.run_status_script().returncode == 1


@pytest.mark.slow
def test_restart_count_survives_supervisord_restart(deployments):
    dep = deployments()
    first = dep.wait_status(healthy, 30, "healthy")
    os.kill(first["pid"], signal.SIGKILL)
    dep.wait_status(lambda s: s["healthy"] and s["restart_count"] == 1, 40, "restarted")
    dep.stop()
    dep.start()
    status = dep.wait_status(healthy, 30, "healthy after supervisord restart")
    assert status["restart_count"] == 1
    # After a reload (which clears supervisord's event subscriptions) restarts are still counted.
    assert dep.supervisorctl("reload").returncode == 0
    status = dep.wait_status(healthy, 30, "healthy after reload")
    os.kill(status["pid"], signal.SIGKILL)
    dep.wait_status(lambda s: s["healthy"] and s["restart_count"] == 2, 40, "restart counted after reload")


@pytest.mark.slow
def test_log_file_rotates_at_its_size(deployments):
    dep = deployments(config_edits={"stdout_logfile_maxbytes = 50MB": "stdout_logfile_maxbytes = 4KB"},
                     env={"OLMOCR_VLLM_ARGS": "--uvicorn-log-level info"})
    dep.wait_status(healthy, 30, "healthy")
    for _ in range(200):
        requests.get(f"{dep.base_url}/v1/models", timeout=5)
    logs = dep.dir / "logs"
    wait_for(lambda: (logs / "vllm.log.1").exists(), 10, "rotated vllm.log.1")
    # Polled: between supervisord's rename to .1 and its reopen, vllm.log briefly does not exist.
    wait_for(lambda: (logs / "vllm.log").stat().st_size <= 8 * 1024, 10, "vllm.log reopened below its size limit")


@pytest.mark.slow
def test_api_key_never_in_ps_or_logs(deployments, tmp_path):
    secret = "sk-test-Zq81secret"
    key_file = tmp_path / "key"
    key_file.write_text(secret + "\n")
    key_file.chmod(0o600)
    dep = deployments(env={"OLMOCR_API_KEY_FILE": str(key_file),
                          "OLMOCR_VLLM_ARGS": "--uvicorn-log-level info"})
    status = dep.wait_status(healthy, 30, "healthy with API key")  # the probe authenticates
    assert requests.get(f"{dep.base_url}/v1/models", timeout=5).status_code == 401
    ok = requests.get(f"{dep.base_url}/v1/models", headers={"Authorization": f"Bearer {secret}"}, timeout=5)
    assert ok.status_code == 200
    ps = subprocess.run(["ps", "-eo", "pid,args", "ww"], capture_output=True, text=True).stdout
    assert secret not in ps
    assert str(status["pid"]) in ps
    for path in dep.dir.rglob("*"):
        if path.is_file() and not path.is_socket():
            assert secret not in path.read_text(errors="replace"), path


@pytest.mark.slow
def test_status_over_password_protected_loopback_tcp_and_watch(deployments, tmp_path):
    from tests.standin_helpers import free_port

    port = free_port()
    inet = (f"[inet_http_server]\nport = 127.0.0.1:{port}\nusername = ops\npassword = pw-Xk2\n\n"
            "[rpcinterface:supervisor]")
    dep = deployments(config_edits={"[rpcinterface:supervisor]": inet})
    dep.wait_status(healthy, 30, "healthy")
    url = f"http://127.0.0.1:{port}"
    base = [sys.executable, "-m", "olmocr.server.status", "--server-url", url, "-u", "ops"]
    denied = subprocess.run(base, capture_output=True, text=True, timeout=30, env=dep.env)
    assert denied.returncode == 2 and "401" in denied.stdout
    password_file = tmp_path / "pw"
    password_file.write_text("pw-Xk2\n")
    ok = subprocess.run([*base, "--password-file", str(password_file)], capture_output=True, text=True,
                        timeout=30, env=dep.env)
    assert ok.returncode == 0, ok.stdout
    watch = subprocess.Popen([*base, "--password-file", str(password_file), "--watch", "0.3"],
                             stdout=subprocess.PIPE, text=True, env=dep.env)
    try:
        lines = [watch.stdout.readline() for _ in range(3)]
    finally:
        watch.kill()
        watch.wait(timeout=10)
    assert all('"healthy": true' in line for line in lines)
