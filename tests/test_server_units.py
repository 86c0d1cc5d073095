"""Unit tests: command line, settings, supervisord.conf, restart counting, health decisions."""

from __future__ import annotations

import json

import pytest
from supervisor.states import ProcessStates as S

from olmocr.server.command import build_vllm_command, build_vllm_env
from olmocr.server.errors import SettingsError
from olmocr.server.health import HealthPolicy, KillKind, ProbeResult, apply_probe, process_started
from olmocr.server.rpc import ProcessStatsStore
from olmocr.server.settings import ServerSettings, read_api_key
from olmocr.server.supervisor_config import render_supervisord_config
from olmocr.server.wrapper import seconds_to_wait_before_restart
from tests.standin_helpers import REPO_ROOT


def flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_default_command_matches_upstream_launch():
    argv = build_vllm_command(ServerSettings())
    assert argv[:3] == ["vllm", "serve", "allenai/olmOCR-7B-0825-FP8"]
    assert flag(argv, "--served-model-name") == "olmocr"
    assert flag(argv, "--port") == "30024"
    assert flag(argv, "--host") == "127.0.0.1"
    assert flag(argv, "--tensor-parallel-size") == "1"
    assert flag(argv, "--data-parallel-size") == "1"
    assert flag(argv, "--max-model-len") == "16384"
    assert json.loads(flag(argv, "--limit-mm-per-prompt")) == {"video": 0}
    assert flag(argv, "--uvicorn-log-level") == "warning"
    assert "--gpu-memory-utilization" not in argv
    assert "--enable-log-requests" not in argv


def test_options_and_passthrough_flags():
    settings = ServerSettings(model="/models/olmocr", port=8000, host="0.0.0.0", tensor_parallel_size=2,
                              gpu_memory_utilization=0.8, vllm_bin="/opt/fake-vllm",
                              extra_vllm_args=("--max-num-seqs", "64"))
    argv = build_vllm_command(settings, ["--enforce-eager"])
    assert argv[0] == "/opt/fake-vllm" and argv[2] == "/models/olmocr"
    assert flag(argv, "--gpu-memory-utilization") == "0.8"
    assert flag(argv, "--tensor-parallel-size") == "2"
    assert argv[-3:] == ["--max-num-seqs", "64", "--enforce-eager"]
    assert settings.base_url == "http://127.0.0.1:8000"  # probes use loopback even when bound to all


def test_api_key_is_refused_on_the_command_line_and_goes_to_the_environment():
    with pytest.raises(ValueError, match="VLLM_API_KEY"):
        build_vllm_command(ServerSettings(), ["--api-key", "x"])
    env = build_vllm_env({"PATH": "/bin"}, "secret")
    assert env["VLLM_API_KEY"] == "secret" and env["OMP_NUM_THREADS"] == "1"


def test_settings_from_environment_and_clear_errors(tmp_path):
    settings = ServerSettings.from_env({"OLMOCR_PORT": "9000", "OLMOCR_MODEL": "m",
                                        "OLMOCR_VLLM_ARGS": "--a 'b c'"})
    assert (settings.port, settings.model, settings.extra_vllm_args) == (9000, "m", ("--a", "b c"))
    assert ServerSettings.from_env(settings.to_env()) == settings
    with pytest.raises(SettingsError, match="OLMOCR_PORT='x' is not an integer"):
        ServerSettings.from_env({"OLMOCR_PORT": "x"})
    with pytest.raises(SettingsError, match="out of range"):
        ServerSettings.from_env({"OLMOCR_PORT": "70000"})
    key = tmp_path / "key"
    key.write_text("k1\n")
    assert read_api_key(ServerSettings(api_key_file=str(key)), {}) == "k1"
    assert read_api_key(ServerSettings(api_key_file=str(key)), {"VLLM_API_KEY": "k2"}) == "k2"
    with pytest.raises(SettingsError, match="cannot read API key file"):
        read_api_key(ServerSettings(api_key_file=str(tmp_path / "missing")), {})


def test_checked_in_supervisord_conf_is_the_rendered_default():
    # Regenerate with: python -m olmocr.server.supervisor_config > supervisord.conf
    assert (REPO_ROOT / "supervisord.conf").read_text() == render_supervisord_config()


def test_supervisord_conf_has_the_production_settings():
    conf = render_supervisord_config()
    for line in ("chmod = 0700", "autorestart = true", "stopasgroup = false", "killasgroup = true",
                 "stdout_logfile_maxbytes = 50MB", "stdout_logfile_backups = 10", "redirect_stderr = true",
                 "events = TICK_5,PROCESS_STATE", "stopwaitsecs = 60"):
        assert line in conf
    assert "inet_http_server" not in conf  # no TCP control unless an operator adds it


