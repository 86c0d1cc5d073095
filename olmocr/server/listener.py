"""supervisord event listener that probes the vLLM server and kills it when it is unhealthy.

supervisord, not this listener, restarts the server (``autorestart=true``): the listener only kills the
whole process group of an unhealthy server, records every probe in the ``olmocr`` RPC extension, cleans
up engine processes orphaned by a crash, and leaves a crash-looping server stopped after
``max_restart_attempts`` restarts in a row (runs shorter than ``restart_reset_after``).

One listener watches every server of the box (``olmocr.getServers()``: one per GPU, see
olmocr/server/expansion.py). Each server has its own ``HealthListener`` state: its own probes, failure
count, startup grace, kill and crash-loop budget, so a hang on one GPU kills and restarts that server
alone, and giving up is decided per server. ``BoxListener`` speaks the event protocol and hands each
event to all of them (each acts only on its own process's events).

Protocol discipline: stdout carries only the event protocol (anything else puts the listener in
UNKNOWN forever), so logs go to stderr. Probes run in a worker thread, so every event is answered at
once and a slow probe never stalls supervisord's event queue; results are acted on at the next event
(TICK_5 guarantees one at least every ~5 s).
"""

from __future__ import annotations

import argparse
import logging
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import IO, Any

from supervisor import childutils

from olmocr import __version__
from olmocr.server import health
from olmocr.server.errors import SettingsError
from olmocr.server.health import ProbeResult
from olmocr.server.health_probe import ServerProbe
from olmocr.server.settings import PROGRAM_NAME, ServerSettings, read_api_key

log = logging.getLogger(__name__)

ACTIVE_STATES = {"STARTING", "RUNNING"}
TICK_SECONDS = 5.0  # the listener subscribes to TICK_5 (see supervisord.conf)
#: While the model loads (minutes on a GPU) every probe finds the port closed. That is normal inside the
#: startup grace: say so at INFO once, then at most this often, instead of a WARNING every probe.
STARTUP_LOG_INTERVAL = 60.0


def probe_start_slack(health_interval: float) -> float:
    """How early a probe may start. We only wake on supervisord's events (TICK_5 at the least), which
    arrive a little early or late: without slack a 10 s interval whose tick lands at 9.99 s would wait
    for the next tick, probing every 15 s and stretching hang detection by half."""
    return min(TICK_SECONDS / 2, health_interval / 2)


def parse_fields(line: str) -> dict[str, str]:
    """``key:value key:value`` (the event header and process-state payload format)."""
    return dict(token.split(":", 1) for token in line.split() if ":" in token)


def thread_executor(fn: Callable[[], None]) -> None:
    threading.Thread(target=fn, name="olmocr-probe", daemon=True).start()


def kill_process_group(pgid: int, sig: int) -> bool:
    """Signal a process group; False if it no longer exists."""
    try:
        os.killpg(pgid, sig)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        log.error("not allowed to signal process group %s (is the listener running as another user?)", pgid)
        return False


