"""``python -m olmocr.vllm_server_manager``: the supervised deployment in the foreground.

It renders the same supervisord configuration as ``supervisord.conf`` into a run directory, starts
supervisord (``-n``) with the options as ``OLMOCR_*`` environment, reports readiness and a status JSON
every minute from supervisord's XML-RPC, and on Ctrl+C / SIGTERM shuts supervisord down, which stops
the whole vLLM process group, then makes sure nothing it started is left and exits 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import logging.handlers
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import psutil

from olmocr import envs
from olmocr.server.drain import manager_stop_budget, stopwaitsecs_for
from olmocr.server.errors import SettingsError
from olmocr.server.lifetime import die_with_parent
from olmocr.server.rpcclient import connect
from olmocr.server.settings import PROGRAM_NAME, ServerSettings, read_api_key
from olmocr.server.status import fetch_status
from olmocr.server.supervisor_config import ConfigLayout, render_supervisord_config
from olmocr.server.wrapper import add_server_arguments, resolve_executable, settings_from_args

log = logging.getLogger("olmocr.manager")

READY_MESSAGE = "vLLM server is ready and accepting requests"
MAX_UNIX_SOCKET_PATH = 100


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="python -m olmocr.vllm_server_manager",
        description="Run a persistent, supervised vLLM server for olmOCR in the foreground. "
                    "Unknown flags are passed to vLLM unchanged.",
    )
    add_server_arguments(parser)
    parser.add_argument("--health-check-interval", type=float, default=None,
                        help="seconds between health probes (default 10)")
    parser.add_argument("--max-restart-attempts", type=int, default=None,
                        help="restarts in a row (each run shorter than 10 min) before the server is left stopped "
                             "(default 10)")
    parser.add_argument("--run-dir", default="olmocr-server-run",
                        help="directory for the generated supervisord.conf, socket, state and logs "
                             "(default ./olmocr-server-run)")
    parser.add_argument("--log-file", default="vllm-server-manager.log",
                        help="DEBUG log of the manager, rotated (default ./vllm-server-manager.log)")
    parser.add_argument("--status-interval", type=float, default=60.0,
                        help="seconds between status JSON lines on the console (default 60)")
    parser.add_argument("--startsecs", type=int, default=5, help=argparse.SUPPRESS)
    return parser.parse_known_args(argv)


def setup_logging(log_file: str) -> None:
    root = logging.getLogger()
    root.setLevel(logging.DEBUG)
    console = logging.StreamHandler(sys.stdout)
    console.setLevel(logging.INFO)
    console.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    to_file = logging.handlers.RotatingFileHandler(log_file, maxBytes=10 * 1024 * 1024, backupCount=5)
    to_file.setLevel(logging.DEBUG)
    to_file.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    root.handlers[:] = [console, to_file]
    logging.getLogger("urllib3").setLevel(logging.INFO)


def socket_path_for(run_dir: Path) -> str:
    path = run_dir / "supervisor.sock"
    if len(str(path)) <= MAX_UNIX_SOCKET_PATH:
        return str(path)
    # AF_UNIX paths are limited to ~107 bytes: fall back to a private directory under /tmp.
    private = Path(tempfile.mkdtemp(prefix="olmocr-"))
    return str(private / "supervisor.sock")


class Manager:
    def __init__(self, settings: ServerSettings, run_dir: Path, status_interval: float, startsecs: int,
                 extra_env: dict[str, str] | None = None) -> None:
        self.extra_env = dict(extra_env or {})  # for supervisord and its programs, over os.environ
        self.settings = settings
        self.run_dir = run_dir
        self.status_interval = status_interval
        self.stop_requested = False
        self.socket_file = socket_path_for(run_dir)
        # A run directory too long for AF_UNIX puts the socket in a private /tmp directory: ours to remove.
        self._private_socket_dir = (Path(self.socket_file).parent if Path(self.socket_file).parent != run_dir
                                    else None)
        self.config_path = run_dir / "supervisord.conf"
        self.stopwaitsecs = max(ConfigLayout.stopwaitsecs, stopwaitsecs_for(settings.shutdown_timeout))
        layout = ConfigLayout(run_dir=str(run_dir / "run"), log_dir=str(run_dir / "logs"),
                              python=sys.executable, nodaemon=True, startsecs=startsecs,
                              socket_file=self.socket_file,
                              stopwaitsecs=self.stopwaitsecs)
        (run_dir / "run").mkdir(parents=True, exist_ok=True)
        (run_dir / "logs").mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(render_supervisord_config(layout))
        self.supervisord: subprocess.Popen | None = None
        self.proxy = connect(f"unix://{self.socket_file}", timeout=10.0)

    def request_stop(self, signum: int, _frame: object) -> None:
        log.info("received %s: stopping the server", signal.Signals(signum).name)
        self.stop_requested = True

    def start(self) -> None:
        env = dict(os.environ)
        env.update(self.extra_env)
        env.update(self.settings.to_env())
        # Fresh counts for a fresh deployment run; supervisord keeps them across its own restarts.
        (self.run_dir / "run" / "olmocr-state.json").unlink(missing_ok=True)
        self.supervisord = subprocess.Popen(
            [sys.executable, "-m", "supervisor.supervisord", "-n", "-c", str(self.config_path)],
            env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            preexec_fn=_terminate_when_parent_dies(os.getpid()),
        )
        log.info("supervisord started (pid %d), config %s", self.supervisord.pid, self.config_path)
        log.info("vLLM output: %s", self.run_dir / "logs" / "vllm.log")

    def run(self) -> int:
        self.start()
        ready_announced = False
        next_status_at = time.monotonic() + self.status_interval
        exit_code = 0
        try:
            while not self.stop_requested:
                if self.supervisord.poll() is not None:
                    log.error("supervisord exited unexpectedly (status %s); see %s", self.supervisord.returncode,
                              self.run_dir / "logs" / "supervisord.log")
                    return 1
                status = self.poll_status()
                if status is not None:
                    if status["healthy"] and not ready_announced:
                        log.info(READY_MESSAGE)
                        print(READY_MESSAGE, flush=True)
                        ready_announced = True
                    if status.get("gave_up") or status.get("state") == "FATAL":
                        log.error("server left stopped: %s", status.get("last_failure_reason"))
                        print(json.dumps(status), flush=True)
                        exit_code = 1
                        break
                    if time.monotonic() >= next_status_at:
                        print(json.dumps(status), flush=True)
                        next_status_at = time.monotonic() + self.status_interval
                time.sleep(1.0)
        finally:
            self.shutdown()
        return exit_code

    def poll_status(self) -> dict | None:
        try:
            return fetch_status(self.proxy, PROGRAM_NAME)
        except Exception as exc:  # supervisord still starting, or briefly busy
            log.debug("status not available yet: %s", exc)
            return None

    def shutdown(self) -> None:
        try:
            self._stop_supervisord()
        finally:
            if self._private_socket_dir is not None:
                shutil.rmtree(self._private_socket_dir, ignore_errors=True)

    def _stop_supervisord(self) -> None:
        if self.supervisord is None:
            return
        tree = _process_tree(self.supervisord.pid)
        try:
            self.proxy.supervisor.shutdown()
        except Exception:
            self.supervisord.send_signal(signal.SIGTERM)
        budget = manager_stop_budget(self.settings.shutdown_timeout)  # stopwaitsecs + supervisord's exit
        try:
            # supervisord waits up to stopwaitsecs for vLLM before SIGKILLing its group.
            self.supervisord.wait(timeout=budget)
        except subprocess.TimeoutExpired:
            log.error("supervisord did not exit in %d s; killing it", budget)
            os.killpg(self.supervisord.pid, signal.SIGKILL)
            self.supervisord.wait(timeout=10)
        tree.update(_process_tree_alive(tree))
        leftovers = [p for p in tree if p.is_running()]
        for proc in leftovers:
            log.warning("killing leftover process %d (%s)", proc.pid, proc.name())
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        log.info("stopped")


def _terminate_when_parent_dies(parent_pid: int):  # noqa: ANN202 - a preexec_fn
    """For supervisord's child side: SIGTERM it when the manager dies, even by SIGKILL (Linux
    ``PR_SET_PDEATHSIG``), so that it stops vLLM's process group instead of leaving it holding the GPU."""
    return functools.partial(die_with_parent, signal.SIGTERM, parent_pid)


