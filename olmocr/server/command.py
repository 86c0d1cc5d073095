"""Builds the ``vllm serve`` command line and environment from deployment settings (pure functions)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

from olmocr.server.settings import SERVED_MODEL_NAME, ServerSettings

# vLLM >= 0.11 logs requests only with --enable-log-requests (PR #21739 removed --disable-log-requests),
# so "request logging off" means passing nothing; the gpu extra pins vllm>=0.11. An operator on an
# older vLLM adds --disable-log-requests through OLMOCR_VLLM_ARGS.
LIMIT_MM_PER_PROMPT = json.dumps({"video": 0})


def build_vllm_command(settings: ServerSettings, passthrough: Sequence[str] = ()) -> list[str]:
    """The argv that starts the server: ``BIN serve MODEL --served-model-name olmocr ...``.

    Unknown flags (``passthrough`` and ``settings.extra_vllm_args``) go to vLLM unchanged, after ours,
    so an operator can override any of them (argparse keeps the last value).
    """
    argv = [
        settings.vllm_bin,
        "serve",
        settings.model,
        "--served-model-name", SERVED_MODEL_NAME,
        "--host", settings.host,
        "--port", str(settings.port),
        "--tensor-parallel-size", str(settings.tensor_parallel_size),
        "--data-parallel-size", str(settings.data_parallel_size),
        "--max-model-len", str(settings.max_model_len),
        "--limit-mm-per-prompt", LIMIT_MM_PER_PROMPT,
        "--uvicorn-log-level", "warning",
    ]
    if settings.gpu_memory_utilization is not None:
        argv += ["--gpu-memory-utilization", str(settings.gpu_memory_utilization)]
    if settings.shutdown_timeout > 0:  # 0 is vLLM's default (abort at once); older vLLMs lack the flag
        argv += ["--shutdown-timeout", str(settings.shutdown_timeout)]
    if settings.scheduling_policy != "fcfs":
        argv += ["--scheduling-policy", settings.scheduling_policy]
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
