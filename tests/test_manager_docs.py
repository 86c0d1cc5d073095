"""docs/operations.md's table of the manager's options is its --help (issue 28, item 18: --log-file and
--status-interval were missing)."""

from __future__ import annotations

import re
import subprocess
import sys

from olmocr.server.manager import parse_args
from tests.standin_helpers import REPO_ROOT


def documented() -> dict[str, str]:
    text = (REPO_ROOT / "docs" / "operations.md").read_text()
    table = text.split("<!-- manager-options")[1].split("<!-- /manager-options -->")[0]
    rows = re.findall(r"^\| `([^`]+)` \|([^|]*)\|", table, re.M)
    return {name: default.strip() for name, default in rows}


def test_every_manager_option_is_in_the_table_and_nothing_else():
    done = subprocess.run([sys.executable, "-m", "olmocr.vllm_server_manager", "--help"], capture_output=True,
                          text=True, timeout=30, check=True)
    flags = set(re.findall(r"^  (?:-\w, )?(--[a-z][a-z-]+)", done.stdout, re.M)) - {"--help"}
    assert flags == set(documented()) - {"MODEL"}


def test_the_documented_defaults_of_the_managers_own_options():
    args, _ = parse_args([])
    table = documented()
    assert table["--run-dir"] == f"`./{args.run_dir}`"
    assert table["--log-file"] == f"`./{args.log_file}`"
    assert table["--status-interval"] == f"{args.status_interval:g}"
