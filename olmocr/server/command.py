"""Builds the ``vllm serve`` command line and environment from deployment settings (pure functions)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from olmocr.server.settings import SERVED_MODEL_NAME, ServerSettings
from olmocr.server.vllm_versions import FlagPlan, Version, plan_server_flags


def plan_vllm_flags(settings: ServerSettings, vllm_version: Version | None = None) -> FlagPlan:
    """olmocr-serve's own flags for this vLLM release, and a line for each one it leaves out or changes
    (the table and the reasons: olmocr/server/vllm_versions.py). ``None``: the newest tested release."""
    return plan_server_flags(
        vllm_version,
        host=settings.host,
        port=settings.port,
        served_model_name=SERVED_MODEL_NAME,
        tensor_parallel_size=settings.tensor_parallel_size,
        data_parallel_size=settings.data_parallel_size,
        max_model_len=settings.max_model_len,
        gpu_memory_utilization=settings.gpu_memory_utilization,
        shutdown_timeout=settings.shutdown_timeout,
        scheduling_policy=settings.scheduling_policy,
    )


def build_vllm_command(settings: ServerSettings, passthrough: Sequence[str] = (),
                       vllm_version: Version | None = None) -> list[str]:
    """The argv that starts the server: ``BIN serve MODEL --served-model-name olmocr ...``, with only
    the flags ``vllm_version`` accepts (``None``: the newest tested release).

    Unknown flags (``passthrough`` and ``settings.extra_vllm_args``) go to vLLM unchanged, after ours,
    so an operator can override any of them (argparse keeps the last value).
    """
    argv = [settings.vllm_bin, "serve", settings.model]
    argv += plan_vllm_flags(settings, vllm_version).args
    argv += list(settings.extra_vllm_args)
    argv += list(passthrough)
    refuse_secrets_in_argv(argv)
    return argv


def build_vllm_env(base: Mapping[str, str], api_key: str | None, tmpdir: str | None = None) -> dict[str, str]:
    """The server's environment: the caller's, single-threaded OpenMP, the API key if any, and
    ``TMPDIR`` (where vLLM puts its sockets) if the deployment gives it a directory of its own."""
    env = dict(base)
    env["OMP_NUM_THREADS"] = "1"
    if api_key:
        env["VLLM_API_KEY"] = api_key
    if tmpdir:
        env["TMPDIR"] = tmpdir
    return env


def refuse_secrets_in_argv(argv: Sequence[str]) -> None:
    """Command lines are world-readable (``ps``); an API key must travel in the environment."""
    for arg in argv:
        if arg == "--api-key" or arg.startswith("--api-key="):
            raise ValueError(
                "refusing to put an API key on the vLLM command line (visible in ps): "
                "set VLLM_API_KEY in the environment or OLMOCR_API_KEY_FILE instead"
            )