class HealthListener:
    """Drive with ``run()``; tests inject stdin/stdout/rpc/probe/clock and call it line by line."""

    def __init__(self, stdin: IO[str], stdout: IO[str], rpc: Any, settings: ServerSettings,
                 probe: Callable[[], ProbeResult], *, program: str = PROGRAM_NAME, rpc_name: str | None = None,
                 clock: Callable[[], float] = time.monotonic, wall_clock: Callable[[], float] = time.time,
                 executor: Callable[[Callable[[], None]], None] = thread_executor,
                 signal_group: Callable[[int, int], bool] = kill_process_group) -> None:
        self.stdin = stdin
        self.stdout = stdout
        self.rpc = rpc
        self.settings = settings
        self.probe = probe
        self.program = program  # the process name: in events and in the olmocr extension's records
        self.rpc_name = rpc_name or program  # supervisord's XML-RPC name ("vllm" or "vllm:vllm-0")
        self.clock = clock
        self.wall_clock = wall_clock
        self.executor = executor
        self.signal_group = signal_group
        self.policy = health.HealthPolicy(settings.failure_threshold, settings.success_threshold,
                                          settings.startup_timeout)
        self.process_state: str | None = None  # supervisord's statename, once known
        self.pid: int | None = None
        self.state = health.process_started(clock())
        self.next_probe_at = 0.0
        self.probe_in_flight = False
        self.results: queue.Queue[ProbeResult] = queue.Queue()
        self.pending_kill: tuple[int, float] | None = None  # (pgid, SIGKILL deadline)
        self.startup_logged_at: float | None = None  # last "still loading" line for this process

    # -- protocol ---------------------------------------------------------------------------------
    def run(self, max_events: int | None = None) -> None:
        run_protocol(self.stdin, self.stdout, self.handle, max_events)

    def handle(self, event_name: str, payload: str) -> None:
        if event_name.startswith("PROCESS_STATE_"):
            fields = parse_fields(payload.split("\n", 1)[0])
            if fields.get("processname") == self.program:
                self.on_process_state(event_name[len("PROCESS_STATE_"):], fields)
        if self.process_state is None:
            self.sync_from_supervisor()
        self.poll()

    # -- process state ----------------------------------------------------------------------------
    def on_process_state(self, statename: str, fields: dict[str, str]) -> None:
        previous_pid = self.pid
        self.process_state = statename
        if statename == "STARTING":
            self.pid = None
            self.pending_kill = None
            self.state = health.process_started(self.clock())
            self.startup_logged_at = None
            self.next_probe_at = self.clock()
            if fields.get("from_state") in ("EXITED", "BACKOFF"):
                self.enforce_restart_limit()
        elif statename == "RUNNING":
            self.pid = int(fields["pid"]) if fields.get("pid") else self.pid
        elif statename in ("EXITED", "BACKOFF", "STOPPED", "FATAL"):
            dead_pid = int(fields["pid"]) if fields.get("pid") else previous_pid
            if dead_pid:
                # supervisord only signals the group on its own stops; after a crash the engine
                # children are orphaned and keep GPU memory and the port (supervisor #1101).
                if self.signal_group(dead_pid, signal.SIGKILL):
                    log.warning("killed processes left behind by %s (process group %s)",
                                self.program, dead_pid)
            self.pid = None
            self.record({"phase": statename.lower(), "ok": False, "healthy": False,
                         "reason": f"process {statename}"}, failure=False)

    def sync_from_supervisor(self) -> None:
        """Learn the process state when we (re)start after the server: we missed its events."""
        info = self.rpc.supervisor.getProcessInfo(self.rpc_name)
        self.process_state = info["statename"]
        self.pid = info["pid"] or None
        running_for = max(0, info["now"] - info["start"]) if info["start"] else 0
        self.state = health.process_started(self.clock() - running_for)

    def enforce_restart_limit(self) -> None:
        stats = self.rpc.olmocr.getProcessStats(self.program)
        restarts = stats.get("consecutive_restarts", 0)
        limit = self.settings.max_restart_attempts
        if restarts <= limit:
            log.info("%s restart %d of at most %d in a row", self.program, restarts, limit)
            return
        reason = (f"crash loop: restarted {limit} times in a row, each run shorter than "
                  f"{self.settings.restart_reset_after:g} s (max restart attempts {limit}); left stopped. "
                  "Read the server log "
                  f"(supervisorctl tail {self.rpc_name}), fix the cause, then `supervisorctl start {self.rpc_name}`")
        log.error(reason)
        self.rpc.supervisor.stopProcess(self.rpc_name, False)
        self.rpc.olmocr.recordGiveUp(self.program, reason)

    # -- probing ----------------------------------------------------------------------------------
    def poll(self) -> None:
        # Results first: a probe that just finished frees the slot for the next one on this same
        # event instead of one tick later (that tick would add up to 5 s per failed probe).
        self._drain_results()
        now = self.clock()
        if (self.process_state in ACTIVE_STATES and not self.probe_in_flight and self.pending_kill is None
                and now + probe_start_slack(self.settings.health_interval) >= self.next_probe_at):
            self.probe_in_flight = True
            self.next_probe_at = now + self.settings.health_interval
            self.executor(self._run_probe)
        self._drain_results()  # a probe that already finished (an executor that runs it inline)
        self._escalate_kill()

    def _run_probe(self) -> None:
        try:
            result = self.probe()
            if result.ok and isinstance(self.probe, ServerProbe) and (stranger := self._stranger_on_port()):
                # Another program answers on the port (ours failed to bind it): it is not our server, so its
                # answers say nothing about ours -- as if nothing listened yet (no kill, no "healthy").
                result = ProbeResult(False, stranger, result.latency, refused=True)
        except Exception as exc:  # a bug in the probe is a failed probe, not a dead listener
            result = ProbeResult(False, f"probe error: {type(exc).__name__}: {exc}", 0.0)
        self.results.put(result)

    def _stranger_on_port(self) -> str | None:
        """A one-line reason when the process listening on the server's port was not started by our
        supervisord (the listener's parent) -- so not the supervised server; None when it is ours or this
        user cannot tell. Only for the real probe: a test's stand-in probe never touches the port."""
        import psutil

        from olmocr.port_owner import describe_pid, listening_pids

        supervisord = os.getppid()
        pids = listening_pids(self.settings.port)
        if not pids:
            return None
        for pid in pids:
            try:
                if supervisord in {p.pid for p in psutil.Process(pid).parents()}:
                    return None
            except psutil.Error:
                return None  # it just exited: no verdict
        owner = ", ".join(describe_pid(pid) for pid in sorted(pids))
        return (f"port {self.settings.port} is held by {owner}, not by {self.program}: stop that program or "
                f"give {self.program} another port (OLMOCR_PORT)")

    def _drain_results(self) -> None:
        while True:
            try:
                result = self.results.get_nowait()
            except queue.Empty:
                return
            self.probe_in_flight = False
            if self.process_state not in ACTIVE_STATES:
                continue  # the probed process is gone; its result says nothing about the next one
            was = self.state.phase
            decision = health.apply_probe(self.state, result, self.policy, self.clock())
            self.state = decision.state
            self._log_recovery(was, self.state.phase)
            if decision.loading:
                self._log_still_loading()
            self.record({"phase": self.state.phase, "ok": result.ok, "healthy": self.state.phase == health.HEALTHY,
                         "reason": self.state.reason, "latency_ms": round(result.latency * 1000, 1),
                         "busy": result.busy, "consecutive_failures": self.state.consecutive_failures},
                        failure=not result.ok, quiet=decision.loading)
            if decision.kill:
                self.kill(decision.kill_reason, decision.kill_kind)

    def kill(self, reason: str, kind: health.KillKind = health.KillKind.OTHER) -> None:
        pid = self.pid or self.rpc.supervisor.getProcessInfo(self.rpc_name)["pid"]
        if not pid:
            return
        log.error("%s is unhealthy: %s; killing process group %s so supervisord restarts it",
                  self.program, reason, pid)
        self.rpc.olmocr.recordKill(self.program, reason, str(kind))
        self.signal_group(pid, signal.SIGTERM)
        self.pending_kill = (pid, self.clock() + self.settings.kill_grace)

    def _escalate_kill(self) -> None:
        if self.pending_kill is None:
            return
        pgid, deadline = self.pending_kill
        if self.clock() < deadline:
            return
        self.pending_kill = None
        if self.signal_group(pgid, signal.SIGKILL):
            log.error("process group %s ignored SIGTERM for %.0f s; sent SIGKILL", pgid, self.settings.kill_grace)

    def _log_still_loading(self) -> None:
        now = self.clock()
        if self.startup_logged_at is not None and now - self.startup_logged_at < STARTUP_LOG_INTERVAL:
            return
        self.startup_logged_at = now
        log.info("%s is starting (port not open yet, normal while the model loads): waited %.0f s of the "
                 "%g s startup timeout", self.program, now - self.state.started_at, self.policy.startup_timeout)

    def _log_recovery(self, was: str, now: str) -> None:
        """Good news at INFO: the first healthy probe, and "healthy again" after failed ones."""
        if now != health.HEALTHY or was == health.HEALTHY:
            return
        again = getattr(self, "_was_healthy", False)
        self._was_healthy = True
        log.info("%s is healthy%s", self.program, " again" if again else "")

    def record(self, record: dict[str, Any], failure: bool, quiet: bool = False) -> None:
        record = {"time": self.wall_clock(), **record, "failed_probe": failure}
        level = logging.WARNING if failure and not quiet else logging.DEBUG
        log.log(level, "probe %s: %s", self.program, describe_probe(record))
        try:
            self.rpc.olmocr.recordProbe(self.program, record)
        except Exception as exc:
            log.warning("could not record probe result in supervisord: %s", exc)


