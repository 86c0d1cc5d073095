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

It passes only the flags the vLLM it starts accepts: it learns the version (olmocr/server/vllm_executable.py),
refuses in one line a release that cannot serve olmOCR, warns on one outside the tested range, and logs
each flag it leaves out with what that costs (the table: olmocr/server/vllm_versions.py).
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

from olmocr.server.command import build_vllm_command, build_vllm_env, plan_vllm_flags
from olmocr.server.drain import fit_shutdown_timeout
from olmocr.server.errors import SettingsError
from olmocr.server.server_args import (
    add_server_arguments,
    resolve_executable,
    settings_from_args,
    vllm_version_or_refuse,
)
from olmocr.server.settings import exposure_note, read_api_key

log = logging.getLogger(__name__)


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


#: How long the wrapper waits for its port to be released (a previous vLLM's last process exiting) before
#: it says who holds it and exits instead of starting a vLLM that would fail with "Address already in use".
PORT_WAIT_S = 10.0


def wait_for_port(host: str, port: int, wait_s: float = PORT_WAIT_S) -> str | None:
    """None once ``host:port`` is free; after ``wait_s`` the one line naming who holds it."""
    from olmocr.port_owner import port_problem

    deadline = time.monotonic() + wait_s
    while True:
        problem = port_problem(host or "0.0.0.0", port, "the vLLM server",
                               "stop that program or choose another port (OLMOCR_PORT / --port)")
        if problem is None or time.monotonic() >= deadline:
            return problem
        time.sleep(0.5)


def main(argv: Sequence[str] | None = None) -> int:
    from olmocr.logformat import LOG_FORMAT

    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT, stream=sys.stderr)
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
        exposure = exposure_note(settings, api_key)  # refuses beyond loopback without a key
        settings = dataclasses.replace(settings, vllm_bin=resolve_executable(settings.vllm_bin))
        version = vllm_version_or_refuse(settings.vllm_bin)
        for note in plan_vllm_flags(settings, version).notes:
            log.warning("%s", note)
        argv_out = build_vllm_command(settings, passthrough, version)
    except (SettingsError, ValueError) as exc:
        print(f"olmocr-vllm-wrapper: error: {exc}", file=sys.stderr)
        return 2

    delay = seconds_to_wait_before_restart(_process_stats_from_supervisor(os.environ),
                                           settings.restart_delay, time.time())
    if delay > 0:
        log.info("server exited recently; waiting %.1f s (restart delay) before starting it again", delay)
        time.sleep(delay)

    if exposure:
        log.warning("%s", exposure)
    if (problem := wait_for_port(settings.host, settings.port)) is not None:
        log.error("%s", problem)  # one line in vllm.log; supervisord's status shows the exit
        return 2
    log.info("starting: %s", " ".join(argv_out))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(argv_out[0], argv_out, build_vllm_env(os.environ, api_key, prepare_tmpdir(settings.vllm_tmpdir)))
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
