"""The ``standins`` fixture's contract (tests/conftest.py, tests.pipeline_helpers.Standins): what it starts is
ready, configured by upper-case keywords, and gone after the test, leaving nothing in its temp dir."""

from __future__ import annotations

from pathlib import Path

import pytest
import requests

from tests.pipeline_helpers import Standins
from tests.standin_helpers import VLLM_FLAGS, loopback_alias_works, pids_in_group


def test_a_standin_is_ready_configured_and_stopped_with_its_group(tmp_path: Path) -> None:
    with Standins(tmp_path) as start:
        server = start(OLMOCR_STANDIN_LATENCY=0.25, served_model_name="other-name")
        info = requests.get(f"{server.url}/admin/info", timeout=5).json()  # ready: no wait needed
        assert info["control"]["latency"] == 0.25 and info["served_model_name"] == "other-name"
        assert info["tmpdir"] and Path(info["tmpdir"]).parent == tmp_path  # a TMPDIR of its own
        group = server.proc.pid
        assert pids_in_group(group)
    assert pids_in_group(group) == [] and server.proc.returncode is not None
    assert not Path(info["tmpdir"]).exists()


def test_a_file_left_in_its_tmpdir_or_a_lower_case_variable_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(AssertionError, match="unknown knob"):
        Standins(tmp_path)(latency=1)
    with pytest.raises(AssertionError, match=r"left \['leftover'\] in its TMPDIR"), Standins(tmp_path) as start:
        server = start()
        Path(server.env["TMPDIR"], "leftover").write_text("x")
    assert pids_in_group(server.proc.pid) == []  # stopped all the same


def test_a_standin_on_another_loopback_address_restarts_as_it_was_launched(standins: Standins) -> None:
    """``host`` puts a stand-in on 127.0.0.2 (a DNS name's servers share one port); ``restart()`` brings it
    back with the same address, model name and flags (a crash-and-restart test must not change them)."""
    assert loopback_alias_works(), "127.0.0.2 is not usable here (Linux routes all of 127.0.0.0/8 to lo)"
    server = standins(host="127.0.0.2", served_model_name="other-name",
                      extra_args=(*VLLM_FLAGS, "--max-model-len", "4096"))
    assert server.url == f"http://127.0.0.2:{server.port}" and server.log.name == f"standin-127.0.0.2-{server.port}.log"

    def model() -> dict:
        return requests.get(f"{server.url}/v1/models", timeout=5).json()["data"][0]

    assert (model()["id"], model()["max_model_len"]) == ("other-name", 4096)
    server.kill()
    server.restart()
    assert (model()["id"], model()["max_model_len"]) == ("other-name", 4096)
