"""``python -m olmocr.vllm_server_manager``: the supervised deployment in the foreground.

It renders the same supervisord configuration as ``supervisord.conf`` into a run directory, starts
supervisord (``-n``) with the options as ``OLMOCR_*`` environment, reports readiness and a status JSON
every minute from supervisord's XML-RPC, and on Ctrl+C / SIGTERM shuts supervisord down, which stops
the whole vLLM process group, then makes sure nothing it started is left and exits 0.

With several GPUs (``--gpus`` / ``OLMOCR_GPUS``, default every visible GPU) it runs one server per GPU
(olmocr/server/expansion.py), prints every server's URL and the one ``--vllm-url`` value that reaches
them all (a port range), says "ready" once every server is, and until then names those that are not.
It exits 1 only when every server has been left stopped; one server given up is reported and the
others keep serving.
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

from olmocr import __version__
from olmocr.logformat import formatter
from olmocr.port_owner import port_problem
from olmocr.server.box_ports import status_port_problem, status_url
from olmocr.server.command import plan_vllm_flags
from olmocr.server.drain import manager_stop_budget, stopwaitsecs_for
from olmocr.server.errors import SettingsError
from olmocr.server.gpus import ServerSlot, port_range_url
from olmocr.server.lifetime import die_with_parent
from olmocr.server.rpcclient import connect
from olmocr.server.server_args import (
    add_server_arguments,
    resolve_executable,
    settings_from_args,
    vllm_version_or_refuse,
)
from olmocr.server.settings import PROGRAM_NAME, ServerSettings, exposure_note, read_api_key
from olmocr.server.status import fetch_status
from olmocr.server.supervisor_config import ConfigLayout, render_supervisord_config

log = logging.getLogger(__name__)

READY_MESSAGE = "vLLM server is ready and accepting requests"
MAX_UNIX_SOCKET_PATH = 100


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="python -m olmocr.vllm_server_manager",
        description="Run a persistent, supervised vLLM server for olmOCR in the foreground. "
                    "Unknown flags are passed to vLLM unchanged.",
    )
    parser.add_argument("--version", action="version", version=f"olmocr-serve {__version__}")
    add_server_arguments(parser)
    parser.add_argument("--gpus", default=None,
                        help="GPUs to serve on, one server each (or each tensor-parallel run): 'all' (default: "
                             "every GPU nvidia-smi lists, honouring CUDA_VISIBLE_DEVICES), a count N, or a list "
                             "0,1,3 (env OLMOCR_GPUS)")
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
    console.setFormatter(formatter())
    to_file = logging.handlers.RotatingFileHandler(log_file, maxBytes=10 * 1024 * 1024, backupCount=5)
    to_file.setLevel(logging.DEBUG)
    to_file.setFormatter(formatter())
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
                 extra_env: dict[str, str] | None = None, slots: list[ServerSlot] | None = None) -> None:
        self.extra_env = dict(extra_env or {})  # for supervisord and its programs, over os.environ
        # Resolved once here (nvidia-smi), then given to supervisord as an explicit list so that the
        # RPC extension, the listener and the status service see the very same servers.
        self.slots = slots if slots is not None else settings.server_slots()
        gpus = [gpu for slot in self.slots for gpu in slot.gpus]
        if gpus:
            settings = dataclasses.replace(settings, gpus=",".join(gpus))
        self.settings = settings
        self.run_dir = run_dir
        self.status_interval = status_interval
        self.stop_requested = False
        self._status_service_down = False
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
        for slot in self.slots:
            name = "vllm" if slot.name == slot.group else slot.name
            log.info("vLLM output: %s", self.run_dir / "logs" / f"{name}.log")

    @property
    def vllm_url(self) -> str:
        """The one ``--vllm-url`` value that reaches every server of this box."""
        return port_range_url(self.settings.client_host, self.slots)

    def announce_servers(self) -> None:
        for slot in self.slots:
            log.info("server %s: %s%s", slot.rpc_name, slot.url(self.settings.client_host),
                     f" on GPU {','.join(slot.gpus)}" if slot.gpus else "")
        log.info("pipeline: --vllm-url %s", self.vllm_url)

    def run(self) -> int:
        self.start()
        ready_announced = False
        next_status_at = time.monotonic() + self.status_interval
        next_waiting_note = time.monotonic() + min(self.status_interval, 30.0)
        reported_given_up: set[str] = set()
        exit_code = 0
        try:
            while not self.stop_requested:
                if self.supervisord.poll() is not None:
                    log.error("supervisord exited unexpectedly (status %s); see %s", self.supervisord.returncode,
                              self.run_dir / "logs" / "supervisord.log")
                    return 1
                status = self.poll_status()
                if status is not None:
                    self.report_status_service(status.get("status_service") or {})
                    servers = status.get("servers") or []
                    if status["healthy"] and not ready_announced:
                        if len(servers) > 1:
                            log.info("all %d servers ready: --vllm-url %s", len(servers), self.vllm_url)
                        log.debug(READY_MESSAGE)  # the log file only: the console gets the bare line, once
                        print(READY_MESSAGE, flush=True)
                        ready_announced = True
                    elif not status["healthy"] and len(servers) > 1 and time.monotonic() >= next_waiting_note:
                        waiting = [f"{e['name']} ({e.get('health_phase') or (e.get('state') or '?').lower()})"
                                   for e in servers if not e["healthy"]]
                        log.info("%d of %d servers ready; not ready: %s", len(servers) - len(waiting),
                                 len(servers), ", ".join(waiting))
                        next_waiting_note = time.monotonic() + min(self.status_interval, 30.0)
                    for entry in servers if len(servers) > 1 else []:
                        if entry.get("gave_up") and entry["name"] not in reported_given_up:
                            reported_given_up.add(entry["name"])
                            log.error("server %s left stopped: %s; the other servers keep serving",
                                      entry["name"], entry.get("last_failure_reason"))
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

    def report_status_service(self, service: dict) -> None:
        """One line when the status service stops running (its port taken since the start, a bad token
        file...): the URL announced would not answer. Its own last log line names the cause (and the port's
        owner)."""
        state = service.get("state")
        if state not in ("BACKOFF", "EXITED", "FATAL"):
            self._status_service_down = False
            return
        if self._status_service_down:
            return
        self._status_service_down = True
        log.error("the status service (%s) is not running (%s): %s", service.get("url"), state,
                  last_line(self.run_dir / "logs" / "olmocr-status.log") or "no output")

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


def last_line(path: Path) -> str | None:
    """The last non-empty line of a log file (None when it has none)."""
    try:
        with open(path, "rb") as handle:
            handle.seek(max(0, handle.seek(0, os.SEEK_END) - 4096))
            lines = [line.strip() for line in handle.read().decode(errors="replace").splitlines() if line.strip()]
    except OSError:
        return None
    return lines[-1] if lines else None


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
        # fail now, not in a restart loop, when the key file is unreadable or vLLM would be exposed without it
        exposure = exposure_note(settings, read_api_key(settings))
        slots = settings.server_slots()
        # A taken port is a definite answer: said at once, before anything is written to the run dir.
        fix_server = "stop that program or choose another port with --port (OLMOCR_PORT)"
        problems = (port_problem(settings.host, slot.port, "the vLLM server" if len(slots) == 1 else f"vLLM server {i}",
                                 fix_server) for i, slot in enumerate(slots))
        if (problem := next((p for p in problems if p), None) or status_port_problem(slots)) is not None:
            log.error("%s", problem)
            return 2
        # A vLLM that cannot serve olmOCR is refused here, in one line, not in supervisord's retry loop;
        # the answer is cached where the wrapper looks for it (supervisord.conf: <run>/vllm-version.json).
        version = vllm_version_or_refuse(settings.vllm_bin, Path(args.run_dir).resolve() / "run" / "vllm-version.json",
                                         warn=False)
        plan_vllm_flags(settings, version)  # a setting the release cannot honour stops here too
    except (SettingsError, ValueError) as exc:
        log.error("%s", exc)
        return 2
    if exposure:
        log.warning("%s", exposure)
    manager = Manager(settings, Path(args.run_dir).resolve(), args.status_interval, args.startsecs, slots=slots)
    signal.signal(signal.SIGINT, manager.request_stop)
    signal.signal(signal.SIGTERM, manager.request_stop)
    log.info("serving %s as 'olmocr' on %s (health every %g s, at most %d restarts)", settings.model,
             manager.vllm_url, settings.health_interval, settings.max_restart_attempts)
    manager.announce_servers()
    log.info("status service: %s (/metrics, /status, /ws; docs/observability.md)", status_url())
    return manager.run()


if __name__ == "__main__":
    sys.exit(main())
