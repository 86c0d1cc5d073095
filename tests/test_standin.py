"""Tests of the vLLM stand-in server, run as a real subprocess on 127.0.0.1."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from tests.pipeline_helpers import Standins
from tests.standin_helpers import (
    REPO_ROOT,
    STANDIN_SHIM,
    chat_payload,
    clean_env,
    free_port,
    make_png,
    pid_alive,
    stop_process_group,
    wait_http_ok,
)

pytestmark = pytest.mark.integration

Started = tuple[subprocess.Popen[bytes], str]


@pytest.fixture
def standin(standins: Standins) -> Callable[..., Started]:
    """``standin(env=None, wait=True, **knobs)`` -> (its process, its base URL): the ``standins`` fixture
    (stopped after the test), as these tests read it; ``wait=False`` returns before /health answers."""

    def start(env: dict[str, str] | None = None, wait: bool = True, **kw: Any) -> Started:
        started = standins(env=env, ready=wait, **kw)
        return started.proc, started.url

    return start


def wait_exit(proc: subprocess.Popen[bytes], timeout: float = 20) -> int:
    return proc.wait(timeout=timeout)


def parse_answer(content: str) -> tuple[dict[str, Any], str]:
    assert content.startswith("---\n")
    _, fm, body = content.split("---\n", 2)
    return yaml.safe_load(fm), body


def test_endpoints_and_answer(standin: Callable[..., Started]) -> None:
    proc, base = standin()
    r = requests.get(base + "/health", timeout=5)
    assert r.status_code == 200 and r.content == b""
    assert "version" in requests.get(base + "/version", timeout=5).json()
    models = requests.get(base + "/v1/models", timeout=5).json()
    assert models["object"] == "list"
    assert models["data"][0]["id"] == "olmocr" and models["data"][0]["owned_by"] == "vllm"
    assert models["data"][0]["max_model_len"] == 16384

    png = make_png(120, 200)
    r = requests.post(base + "/v1/chat/completions", json=chat_payload(png), timeout=10)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["model"] == "olmocr" and body["id"]
    choice = body["choices"][0]
    assert choice["finish_reason"] == "stop"
    fm, text = parse_answer(choice["message"]["content"])
    assert fm == {"primary_language": "en", "is_rotation_valid": True, "rotation_correction": 0,
                  "is_table": False, "is_diagram": False}
    assert text.splitlines()[0].startswith("Stand-in OCR of image ") and "(120x200)" in text
    usage = body["usage"]
    assert 700 <= usage["completion_tokens"] <= 800
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    # Deterministic for the same image.
    again = requests.post(base + "/v1/chat/completions", json=chat_payload(png), timeout=10).json()
    assert again["choices"][0]["message"]["content"] == choice["message"]["content"]

    metrics = requests.get(base + "/metrics", timeout=5).text
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:generation_tokens_total",
                 "vllm:prompt_tokens_total", "vllm:request_success_total"):
        assert name in metrics
    assert 'model_name="olmocr"' in metrics
    gen = [ln for ln in metrics.splitlines() if ln.startswith("vllm:generation_tokens_total")][0]
    assert float(gen.split()[-1]) == 2 * usage["completion_tokens"]

    info = requests.get(base + "/admin/info", timeout=5).json()
    assert info["pid"] == proc.pid and info["requests_served"] == 2 and pid_alive(info["engine_pid"])

    # Wrong model name, over-long request, max_tokens 1 (the health probe's request).
    r = requests.post(base + "/v1/chat/completions", json=chat_payload(png, model="other"), timeout=10)
    assert r.status_code == 404 and r.json()["error"]["message"] == "The model `other` does not exist."
    r = requests.post(base + "/v1/chat/completions", json=chat_payload(png, max_tokens=17000), timeout=10)
    assert r.status_code == 400 and r.json()["error"]["message"].startswith(
        "max_tokens=17000 cannot be greater than max_model_len=16384")
    r = requests.post(base + "/v1/chat/completions", json=chat_payload(png, max_tokens=1), timeout=10)
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"
    assert r.json()["usage"]["completion_tokens"] == 1


def test_jpeg_size_is_read(standin: Callable[..., Started]) -> None:
    from io import BytesIO

    from PIL import Image

    buf = BytesIO()
    Image.new("RGB", (64, 48), "white").save(buf, "JPEG")
    _, base = standin()
    r = requests.post(base + "/v1/chat/completions", json=chat_payload(buf.getvalue(), mime="image/jpeg"),
                      timeout=10)
    assert "(64x48)" in r.json()["choices"][0]["message"]["content"]


def test_api_key(standin: Callable[..., Started], tmp_path: Path) -> None:
    key = "test-key-0123456789abcdef"
    proc, base = standin(env={"VLLM_API_KEY": key})
    for path in ("/health", "/version", "/metrics"):
        assert requests.get(base + path, timeout=5).status_code == 200
    assert requests.get(base + "/v1/models", timeout=5).status_code == 401
    assert requests.get(base + "/admin/info", timeout=5).status_code == 401
    bad = {"Authorization": "Bearer wrong"}
    assert requests.get(base + "/v1/models", headers=bad, timeout=5).status_code == 401
    good = {"Authorization": f"Bearer {key}"}
    assert requests.get(base + "/v1/models", headers=good, timeout=5).status_code == 200
    # One keep-alive connection: a rejected request's body must not desync the next request.
    with requests.Session() as s:
        codes = [s.post(base + "/v1/chat/completions", json=chat_payload(make_png(8, 8)), headers=h,
                        timeout=10).status_code for h in ({}, good, bad, good)]
    assert codes == [401, 200, 401, 200]
    logs = "".join(p.read_text() for p in tmp_path.glob("standin-*.log"))
    assert key not in logs


def test_api_key_flag_rejected() -> None:
    port = free_port()
    cmd = [sys.executable, "-m", "olmocr.standin", "serve", "m", "--port", str(port), "--api-key", "secret"]
    res = subprocess.run(cmd, env=clean_env(), capture_output=True, timeout=30, cwd=REPO_ROOT)
    assert res.returncode == 2 and b"VLLM_API_KEY" in res.stderr


def test_load_delay_then_ready(standin: Callable[..., Started]) -> None:
    proc, base = standin(env={"OLMOCR_STANDIN_LOAD_DELAY": "2"}, wait=False)
    refused = False
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not refused:
        try:
            requests.get(base + "/health", timeout=1)
            break
        except requests.ConnectionError:
            refused = True
    assert refused, "the port should be closed while loading"
    wait_http_ok(base + "/health", timeout=20, proc=proc)


@pytest.mark.parametrize("code", [0, 1])
def test_crash_after(standin: Callable[..., Started], code: int) -> None:
    proc, base = standin(env={"OLMOCR_STANDIN_CRASH_AFTER": "1.5", "OLMOCR_STANDIN_CRASH_EXIT_CODE": str(code)})
    engine = requests.get(base + "/admin/info", timeout=5).json()["engine_pid"]
    assert wait_exit(proc) == code
    deadline = time.monotonic() + 10
    while pid_alive(engine) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pid_alive(engine), "a crash that exits normally also stops the engine"


def test_crash_during_load(standin: Callable[..., Started]) -> None:
    proc, _ = standin(env={"OLMOCR_STANDIN_LOAD_DELAY": "30", "OLMOCR_STANDIN_CRASH_AFTER": "0.5"}, wait=False)
    assert wait_exit(proc) == 1


def test_crash_now_and_engine_death(standin: Callable[..., Started]) -> None:
    proc, base = standin()
    requests.post(base + "/admin/control", json={"crash_exit_code": 0, "crash_now": True}, timeout=5)
    assert wait_exit(proc) == 0
    proc2, base2 = standin(env={"OLMOCR_STANDIN_CRASH_EXIT_CODE": "1"})
    engine = requests.get(base2 + "/admin/info", timeout=5).json()["engine_pid"]
    os.kill(engine, signal.SIGKILL)
    assert wait_exit(proc2) == 1


def test_sigterm_exits_zero_and_stops_engine(standin: Callable[..., Started]) -> None:
    proc, base = standin()
    engine = requests.get(base + "/admin/info", timeout=5).json()["engine_pid"]
    proc.send_signal(signal.SIGTERM)
    assert wait_exit(proc) == 0
    deadline = time.monotonic() + 10
    while pid_alive(engine) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pid_alive(engine)


def test_engine_orphaned_by_sigkill_until_group_killed(standin: Callable[..., Started]) -> None:
    proc, base = standin()
    engine = requests.get(base + "/admin/info", timeout=5).json()["engine_pid"]
    assert os.getpgid(engine) == proc.pid
    proc.kill()
    proc.wait(timeout=10)
    time.sleep(0.5)
    assert pid_alive(engine), "the engine outlives a SIGKILLed server, like vLLM's EngineCore"
    stop_process_group(proc)
    deadline = time.monotonic() + 10
    while pid_alive(engine) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pid_alive(engine)


def test_hang_keeps_health_green(standin: Callable[..., Started]) -> None:
    _, base = standin()
    assert requests.post(base + "/admin/control", json={"hang": True}, timeout=5).json()["hang"] is True
    with pytest.raises(requests.Timeout):
        requests.post(base + "/v1/chat/completions", json=chat_payload(make_png(8, 8), max_tokens=1), timeout=1)
    assert requests.get(base + "/health", timeout=5).status_code == 200
    assert requests.get(base + "/v1/models", timeout=5).status_code == 200
    metrics = requests.get(base + "/metrics", timeout=5).text
    assert 'vllm:generation_tokens_total{engine="0",model_name="olmocr"} 0.0' in metrics
    requests.post(base + "/admin/control", json={"hang": False}, timeout=5)
    r = requests.post(base + "/v1/chat/completions", json=chat_payload(make_png(8, 8)), timeout=10)
    assert r.status_code == 200


@pytest.mark.parametrize("status", [500, 429, 503])
def test_error_rate(standin: Callable[..., Started], status: int) -> None:
    _, base = standin(env={"OLMOCR_STANDIN_ERROR_RATE": "0.25", "OLMOCR_STANDIN_ERROR_STATUS": str(status)})
    codes = [requests.post(base + "/v1/chat/completions", json=chat_payload(make_png(4, 4)), timeout=10).status_code
             for _ in range(8)]
    assert codes.count(status) == 2 and codes.count(200) == 6


def test_served_model_override_and_health_status(standin: Callable[..., Started]) -> None:
    _, base = standin(env={"OLMOCR_STANDIN_SERVED_MODEL_NAME": "wrong-model"})
    assert requests.get(base + "/v1/models", timeout=5).json()["data"][0]["id"] == "wrong-model"
    r = requests.post(base + "/v1/chat/completions", json=chat_payload(make_png(4, 4)), timeout=10)
    assert r.status_code == 404
    requests.post(base + "/admin/control", json={"health_status": 503}, timeout=5)
    assert requests.get(base + "/health", timeout=5).status_code == 503


def test_rotation_landscape(standin: Callable[..., Started]) -> None:
    _, base = standin(env={"OLMOCR_STANDIN_ROTATION": "landscape"})
    wide = requests.post(base + "/v1/chat/completions", json=chat_payload(make_png(40, 20)), timeout=10).json()
    fm, _ = parse_answer(wide["choices"][0]["message"]["content"])
    assert fm["is_rotation_valid"] is False and fm["rotation_correction"] == 90
    tall = requests.post(base + "/v1/chat/completions", json=chat_payload(make_png(20, 40)), timeout=10).json()
    fm, _ = parse_answer(tall["choices"][0]["message"]["content"])
    assert fm["is_rotation_valid"] is True and fm["rotation_correction"] == 0


def test_answer_modes(standin: Callable[..., Started]) -> None:
    _, base = standin(env={"OLMOCR_STANDIN_ANSWER": "mixed:2", "OLMOCR_STANDIN_OUTPUT_TOKENS": "50"})

    def ask() -> dict[str, Any]:
        return requests.post(base + "/v1/chat/completions", json=chat_payload(make_png(4, 4)), timeout=10).json()

    first, second = ask(), ask()
    assert first["choices"][0]["message"]["content"].startswith("---\n")
    assert not second["choices"][0]["message"]["content"].startswith("---")
    assert first["usage"]["completion_tokens"] < 100
    requests.post(base + "/admin/control", json={"answer": "length"}, timeout=5)
    assert ask()["choices"][0]["finish_reason"] == "length"


def test_concurrency_queue_and_latency(standin: Callable[..., Started]) -> None:
    import concurrent.futures as cf

    _, base = standin(env={"OLMOCR_STANDIN_LATENCY": "0.3", "OLMOCR_STANDIN_CONCURRENCY": "1"})
    with cf.ThreadPoolExecutor(4) as pool:
        futs = [pool.submit(requests.post, base + "/v1/chat/completions", json=chat_payload(make_png(4, 4)),
                            timeout=30) for _ in range(4)]
        seen_waiting = 0.0
        deadline = time.monotonic() + 10
        while not all(f.done() for f in futs) and time.monotonic() < deadline:
            for ln in requests.get(base + "/metrics", timeout=5).text.splitlines():
                if ln.startswith("vllm:num_requests_waiting"):
                    seen_waiting = max(seen_waiting, float(ln.split()[-1]))
                if ln.startswith("vllm:num_requests_running"):
                    assert float(ln.split()[-1]) <= 1
            time.sleep(0.05)
        assert all(f.result().status_code == 200 for f in futs)
    assert seen_waiting >= 1


def test_control_file_reread(standin: Callable[..., Started], tmp_path: Path) -> None:
    ctl = tmp_path / "control.json"
    ctl.write_text(json.dumps({"health_status": 200}))
    _, base = standin(env={"OLMOCR_STANDIN_CONTROL": str(ctl)})
    tmp = tmp_path / "control.json.tmp"
    tmp.write_text(json.dumps({"health_status": 503, "served_model_name": "from-file"}))
    os.replace(tmp, ctl)
    assert requests.get(base + "/health", timeout=5).status_code == 503
    assert requests.get(base + "/admin/control", timeout=5).json()["served_model_name"] == "from-file"


def test_shim_accepts_vllm_command_line(standin: Callable[..., Started]) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [str(STANDIN_SHIM), "serve", "allenai/olmOCR-7B-0825-FP8", "--port", str(port), "--served-model-name",
         "olmocr", "--gpu-memory-utilization", "0.9", "--enable-log-requests"],
        env=clean_env({"OLMOCR_PYTHON": sys.executable}), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_http_ok(f"http://127.0.0.1:{port}/v1/models", timeout=20, proc=proc)
        info = requests.get(f"http://127.0.0.1:{port}/admin/info", timeout=5).json()
        assert info["pid"] == proc.pid  # the shim execs: supervisord's signals reach the server itself
    finally:
        stop_process_group(proc)
