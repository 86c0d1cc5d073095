"""When a test cannot run: fail where the run must be complete, skip only in a developer's quick run.

A test that needs something outside Python (a Debian tool, a cached environment, a tier) asks for it with
:func:`require`. In CI (``CI=true``) or when the test's tier was requested (``scripts/run-tests
--real-vllm`` sets ``OLMOCR_TEST_REAL_VLLM=1``), a missing requirement *fails* the test with one line naming
what is missing and how to get it: a green CI with a skipped tier would be a false result. In a quick local
run it is a skip, and ``pytest -ra`` (what ``scripts/run-tests`` runs) lists every skip with that line.
"""

from __future__ import annotations

import os
import shutil

import pytest

CI_ENV = "CI"
REAL_VLLM_ENV = "OLMOCR_TEST_REAL_VLLM"


def must_run(tier: str | None = None) -> bool:
    """True when a test that cannot run must fail: in CI, or when ``tier`` was requested."""
    if os.environ.get(CI_ENV, "").lower() in ("1", "true", "yes"):
        return True
    return tier == "real_vllm" and os.environ.get(REAL_VLLM_ENV) == "1"


def missing(reason: str, *, tier: str | None = None) -> None:
    """Stop this test because ``reason`` (what is missing and how to get it): fail or skip, see above."""
    if must_run(tier):
        pytest.fail(f"cannot run: {reason}", pytrace=False)
    pytest.skip(reason)


def require(available: bool, reason: str, *, tier: str | None = None) -> None:
    """Go on when ``available``; otherwise :func:`missing` with ``reason``."""
    if not available:
        missing(reason, tier=tier)


def require_tool(name: str, package: str, *, tier: str | None = None) -> str:
    """The path of executable ``name``, or :func:`missing` naming the Debian ``package`` that has it."""
    path = shutil.which(name)
    require(path is not None, f"{name} not installed (Debian package '{package}': apt-get install {package})",
            tier=tier)
    assert path is not None
    return path


def require_tesseract(*, tier: str | None = None) -> None:
    """Tesseract with English and orientation (OSD) data, for the stand-in's reading mode; else :func:`missing`."""
    from olmocr.standin import reading

    try:
        reading.find_tesseract()
    except reading.TesseractMissing as exc:
        missing(f"the reading stand-in needs Tesseract: {exc}", tier=tier)
