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


def test_the_table_names_the_vllm_url_and_a_status_service_that_does_not_answer():
    from olmocr.server.status import format_table, status_service_entry

    service = status_service_entry({"status_url": "http://127.0.0.1:29999",
                                    "status_service_info": {"statename": "FATAL", "spawnerr": "Exited too quickly",
                                                            "stdout_logfile": "/srv/logs/olmocr-status.log"}})
    table = format_table({"healthy": True, "model": "m", "vllm_url": "http://127.0.0.1:30024-30025",
                          "status_service": service, "servers": [{"healthy": True, "url": "http://127.0.0.1:30024"}]})
    lines = table.splitlines()
    assert lines[1] == "pipeline: --vllm-url http://127.0.0.1:30024-30025"
    assert lines[2] == ("status service: http://127.0.0.1:29999  NOT ANSWERING: the status service is FATAL "
                        "(Exited too quickly): see /srv/logs/olmocr-status.log")