def describe_probe(record: dict[str, Any]) -> str:
    """A probe record as a log line (not a Python repr): ``failed (reason); phase ..., latency ...``."""
    outcome = "ok" if record.get("ok") else f"failed ({record.get('reason') or 'no reason given'})"
    parts = [f"phase {record.get('phase')}", f"latency {record.get('latency_ms')} ms"]
    if record.get("consecutive_failures"):
        parts.append(f"{record['consecutive_failures']} failures in a row")
    if record.get("busy"):
        parts.append("busy")
    return f"{outcome}; " + ", ".join(parts)


def run_protocol(stdin: IO[str], stdout: IO[str], handle: Callable[[str, str], None],
                 max_events: int | None = None) -> None:
    """supervisord's event-listener protocol, spoken with ``supervisor.childutils.listener`` (READY, the
    RESULT answer). Its ``wait`` is not used: it fails on the empty line supervisord's shutdown leaves
    (``get_headers('')`` then ``headers['len']``), where this loop ends quietly."""
    handled = 0
    while max_events is None or handled < max_events:
        childutils.listener.ready(stdout)
        line = stdin.readline()
        if not line:
            return  # supervisord closed our stdin: it is shutting down
        headers = childutils.get_headers(line)
        payload = stdin.read(int(headers.get("len", "0")))
        try:
            handle(headers.get("eventname", ""), payload)
        except Exception:  # survive our own bugs and RPC hiccups; never leave supervisord waiting
            log.exception("error while handling %s", headers.get("eventname"))
        childutils.listener.ok(stdout)
        handled += 1


