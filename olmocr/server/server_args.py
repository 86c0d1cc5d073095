"""The server's shared command line and start-up checks: the vLLM-facing options (``add_server_arguments``
and ``settings_from_args``), finding the executable, and learning / judging its vLLM version.

The wrapper (what supervisord runs), the manager and the pipeline's internal mode all use them; they live
here, not in the wrapper, whose one job is to exec vLLM.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
from collections.abc import Mapping

from olmocr import envs
from olmocr.server.errors import SettingsError
from olmocr.server.settings import DEFAULT_MODEL, ServerSettings
from olmocr.server.vllm_executable import learn_vllm_version
from olmocr.server.vllm_versions import Version, judge_version, parse_version

log = logging.getLogger(__name__)


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    """The vLLM-facing options shared by the wrapper and ``olmocr.vllm_server_manager``."""
    parser.add_argument("model", nargs="?", default=None,
                        help=f"model path or Hugging Face id (default {DEFAULT_MODEL}, env OLMOCR_MODEL)")
    parser.add_argument("--port", type=int, default=None, help=f"HTTP port (default {envs.DEFAULT_PORT}, env OLMOCR_PORT)")
    parser.add_argument("--host", default=None,
                        help="bind address (default 127.0.0.1, env OLMOCR_HOST); any other needs an API key "
                             "(OLMOCR_API_KEY_FILE or VLLM_API_KEY) or OLMOCR_TRUSTED_NETWORK=1")
    parser.add_argument("--tensor-parallel-size", type=int, default=None, help="default 1")
    parser.add_argument("--data-parallel-size", type=int, default=None, help="default 1")
    parser.add_argument("--gpu-memory-utilization", type=float, default=None,
                        help="fraction of GPU memory for vLLM (default: vLLM's own)")
    parser.add_argument("--max-model-len", type=int, default=None,
                        help=f"default {envs.DEFAULT_MAX_MODEL_LEN}, env OLMOCR_MAX_MODEL_LEN")
    parser.add_argument("--scheduling-policy", choices=["fcfs", "priority"], default=None,
                        help="priority: serve waiting requests by their priority field (pipeline --priority); "
                             "default fcfs, env OLMOCR_SCHEDULING_POLICY")
    parser.add_argument("--vllm-bin", default=None,
                        help="server executable invoked as vLLM is (default: vllm on PATH, env OLMOCR_VLLM_BIN)")
    parser.add_argument("--restart-delay", type=float, default=None,
                        help="seconds to wait before restarting a crashed server (default "
                             f"{envs.default('OLMOCR_RESTART_DELAY'):g}, env OLMOCR_RESTART_DELAY)")


#: The flags that override a server setting, by their ServerSettings field (and argparse dest).
SETTINGS_FLAGS = ("model", "port", "host", "tensor_parallel_size", "data_parallel_size", "gpu_memory_utilization",
                  "max_model_len", "scheduling_policy", "vllm_bin", "restart_delay", "gpus")


def settings_from_args(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> ServerSettings:
    """The server's settings: ``OLMOCR_*`` (``env``, default the process's), then the flags given. The one
    argparse -> ServerSettings path of the wrapper, the manager and the pipeline's internal mode; a flag a
    command does not have (the pipeline has no ``--host`` or ``--vllm-bin``) keeps the setting's value."""
    return ServerSettings.from_env(env, **{name: getattr(args, name, None) for name in SETTINGS_FLAGS})


def resolve_executable(name: str) -> str:
    path = shutil.which(name)
    if path is None and os.sep not in name:
        # vLLM installed in the same virtual environment, not activated (PATH lacks its bin/).
        beside_python = os.path.join(os.path.dirname(sys.executable), name)
        path = beside_python if os.access(beside_python, os.X_OK) else None
    if path is None:
        raise SettingsError(
            f"server executable {name!r} not found: install the gpu extra (pip install '.[gpu]') "
            "or point OLMOCR_VLLM_BIN / --vllm-bin at a program that accepts vLLM's command line"
        )
    return os.path.abspath(path)


def vllm_version_or_refuse(executable: str, cache_file: str | os.PathLike[str] | None = None, *,
                           use_cache: bool = True, warn: bool = True) -> Version | None:
    """The release ``executable`` is (None: it did not say); SettingsError (one line) when it cannot
    serve olmOCR. ``warn``: log the warning for a release outside the tested range (the wrapper does, at
    every start, into the server's log; the manager's early check leaves that to it)."""
    text = learn_vllm_version(executable, cache_file, use_cache=use_cache)
    version = parse_version(text)
    verdict = judge_version(version, executable)
    if verdict.refuse:
        raise SettingsError(verdict.refuse)
    if warn and verdict.warning:
        log.warning("%s", verdict.warning)
    return version