def test_restart_delay_counts_from_the_last_exit():
    assert seconds_to_wait_before_restart(None, 10, 100) == 0
    assert seconds_to_wait_before_restart({"last_exit_time": 95.0}, 10, 100) == 5
    assert seconds_to_wait_before_restart({"last_exit_time": 50.0}, 10, 100) == 0


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_restart_counting_and_persistence(tmp_path):
    clock = Clock()
    path = str(tmp_path / "state.json")
    store = ProcessStatsStore(path, clock=clock, reset_after=600)
    store.on_state_change("vllm", S.STOPPED, S.STARTING)  # first start: not a restart
    clock.now += 30
    store.on_state_change("vllm", S.RUNNING, S.EXITED, exitstatus=-1, expected=False)
    store.on_state_change("vllm", S.EXITED, S.STARTING)
    stats = store.stats("vllm")
    assert (stats["starts"], stats["restarts"], stats["consecutive_restarts"]) == (2, 1, 1)
    assert "exit status -1" in stats["last_failure_reason"]
    clock.now += 700  # ran fine for a long time: the next crash starts a new incident
    store.on_state_change("vllm", S.RUNNING, S.EXITED, exitstatus=0, expected=True)
    store.on_state_change("vllm", S.EXITED, S.STARTING)
    assert (stats["restarts"], stats["consecutive_restarts"]) == (2, 1)
    reloaded = ProcessStatsStore(path)  # what a restarted supervisord sees
    assert reloaded.stats("vllm")["restarts"] == 2


def test_health_listener_kill_reason_is_kept_for_the_exit(tmp_path):
    store = ProcessStatsStore(None)
    store.on_state_change("vllm", S.STOPPED, S.STARTING)
    store.record_kill("vllm", "completion probe timed out")
    store.on_state_change("vllm", S.RUNNING, S.EXITED, exitstatus=0, expected=True)
    assert store.stats("vllm")["last_failure_reason"] == "killed by the health check: completion probe timed out"


POLICY = HealthPolicy(failure_threshold=3, success_threshold=1, startup_timeout=60)
OK = ProbeResult(True, "ok", 0.01)
REFUSED = ProbeResult(False, "connection refused", 0.0, refused=True)
HUNG = ProbeResult(False, "completion probe timed out", 20.0)
WRONG_MODEL = ProbeResult(False, "model olmocr not served", 0.1, config_error=True)


def test_refused_while_loading_is_starting_until_the_startup_timeout():
    state = process_started(0)
    decision = apply_probe(state, REFUSED, POLICY, now=59)
    assert decision.state.phase == "starting" and not decision.kill
    assert decision.state.consecutive_failures == 0
    state = decision.state
    for now in (61, 62, 63):
        decision = apply_probe(state, REFUSED, POLICY, now=now)
        state = decision.state
    assert decision.kill and "startup timeout" in decision.kill_reason


def test_killed_only_after_consecutive_failures_and_recovers_after_success():
    state = apply_probe(process_started(0), OK, POLICY, 1).state
    assert state.phase == "healthy"
    state = apply_probe(state, HUNG, POLICY, 2).state
    state = apply_probe(state, HUNG, POLICY, 3).state
    assert state.phase == "healthy"  # a busy server may miss two probes
    state = apply_probe(state, OK, POLICY, 4).state
    assert state.consecutive_failures == 0
    for now in (5, 6):
        state = apply_probe(state, HUNG, POLICY, now).state
    decision = apply_probe(state, HUNG, POLICY, 7)
    assert decision.kill and decision.state.phase == "unhealthy"
    # Once it has served, a refused connection is a failure, not "loading".
    assert apply_probe(state, REFUSED, POLICY, 8).state.consecutive_failures == 3


def test_configuration_errors_are_unhealthy_but_not_killed():
    state = process_started(0)
    for now in range(1, 6):
        decision = apply_probe(state, WRONG_MODEL, POLICY, now)
        state = decision.state
        assert not decision.kill
    assert state.phase == "unhealthy" and "not served" in state.reason


def test_checked_in_include_file_is_the_rendered_include():
    from olmocr.server.supervisor_config import INCLUDE_HEADER, INCLUDE_LAYOUT, render_program_sections

    assert (REPO_ROOT / "deploy" / "olmocr-vllm.conf").read_text() == (
        INCLUDE_HEADER + render_program_sections(INCLUDE_LAYOUT))


@pytest.mark.parametrize("result, started_ago, kind", [
    (ProbeResult(False, "completion probe timed out after 18 s (engine hung?)", 18.0,
                 kind=KillKind.COMPLETION_TIMEOUT), 700, KillKind.COMPLETION_TIMEOUT),
    (ProbeResult(False, "GET /health returned 503", 0.1, kind=KillKind.HEALTH_ENDPOINT), 700,
     KillKind.HEALTH_ENDPOINT),
    (ProbeResult(False, "connection refused", 0.0, refused=True, kind=KillKind.NOT_LISTENING), 700,
     KillKind.STARTUP_TIMEOUT),  # never answered within the startup timeout
])
def test_a_kill_carries_its_kind_as_a_value(result, started_ago, kind):
    """The metrics label of a kill comes from the decision, not from matching the text of its reason."""


    policy = HealthPolicy(failure_threshold=1, startup_timeout=600)
    decision = apply_probe(process_started(0.0), result, policy, now=float(started_ago))
    assert decision.kill and decision.kill_kind is kind


def test_the_store_counts_kills_by_the_kind_given_and_reads_old_reasons_by_prefix():
    store = ProcessStatsStore(None)
    store.record_kill("vllm", "anything at all", "completion_timeout")
    store.record_kill("vllm", "GET /v1/models returned 500 (3 consecutive failed probes)")  # an older listener
    assert store.stats("vllm")["kills_by_reason"] == {"completion_timeout": 1, "models_endpoint": 1}
