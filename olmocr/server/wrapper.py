"""The thin wrapper supervisord runs as ``[program:vllm]``: it builds the vLLM command and ``exec``s it.

``exec`` (not a child process) keeps the server's pid equal to the one supervisord tracks, and the
server stays leader of the process group supervisord created for it, so supervisord's SIGTERM reaches
the server itself (which then drains and stops its engine) while ``killasgroup`` and the health
listener's group kill reach vLLM's engine processes too: an orphaned engine keeps holding GPU memory
and the port.

On a restart it first waits out ``--restart-delay`` (counted from the last exit recorded by the
olmocr RPC extension) so a crashed engine has time to release GPU memory.

vLLM's scratch files (ZeroMQ sockets, ``vllm_dist_*``; it leaves them after every run) go to
``OLMOCR_VLLM_TMPDIR`` (supervisord.conf: ``<run>/vllm-tmp``), emptied before each start, never to the
system temp directory. ``--shutdown-timeout`` is shortened if supervisord's ``stopwaitsecs`` would kill
vLLM inside its drain (olmocr/server/drain.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import shutil
import sys
import time
from collections.abc import Mapping, Sequence

from olmocr import envs
from olmocr.server.command import build_vllm_command, build_vllm_env
from olmocr.server.drain import fit_shutdown_timeout
from olmocr.server.errors import SettingsError
from olmocr.server.settings import DEFAULT_MODEL, ServerSettings, read_api_key

log = logging.getLogger("olmocr.wrapper")


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    """The vLLM-facing options shared by the wrapper and ``olmocr.vllm_server_manager``."""
    parser.add_argument("model", nargs="?", default=None,
                        help=f"model path or Hugging Face id (default {DEFAULT_MODEL}, env OLMOCR_MODEL)")
    parser.add_argument("--port", type=int, default=None, help=f"HTTP port (default {envs.DEFAULT_PORT}, env OLMOCR_PORT)")
    parser.add_argument("--host", default=None,
                        help="bind address (default 127.0.0.1; 0.0.0.0 exposes the API to the network)")
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


def settings_from_args(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> ServerSettings:
    return ServerSettings.from_env(
        env,
        model=args.model,
        port=args.port,
        host=args.host,
        tensor_parallel_size=args.tensor_parallel_size,
        data_parallel_size=args.data_parallel_size,
        gpu_memory_utilization=args.gpu_memory_utilization,
        max_model_len=args.max_model_len,
        scheduling_policy=args.scheduling_policy,
        vllm_bin=args.vllm_bin,
        restart_delay=args.restart_delay,
    )


def seconds_to_wait_before_restart(stats: Mapping[str, object] | None, restart_delay: float,
                                   now: float) -> float:
    """How long to sleep so that at least ``restart_delay`` separates the last exit from this start."""
    if not stats or not stats.get("last_exit_time"):
        return 0.0
    elapsed = now - float(stats["last_exit_time"])  # type: ignore[arg-type]
    return max(0.0, min(restart_delay, restart_delay - elapsed))


def _process_stats_from_supervisor(env: Mapping[str, str]) -> Mapping[str, object] | None:
    """Ask our RPC extension (through the URL supervisord gives its children) about earlier exits."""
    if "SUPERVISOR_SERVER_URL" not in env:
        return None
    try:
        from olmocr.server.rpcclient import connect_from_child_env

        proxy = connect_from_child_env(env, timeout=5.0)
        return proxy.olmocr.getProcessStats(env.get("SUPERVISOR_PROCESS_NAME", "vllm"))
    except Exception as exc:  # the delay is a courtesy; never block a start on it
        log.warning("could not read restart history from supervisord (%s); starting without delay", exc)
        return None


#: vLLM names its sockets ``ipc://<TMPDIR>/<uuid4>``; AF_UNIX paths end at 107 bytes.
MAX_TMPDIR_LEN = 107 - 1 - 36
#: Entries of the scratch directory kept across starts: compiled-kernel caches, not per-run state.
KEEP_IN_TMPDIR = ("torchinductor_",)


def prepare_tmpdir(path: str | None) -> str | None:
    """Creates the server's scratch directory (mode 0700) and removes what earlier runs left in it.

    Returns the directory for ``TMPDIR``, or None (keep the inherited one) when none is configured or its
    path is too long for vLLM's unix sockets.
    """
    if not path:
        return None
    path = os.path.abspath(path)
    if len(path) > MAX_TMPDIR_LEN:
        log.warning("OLMOCR_VLLM_TMPDIR %s is longer than %d characters, too long for vLLM's unix sockets; "
                    "vLLM uses the system temp directory instead", path, MAX_TMPDIR_LEN)
        return None
    os.makedirs(path, mode=0o700, exist_ok=True)
    for entry in os.listdir(path):
        if entry.startswith(KEEP_IN_TMPDIR):
            continue
        full = os.path.join(path, entry)
        if os.path.isdir(full) and not os.path.islink(full):
            shutil.rmtree(full, ignore_errors=True)
        else:
            try:
                os.unlink(full)
            except OSError:
                pass
    return path


def _stopwaitsecs_from_supervisor(env: Mapping[str, str]) -> int | None:
    """supervisord's ``stopwaitsecs`` for this program (None when not under supervisord or unknown)."""
    if "SUPERVISOR_SERVER_URL" not in env:
        return None
    try:
        from olmocr.server.rpcclient import connect_from_child_env

        name = env.get("SUPERVISOR_PROCESS_NAME", "vllm")
        for info in connect_from_child_env(env, timeout=5.0).supervisor.getAllConfigInfo():
            if info.get("name") == name:
                return int(info["stopwaitsecs"])
    except Exception as exc:  # a courtesy check; never block a start on it
        log.warning("could not read stopwaitsecs from supervisord (%s)", exc)
    return None


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


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s olmocr-wrapper %(levelname)s %(message)s",
                        stream=sys.stderr)
    parser = argparse.ArgumentParser(
        prog="olmocr-vllm-wrapper",
        description="Start vLLM for olmOCR (exec); unknown flags are passed to vLLM unchanged.",
    )
    add_server_arguments(parser)
    args, passthrough = parser.parse_known_args(argv)
    try:
        settings = settings_from_args(args)
        fitted = fit_shutdown_timeout(settings.shutdown_timeout, _stopwaitsecs_from_supervisor(os.environ))
        if fitted != settings.shutdown_timeout:
            log.warning("OLMOCR_SHUTDOWN_TIMEOUT=%d does not fit supervisord's stopwaitsecs (it would SIGKILL "
                        "vLLM mid-drain): using --shutdown-timeout %d; raise stopwaitsecs to keep %d",
                        settings.shutdown_timeout, fitted, settings.shutdown_timeout)
            settings = dataclasses.replace(settings, shutdown_timeout=fitted)
        api_key = read_api_key(settings)
        argv_out = build_vllm_command(settings, passthrough)
        argv_out[0] = resolve_executable(argv_out[0])
    except (SettingsError, ValueError) as exc:
        print(f"olmocr-vllm-wrapper: error: {exc}", file=sys.stderr)
        return 2

    delay = seconds_to_wait_before_restart(_process_stats_from_supervisor(os.environ),
                                           settings.restart_delay, time.time())
    if delay > 0:
        log.info("server exited recently; waiting %.1f s (restart delay) before starting it again", delay)
        time.sleep(delay)

    log.info("starting: %s", " ".join(argv_out))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(argv_out[0], argv_out, build_vllm_env(os.environ, api_key, prepare_tmpdir(settings.vllm_tmpdir)))
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
