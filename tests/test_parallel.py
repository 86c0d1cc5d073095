"""scripts/run-tests runs the suite with pytest-xdist's ``--dist loadgroup``: the tests of one
``xdist_group`` (a module's Slurm cluster, the real-vLLM deployment, upstream's venv) must run on one worker,
in order. pytest 9.2 broke that silently (xdist 3.8 could no longer add the group to a test's id, so each
group was spread over every worker: three Slurm clusters on the same ports). Checked in a pytest inside
this one."""

from __future__ import annotations

import pytest

INNER = '''
import os
import pytest

pytestmark = pytest.mark.xdist_group("shared")


@pytest.mark.parametrize("i", range(6))
def test_grouped(i, tmp_path_factory):
    with open(os.environ["RECORD"], "a") as record:
        record.write(f"{os.environ['PYTEST_XDIST_WORKER']} {i}\\n")


@pytest.mark.parametrize("i", range(6))
def test_free(i):
    pass
'''


def test_a_group_runs_on_one_worker_in_order(pytester: pytest.Pytester, monkeypatch, tmp_path) -> None:
    record = tmp_path / "record.txt"
    monkeypatch.setenv("RECORD", str(record))
    pytester.makepyfile(test_inner=INNER)
    result = pytester.runpytest_subprocess("-n", "3", "--dist", "loadgroup", "-p", "no:cacheprovider", timeout=120)
    result.assert_outcomes(passed=12)
    runs = [line.split() for line in record.read_text().splitlines()]
    assert len({worker for worker, _ in runs}) == 1, runs
    assert [int(i) for _, i in runs] == list(range(6)), runs
