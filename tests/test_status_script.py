"""``scripts/olmocr-server-status`` as a shell user runs it (issue 28, item 12): from any directory it finds its
checkout's supervisord.conf, and a pipe that closes early (``| head``) ends it quietly."""

from __future__ import annotations

import json
import subprocess

from tests.standin_helpers import REPO_ROOT, clean_env

SCRIPT = REPO_ROOT / "scripts" / "olmocr-server-status"


def test_from_another_directory_it_reads_its_checkouts_config(tmp_path):
    done = subprocess.run([str(SCRIPT)], cwd=tmp_path, capture_output=True, text=True, timeout=30,
                          env=clean_env({"OLMOCR_SUPERVISOR_URL": None}))
    assert done.returncode == 2  # nothing runs from this checkout's own supervisord.conf in the tests
    error = json.loads(done.stdout)["error"]
    assert error.startswith(f"supervisord unreachable at unix://{REPO_ROOT}/run/supervisor.sock"), error


def test_a_closed_pipe_ends_it_quietly(tmp_path):
    done = subprocess.run(f"'{SCRIPT}' --server-url unix://{tmp_path}/none.sock --watch 0.05 | head -n 1",
                          shell=True, cwd=tmp_path, capture_output=True, text=True, timeout=30, env=clean_env({}))
    assert done.returncode == 0
    assert json.loads(done.stdout)["healthy"] is False
    assert done.stderr == "", done.stderr
