"""The front door as the docs write it: the README's one service command, the stand-in started with
docs/service.md's command, and docs/service.md's first curl example, each taken out of the docs and run as a
new user runs them (from a checkout with ``.venv`` and ``examples/``). Only the ports change: a test takes
free ones (the service's through ``OLMOCR_SERVICE_PORT``, its documented setting). Markdown comes back."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import requests

from tests.pipeline_helpers import REPO_ROOT
from tests.standin_helpers import clean_env, free_port, stop_process_group, wait_http_ok
from tests.tiers import require, require_tool

README = REPO_ROOT / "README.md"
GUIDE = REPO_ROOT / "docs" / "service.md"
SERVER_PORT, SERVICE_PORT = "30024", "29998"  # the ports the docs name


def service_command() -> str:
    """The README's command that starts olmocr-service."""
    found = re.findall(r"`([^`\n]*olmocr-service [^`\n]*)`", README.read_text())
    assert len(found) == 1, f"README.md should give one olmocr-service command, found {found}"
    return found[0]


def standin_command() -> str:
    """docs/service.md's command that starts the stand-in."""
    found = re.findall(r"`(python -m olmocr\.standin serve [^`\n]*)`", GUIDE.read_text())
    assert found, "docs/service.md gives no stand-in command"
    return found[0]


def first_curl() -> str:
    """The first curl command of docs/service.md's first shell block (a trailing comment dropped)."""
    block = re.search(r"```(?:bash|sh)\n(.*?)```", GUIDE.read_text(), re.S)
    assert block, "docs/service.md has no shell block"
    lines = [line for line in block[1].splitlines() if line.startswith("curl ")]
    assert lines, f"docs/service.md's first shell block has no curl command:\n{block[1]}"
    return lines[0]


def words(command: str, port: str, new_port: int) -> list[str]:
    """The command's words (a shell comment dropped), the documented ``port`` replaced with ``new_port``."""
    assert port in command, f"{command!r} does not name port {port}"
    return shlex.split(command.replace(port, str(new_port)), comments=True)


def test_the_docs_commands_convert_a_pdf_to_markdown(tmp_path: Path) -> None:
    curl = require_tool("curl", "curl")
    venv = REPO_ROOT / ".venv" if (REPO_ROOT / ".venv").is_dir() else Path(sys.prefix)
    require((venv / "bin" / "olmocr-service").exists(),
            f"no olmocr-service in {venv}/bin: install the project (pip install -e .) into {venv}")
    # A new user's checkout: .venv and examples/ beside where they type (the workspace ./ws lands here).
    (tmp_path / ".venv").symlink_to(venv)
    (tmp_path / "examples").symlink_to(REPO_ROOT / "examples")
    env = clean_env({"PATH": f"{tmp_path / '.venv' / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"})
    server_port, service_port = free_port(), free_port()
    procs: list[subprocess.Popen[bytes]] = []

    def start(argv: list[str], log: str, extra: dict[str, str]) -> subprocess.Popen[bytes]:
        with open(tmp_path / log, "wb") as out:
            proc = subprocess.Popen(argv, cwd=tmp_path, env={**env, **extra}, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(proc)
        return proc

    try:
        standin = start(words(standin_command(), SERVER_PORT, server_port), "standin.log", {})
        wait_http_ok(f"http://127.0.0.1:{server_port}/v1/models", 60, proc=standin)
        service = start(words(service_command(), SERVER_PORT, server_port), "service.log",
                        {"OLMOCR_SERVICE_PORT": str(service_port)})
        wait_http_ok(f"http://127.0.0.1:{service_port}/readyz", 60, proc=service)
        argv = words(first_curl(), SERVICE_PORT, service_port)
        assert argv[0] == "curl"
        done = subprocess.run([curl, *argv[1:], "--fail-with-body", "--max-time", "240"], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)
        log = (tmp_path / "service.log").read_text(errors="replace")[-3000:]
        assert done.returncode == 0, f"curl exited {done.returncode}: {done.stdout}{done.stderr}\n{log}"
        markdown = done.stdout
        assert markdown.strip() and not markdown.lstrip().startswith("{"), markdown[:500]
        # It is the Markdown of the one job, the PDF the curl sent, in the workspace the command named (./ws).
        jobs = requests.get(f"http://127.0.0.1:{service_port}/v1/jobs", timeout=30).json()["jobs"]
        assert [(j["state"], [d["name"] for d in j["documents"]]) for j in jobs] == [("done", ["edgar.pdf"])]
        result = requests.get(f"http://127.0.0.1:{service_port}/v1/jobs/{jobs[0]['id']}/result", timeout=30).json()
        assert markdown == result["documents"][0]["markdown"]
        assert [p.name for p in (tmp_path / "ws" / "service" / "jobs").iterdir()] == [f"{jobs[0]['id']}.json"]
    finally:
        for proc in reversed(procs):
            stop_process_group(proc)

