"""vLLM under the status service's exposure policy (issue 28, item 5): beyond loopback without an API key it
refuses to start in one line (wrapper, manager, supervisord); ``OLMOCR_TRUSTED_NETWORK=1`` serves a firewalled
network without a key and says so in one line at every start."""

from __future__ import annotations

import subprocess
import sys

import pytest
import requests

from olmocr.endpoints import check_vllm_exposure
from olmocr.server.errors import EndpointConfigError
from olmocr.server.settings import ServerSettings
from tests.deployment_helpers import Deployment
from tests.standin_helpers import STANDIN_SHIM, clean_env, free_port

REFUSAL = "vLLM would listen on {host} without an API key: set OLMOCR_API_KEY_FILE"
TRUSTED = "without an API key: OLMOCR_TRUSTED_NETWORK=1 says only a firewalled network reaches it"


@pytest.mark.parametrize("host, key, trusted, outcome", [
    ("127.0.0.1", False, False, None),
    ("localhost", False, False, None),
    ("::1", False, False, None),
    ("0.0.0.0", True, False, None),
    ("0.0.0.0", False, False, "refused"),
    ("", False, False, "refused"),
    ("10.1.2.3", False, False, "refused"),
    ("gpu-a.example.org", False, False, "refused"),  # a name may resolve to anything: it counts as exposed
    ("0.0.0.0", False, True, "said"),
])
def test_the_policy_row_by_row(host, key, trusted, outcome):
    if outcome == "refused":
        with pytest.raises(EndpointConfigError, match=REFUSAL.format(host=host or "all interfaces")):
            check_vllm_exposure(host, key, trusted)
        return
    note = check_vllm_exposure(host, key, trusted)
    assert (note is not None and TRUSTED in note) if outcome == "said" else note is None


def test_the_opt_out_is_a_setting_that_takes_0_or_1():
    assert ServerSettings.from_env({"OLMOCR_TRUSTED_NETWORK": "1"}).trusted_network == 1
    with pytest.raises(ValueError, match="OLMOCR_TRUSTED_NETWORK=2 must be 0 or 1"):
        ServerSettings.from_env({"OLMOCR_TRUSTED_NETWORK": "2"})


def _run(module: str, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=60,
                          env=clean_env(env))


def test_the_wrapper_refuses_all_interfaces_without_a_key_in_one_line():
    port = free_port()
    done = _run("olmocr.server.wrapper", env={"OLMOCR_HOST": "0.0.0.0", "OLMOCR_PORT": str(port),
                                              "OLMOCR_VLLM_BIN": str(STANDIN_SHIM)})
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("olmocr-vllm-wrapper: error: " + REFUSAL.format(host="0.0.0.0"))
    assert "OLMOCR_TRUSTED_NETWORK=1" in lines[0]


def test_the_manager_refuses_all_interfaces_without_a_key_in_one_line(manager_run):
    run = manager_run("--host", "0.0.0.0")
    assert run.proc.wait(timeout=60) == 2
    errors = [line for line in run.output().splitlines() if "ERROR" in line]
    assert len(errors) == 1 and REFUSAL.format(host="0.0.0.0") in errors[0], run.output()
    assert not (run.dir / "olmocr-server-run").exists()  # refused before anything was written


@pytest.mark.integration
def test_a_trusted_network_serves_without_a_key_and_says_so(deployments):
    """Under the real supervisord. The address is ``127.1``: the policy reads it as a host name, so as exposed
    (it is not a loopback literal), while the socket binds 127.0.0.1: the test never listens beyond loopback."""
    dep = deployments(env={"OLMOCR_HOST": "127.1", "OLMOCR_TRUSTED_NETWORK": "1"})
    dep.wait_status(lambda s: s["healthy"], 60, "healthy")
    assert requests.get(f"{dep.base_url}/v1/models", timeout=5).status_code == 200  # no key asked
    said = [line for line in dep.log_text("vllm").splitlines() if TRUSTED in line]
    assert len(said) == 1 and "vLLM listens on 127.1" in said[0], dep.log_text("vllm")


@pytest.mark.integration
def test_supervisord_with_an_exposed_server_and_no_key_leaves_it_stopped_with_the_reason():
    dep = Deployment(env={"OLMOCR_HOST": "127.1"})
    try:
        dep.start()
        status = dep.wait_status(lambda s: s["state"] in ("BACKOFF", "FATAL"), 60, "the server refused")
        assert not status["healthy"]
        assert REFUSAL.format(host="127.1") in dep.log_text("vllm")
        assert "Traceback" not in dep.log_text("vllm")
    finally:
        dep.cleanup()