class BoxListener:
    """The event protocol for every server of the box; each event goes to every server's watcher."""

    def __init__(self, stdin: IO[str], stdout: IO[str], watchers: list[HealthListener]) -> None:
        self.stdin = stdin
        self.stdout = stdout
        self.watchers = watchers

    def handle(self, event_name: str, payload: str) -> None:
        for watcher in self.watchers:
            try:
                watcher.handle(event_name, payload)
            except Exception:  # one server's trouble (an RPC hiccup) must not skip the others
                log.exception("error while handling %s for %s", event_name, watcher.program)

    def run(self, max_events: int | None = None) -> None:
        run_protocol(self.stdin, self.stdout, self.handle, max_events)


def servers_from_supervisor(rpc: Any, program: str, settings: ServerSettings) -> list[dict[str, Any]]:
    """The servers the olmocr extension started; the one configured program if it cannot say."""
    try:
        servers = rpc.olmocr.getServers()
        if servers:
            return servers
    except Exception as exc:  # an extension from before getServers, or a hiccup
        log.warning("could not list the servers from supervisord (%s); watching %s alone", exc, program)
    return [{"name": program, "rpc_name": program, "url": settings.base_url, "gpus": []}]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="olmocr-health-listener", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"olmocr-serve {__version__}")
    parser.add_argument("--program", default=PROGRAM_NAME, help="supervisord program to watch (default vllm)")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    from olmocr.logformat import LOG_FORMAT

    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr, format=LOG_FORMAT)
    try:
        settings = ServerSettings.from_env()
        api_key = read_api_key(settings)
    except SettingsError as exc:
        log.error("%s", exc)
        return 2
    if "SUPERVISOR_SERVER_URL" not in os.environ:
        log.error("run me as a supervisord [eventlistener:...] (SUPERVISOR_SERVER_URL is not set)")
        return 2
    from olmocr.server.rpcclient import connect_from_child_env

    watchers = []
    for server in servers_from_supervisor(connect_from_child_env(os.environ, timeout=10.0), args.program,
                                          settings):
        # One XML-RPC connection per server: probes of different servers finish in different threads.
        rpc = connect_from_child_env(os.environ, timeout=10.0)
        probe = ServerProbe(server["url"], api_key=api_key, health_timeout=settings.health_timeout,
                            completion_timeout=settings.completion_timeout)
        log.info("watching %s at %s%s every %g s (failure threshold %d, startup timeout %g s)",
                 server["rpc_name"], server["url"],
                 f" (GPU {','.join(server['gpus'])})" if server.get("gpus") else "", settings.health_interval,
                 settings.failure_threshold, settings.startup_timeout)
        watchers.append(HealthListener(sys.stdin, sys.stdout, rpc, settings, probe, program=server["name"],
                                       rpc_name=server["rpc_name"]))
    BoxListener(sys.stdin, sys.stdout, watchers).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
