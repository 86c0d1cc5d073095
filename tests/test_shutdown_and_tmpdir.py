"""Planned stops (vLLM's --shutdown-timeout inside supervisord's stopwaitsecs) and vLLM's scratch
directory (kept in the deployment's run directory): the pure rules, then the real supervisord with the
checked-in supervisord.conf and the stand-in launched as vLLM."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from olmocr.server.command import build_vllm_command, build_vllm_env
from olmocr.server.drain import fit_shutdown_timeout, stopwaitsecs_for
from olmocr.server.errors import SettingsError
from olmocr.server.settings import ServerSettings
from olmocr.server.supervisor_config import ConfigLayout
from olmocr.server.wrapper import MAX_TMPDIR_LEN, prepare_tmpdir
from tests.deployment_helpers import Deployment, wait_for


def _flag(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


def test_shutdown_timeout_is_passed_to_vllm_and_fits_stopwaitsecs() -> None:
    settings = ServerSettings.from_env({})
    assert _flag(build_vllm_command(settings), "--shutdown-timeout") == "30"
    # The config's stopwaitsecs leaves the drain room for the engine's teardown.
    assert ConfigLayout().stopwaitsecs == stopwaitsecs_for(settings.shutdown_timeout) == 60
    # 0 is vLLM's own default (abort at once) and older vLLMs lack the flag: nothing is passed.
    off = ServerSettings.from_env({"OLMOCR_SHUTDOWN_TIMEOUT": "0"})
    assert "--shutdown-timeout" not in build_vllm_command(off)
    with pytest.raises(SettingsError, match="OLMOCR_SHUTDOWN_TIMEOUT"):
        ServerSettings.from_env({"OLMOCR_SHUTDOWN_TIMEOUT": "-1"})
    # A drain that would outlast supervisord's patience is shortened (the SIGKILL must not land in it).
    assert fit_shutdown_timeout(30, 60) == 30
    assert fit_shutdown_timeout(120, 60) == 50
    assert fit_shutdown_timeout(30, 5) == 0
    assert fit_shutdown_timeout(30, None) == 30


def test_vllm_tmpdir_is_private_emptied_and_given_as_tmpdir(tmp_path: Path) -> None:
    scratch = tmp_path / "t"
    assert prepare_tmpdir(None) is None
    assert prepare_tmpdir(str(scratch)) == str(scratch)
    assert (scratch.stat().st_mode & 0o777) == 0o700
    (scratch / "0f8daf93-5460-48be-9ddc-13afb677b382").write_text("")  # a stale ZeroMQ socket
    (scratch / "vllm_dist_fc96").mkdir()
    (scratch / "torchinductor_me").mkdir()  # compiled kernels: a cache worth keeping
    assert prepare_tmpdir(str(scratch)) == str(scratch)
    assert sorted(os.listdir(scratch)) == ["torchinductor_me"]
    assert build_vllm_env({"TMPDIR": "/tmp"}, None, str(scratch))["TMPDIR"] == str(scratch)
    assert build_vllm_env({"TMPDIR": "/tmp"}, None, None)["TMPDIR"] == "/tmp"
    too_long = "/" + "x" * MAX_TMPDIR_LEN
    assert prepare_tmpdir(too_long) is None and not os.path.exists(too_long)


@pytest.mark.slow
@pytest.mark.integration
def test_deployment_gives_vllm_its_own_tmpdir_and_fits_the_drain_to_stopwaitsecs() -> None:
    dep = Deployment(config_edits={"stopwaitsecs = 60": "stopwaitsecs = 25"},
                     env={"OLMOCR_SHUTDOWN_TIMEOUT": "45"})
    scratch = dep.dir / "run" / "vllm-tmp"
    scratch.mkdir()
    (scratch / "stale-socket").write_text("")
    try:
        dep.start()
        dep.wait_status(lambda s: s["healthy"], 30, "healthy")
        assert dep.standin_info()["tmpdir"] == str(scratch)
        assert not (scratch / "stale-socket").exists()
        cmdline = open(f"/proc/{dep.standin_info()['pid']}/cmdline").read().split("\0")
        assert _flag(cmdline, "--shutdown-timeout") == "15"  # 25 s stopwaitsecs - 10 s teardown
        wait_for(lambda: "does not fit supervisord's stopwaitsecs" in dep.log_text("vllm"), 10, "warning")
    finally:
        dep.cleanup()
