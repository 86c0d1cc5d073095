"""Reusable helpers for tests that run the vLLM stand-in server (importable by other test files)."""

from __future__ import annotations

import base64
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import requests

REPO_ROOT = Path(__file__).resolve().parent.parent
STANDIN_SHIM = REPO_ROOT / "scripts" / "vllm-standin"
DEFAULT_MODEL = "allenai/olmOCR-7B-0825-FP8"
# The flags the wrapper gives vLLM; the stand-in must accept (and ignore) them.
VLLM_FLAGS: tuple[str, ...] = (
    "--tensor-parallel-size", "1", "--data-parallel-size", "1", "--limit-mm-per-prompt", '{"video": 0}',
    "--max-model-len", "16384", "--uvicorn-log-level", "warning",
)


def _ephemeral_low() -> int:
    """The first port of the kernel's ephemeral range (outgoing connections take their local ports there)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago, below the kernel's ephemeral range.

    A port the kernel hands out for ``bind(0)`` is also one it hands out as the local port of an outgoing
    connection: a stand-in restarted on its port (a server that comes back) found it taken by some test's
    client connection ("Address already in use", once in a CI run). Below the range, only a listener can
    hold it."""
    low = _ephemeral_low()
    if low > 11024:
        rng = random.SystemRandom()
        for _ in range(200):
            port = rng.randint(low - 10000, low - 1)
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def loopback_alias_works() -> bool:
    """Whether 127.0.0.2 (and so the rest of 127.0.0.0/8) can be bound: several servers behind one name."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.2", 0))
            return True
        except OSError:
            return False


def free_port_run(count: int) -> int:
    """A base port with ``count`` consecutive ports free on 127.0.0.1 a moment ago (one server per GPU)."""
    for _ in range(50):
        base = free_port()
        if base + count > 65535:
            continue
        sockets = []
        try:
            for port in range(base, base + count):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sockets.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
    raise AssertionError(f"no {count} consecutive free ports on 127.0.0.1")


def standin_command(port: int, *, model: str = DEFAULT_MODEL, served_model_name: str = "olmocr",
                    extra_args: Sequence[str] = VLLM_FLAGS) -> list[str]:
    return [sys.executable, "-m", "olmocr.standin", "serve", model, "--served-model-name", served_model_name,
            "--port", str(port), *extra_args]


def clean_env(env: Mapping[str, str | None] | None = None) -> dict[str, str]:
    """os.environ without inherited stand-in control / API key / GPU choice, plus ``env`` (a None value
    removes the variable)."""
    out = {k: v for k, v in os.environ.items()
           if not k.startswith("OLMOCR_STANDIN_") and k not in ("VLLM_API_KEY", "OLMOCR_GPUS")}
    out["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + out["PYTHONPATH"] if out.get("PYTHONPATH") else "")
    # OLMOCR_GPUS defaults to every GPU nvidia-smi lists: on a machine with GPUs a deployment test would
    # run one stand-in per GPU. No GPU visible unless a test asks: one server, as the tests expect.
    out["CUDA_VISIBLE_DEVICES"] = ""
    for key, value in (env or {}).items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = value
    # Every supervisord a test starts runs the status service: give it a free port, not the shared
    # default 30025 that concurrent test runs (and a real deployment) would fight over.
    out.setdefault("OLMOCR_STATUS_PORT", str(free_port()))
    return out


def start_standin(port: int, *, env: Mapping[str, str] | None = None, extra_args: Sequence[str] = VLLM_FLAGS,
                  served_model_name: str = "olmocr", log_path: Path | None = None) -> subprocess.Popen[bytes]:
    """Start the stand-in in a new session (its own process group); stop it with stop_process_group."""
    out: Any = subprocess.DEVNULL
    if log_path is not None:
        out = open(log_path, "ab")  # noqa: SIM115 - handed to the child; closed below
    try:
        return subprocess.Popen(
            standin_command(port, served_model_name=served_model_name, extra_args=extra_args),
            env=clean_env(env), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True, cwd=str(REPO_ROOT),
        )
    finally:
        if log_path is not None:
            out.close()


def wait_http_ok(url: str, timeout: float = 20.0, *, headers: Mapping[str, str] | None = None,
                 proc: subprocess.Popen[bytes] | None = None) -> None:
    """Poll ``url`` until it answers 200; raise if ``proc`` exits or on timeout."""
    deadline = time.monotonic() + timeout
    last: str = "no attempt"
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} while waiting for {url}")
        try:
            r = requests.get(url, headers=dict(headers or {}), timeout=2)
            if r.status_code == 200:
                return
            last = f"status {r.status_code}"
        except requests.RequestException as exc:
            last = type(exc).__name__
        time.sleep(0.05)
    raise TimeoutError(f"{url} not 200 within {timeout}s (last: {last})")


def pid_alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop_process_group(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """SIGTERM the process group led by ``proc`` (started with a new session), then SIGKILL; reap ``proc``.

    Works after the leader died too: orphaned members (the stand-in's engine) still carry its pgid.
    """
    pgid = proc.pid
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + (timeout if sig == signal.SIGTERM else 5.0)
        while time.monotonic() < deadline:
            if proc.poll() is None:
                try:
                    proc.wait(timeout=0.05)
                except subprocess.TimeoutExpired:
                    pass
            elif not _group_has_live_member(pgid):
                break
            else:
                time.sleep(0.05)
        if proc.poll() is not None and not _group_has_live_member(pgid):
            break
    if proc.poll() is None:
        proc.wait(timeout=5)


def _group_has_live_member(pgid: int) -> bool:
    if not group_alive(pgid):
        return False
    return any(pid_alive(pid) for pid in pids_in_group(pgid))


def pids_in_group(pgid: int) -> list[int]:
    """Live pids whose process group is ``pgid`` (from /proc)."""
    pids: list[int] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            pids.append(int(entry))
    return pids


def make_png(width: int, height: int, seed: int = 0) -> bytes:
    """A small valid RGB PNG of the given size (stdlib only)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    row = b"\x00" + bytes((seed + i) % 256 for i in range(width * 3))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(row * height))
            + chunk(b"IEND", b""))


def chat_payload(image: bytes, *, model: str = "olmocr", max_tokens: int = 8000,
                 prompt: str = "Attached is one page of a document.", mime: str = "image/png") -> dict[str, Any]:
    """An olmOCR-shaped chat completion request: one user message, text part then image part."""
    url = f"data:{mime};base64," + base64.b64encode(image).decode()
    return {"model": model, "max_tokens": max_tokens, "temperature": 0.1, "messages": [
        {"role": "user", "content": [{"type": "text", "text": prompt},
                                     {"type": "image_url", "image_url": {"url": url}}]}]}