def _process_tree(pid: int) -> set[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return {root, *root.children(recursive=True)}
    except psutil.NoSuchProcess:
        return set()


def _process_tree_alive(tree: set[psutil.Process]) -> set[psutil.Process]:
    found: set[psutil.Process] = set()
    for proc in tree:
        try:
            found.update(proc.children(recursive=True))
        except psutil.NoSuchProcess:
            pass
    return found


def main(argv: Sequence[str] | None = None) -> int:
    args, passthrough = parse_args(argv)
    try:  # the log file may live in the run directory (the container image puts both in /run/olmocr)
        Path(args.log_file).parent.mkdir(parents=True, exist_ok=True)
        setup_logging(args.log_file)
    except OSError as exc:
        print(f"cannot write the log file {args.log_file}: {exc.strerror}; choose another --log-file",
              file=sys.stderr)
        return 2
    try:
        settings = settings_from_args(args)
        overrides = {}
        if args.health_check_interval is not None:
            overrides["health_interval"] = args.health_check_interval
        if args.max_restart_attempts is not None:
            overrides["max_restart_attempts"] = args.max_restart_attempts
        if passthrough:
            overrides["extra_vllm_args"] = settings.extra_vllm_args + tuple(passthrough)
        overrides["vllm_bin"] = resolve_executable(settings.vllm_bin)
        settings = dataclasses.replace(settings, **overrides)
        settings.validate()
        read_api_key(settings)  # fail now, not in a restart loop, when the key file is unreadable
    except (SettingsError, ValueError) as exc:
        log.error("%s", exc)
        return 2
    manager = Manager(settings, Path(args.run_dir).resolve(), args.status_interval, args.startsecs)
    signal.signal(signal.SIGINT, manager.request_stop)
    signal.signal(signal.SIGTERM, manager.request_stop)
    log.info("serving %s as 'olmocr' on %s (health every %g s, at most %d restarts)", settings.model,
             settings.base_url, settings.health_interval, settings.max_restart_attempts)
    log.info("status service: http://%s:%s (/metrics, /status, /ws; docs/observability.md)",
             envs.value("OLMOCR_STATUS_HOST"), envs.value("OLMOCR_STATUS_PORT"))
    return manager.run()


if __name__ == "__main__":
    sys.exit(main())
