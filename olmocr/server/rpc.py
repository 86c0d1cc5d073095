"""supervisord RPC extension ``olmocr.*``: restart counts and health records, served over XML-RPC.

supervisord's own XML-RPC has no restart count. This extension runs inside supervisord, subscribes to
its process-state events, counts starts and restarts per program, and keeps the health listener's
latest probe result, so one XML-RPC connection answers the status script. State is written to a JSON
file (atomic replace) on every change and read back at start, so counts survive a supervisord restart.

Load it with::

    [rpcinterface:olmocr]
    supervisor.rpcinterface_factory = olmocr.server.rpc:make_rpcinterface

At load it also expands ``[program:vllm]`` into one process per server of ``OLMOCR_GPUS``
(olmocr/server/expansion.py) and answers ``olmocr.getServers()`` with the box's servers, so the health
listener, the status service and the manager all learn them from the one place that started them.

The state file is ``olmocr-state.json`` beside supervisord's pidfile (``%(here)s`` cannot be used in
rpcinterface sections), or the absolute path given as ``state_file = ...`` there.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any, NoReturn

from supervisor import events
from supervisor.states import ProcessStates, getProcessStateDescription
from supervisor.xmlrpc import Faults, RPCError

from olmocr import envs
from olmocr.server.box_ports import status_port_problem, status_url
from olmocr.server.errors import SettingsError
from olmocr.server.expansion import expand_in_supervisord
from olmocr.server.gpus import ServerSlot, plan_servers, port_range_url
from olmocr.server.settings import PROGRAM_NAME, STATUS_PROGRAM, ServerSettings

API_VERSION = "1.0"

# Transitions into STARTING that supervisord makes on its own after a crash: these are restarts.
_AUTOMATIC_RESTART_FROM = {ProcessStates.EXITED, ProcessStates.BACKOFF}
#: How much history the status page shows: failure reasons, health decisions, probe latencies.
RECENT_FAILURES, RECENT_DECISIONS, PROBE_HISTORY = 10, 10, 90


def new_process_stats() -> dict[str, Any]:
    return {
        "starts": 0,
        "restarts": 0,
        "consecutive_restarts": 0,
        "last_start_time": None,
        "last_exit_time": None,
        "last_exit_status": None,
        "last_exit_expected": None,
        "last_exit_description": None,
        "health": None,
        "last_healthy_time": None,
        "last_failure_reason": None,
        "last_failure_time": None,
        "kills": 0,
        "kills_by_reason": {},  # kill_category -> count (Prometheus label values)
        "last_kill_time": None,
        "last_kill_reason": None,
        "gave_up": False,
        "gave_up_reason": None,
        "last_exit_signal": None,  # e.g. "SIGKILL" when the process was killed by a signal
        "recent_failures": [],  # [{time, reason}], oldest first, at most RECENT_FAILURES
        "recent_decisions": [],  # [{time, decision, reason}]: the health check's decisions
        "probe_history": [],  # [[time, latency_ms, ok]], at most PROBE_HISTORY
    }


def _append(ring: list, entry: Any, limit: int) -> None:
    ring.append(entry)
    del ring[:-limit]


class ProcessStatsStore:
    """Counts process-state transitions and keeps health records; persists to a JSON file."""

    def __init__(self, state_file: str | None, clock: Callable[[], float] = time.time,
                 reset_after: float = envs.default("OLMOCR_RESTART_RESET_AFTER")) -> None:
        self.state_file = state_file
        self.reset_after = reset_after
        self.clock = clock
        self.processes: dict[str, dict[str, Any]] = {}
        self._load()

    def peek(self, name: str) -> dict[str, Any]:
        """The stats of ``name`` without creating a record (a name never seen reads as fresh counts)."""
        return self.processes.get(name) or new_process_stats()

    def stats(self, name: str) -> dict[str, Any]:
        if name not in self.processes:
            self.processes[name] = new_process_stats()
        return self.processes[name]

    def on_state_change(self, name: str, from_state: int, to_state: int,
                        exitstatus: int | None = None, expected: bool | None = None,
                        description: str | None = None, signal_name: str | None = None) -> None:
        stats = self.stats(name)
        now = self.clock()
        if to_state == ProcessStates.STARTING:
            previous_start = stats["last_start_time"]
            stats["starts"] += 1
            stats["last_start_time"] = now
            if from_state in _AUTOMATIC_RESTART_FROM:
                stats["restarts"] += 1
                previous_run = (stats["last_exit_time"] or now) - (previous_start or now)
                if previous_run >= self.reset_after:
                    stats["consecutive_restarts"] = 1  # it ran fine for a long time: a new incident
                else:
                    stats["consecutive_restarts"] += 1
            else:
                # An operator's start (or supervisord's first start) begins a fresh restart budget.
                stats["consecutive_restarts"] = 0
                stats["gave_up"] = False
                stats["gave_up_reason"] = None
            stats["health"] = None
        elif to_state in (ProcessStates.EXITED, ProcessStates.BACKOFF, ProcessStates.STOPPED):
            stats["last_exit_time"] = now
            stats["last_exit_status"] = exitstatus
            stats["last_exit_expected"] = expected
            stats["last_exit_description"] = description
            stats["last_exit_signal"] = signal_name
            if to_state != ProcessStates.STOPPED:
                state = getProcessStateDescription(to_state)
                reason = f"process exited ({state}, exit status {exitstatus})"
                if signal_name:
                    reason = f"process exited ({state}: killed by {signal_name})"
                elif description:
                    reason = f"process exited ({state}: {description})"
                killed_at = stats["last_kill_time"]
                if killed_at and killed_at >= (stats["last_start_time"] or 0):
                    recent = stats["recent_failures"]
                    if recent and recent[-1]["reason"] == stats["last_kill_reason"]:
                        recent.pop()  # the kill's own entry: this one says the same, and how it ended
                    reason = f"killed by the health check: {stats['last_kill_reason']}"
                    if signal_name:
                        reason += f" ({signal_name})"
                self._failure(stats, reason, now)
                self._decision(stats, now, "exited", reason)
        elif to_state == ProcessStates.FATAL:
            self._failure(stats, "supervisord gave up starting the process (FATAL: exited too quickly "
                                 "startretries times; see `supervisorctl tail vllm`)", now)
        self._save()

    def record_probe(self, name: str, record: dict[str, Any]) -> None:
        stats = self.stats(name)
        previous = stats["health"] or {}
        when = record.get("time") or self.clock()
        if record.get("latency_ms") is not None:
            _append(stats["probe_history"], [when, record["latency_ms"], bool(record.get("ok"))], PROBE_HISTORY)
        phase = record.get("phase")
        if record.get("failed_probe") and phase == "starting":
            pass  # the port is still closed while the model loads: waiting, not a decision
        elif record.get("failed_probe") and phase != "unhealthy":
            failures = record.get("consecutive_failures")
            self._decision(stats, when, f"probe failed{f' ({failures} in a row)' if failures else ''}",
                           record.get("reason"))
        elif phase and phase != previous.get("phase") and phase not in ("exited", "backoff", "stopped", "fatal"):
            self._decision(stats, when, phase, None if phase == "healthy" else record.get("reason"))
        stats["health"] = dict(record)
        if record.get("healthy"):
            stats["last_healthy_time"] = record.get("time")
        elif record.get("failed_probe") and record.get("phase") != "starting":
            self._failure(stats, record.get("reason", "probe failed"), record.get("time") or self.clock())
        self._save()

    def record_kill(self, name: str, reason: str, kind: str = "") -> None:
        stats = self.stats(name)
        now = self.clock()
        stats["kills"] += 1
        from olmocr.server.health import kill_category  # here: supervisord need not import it at start

        category = kind or kill_category(reason)  # an older listener sends the text only
        stats["kills_by_reason"][category] = stats["kills_by_reason"].get(category, 0) + 1
        stats["last_kill_time"] = now
        stats["last_kill_reason"] = reason
        self._failure(stats, reason, now)
        self._decision(stats, now, "kill", reason)
        self._save()

    def record_give_up(self, name: str, reason: str) -> None:
        stats = self.stats(name)
        stats["gave_up"] = True
        stats["gave_up_reason"] = reason
        self._failure(stats, reason, self.clock())
        self._decision(stats, self.clock(), "gave up", reason)
        self._save()

    @staticmethod
    def _failure(stats: dict[str, Any], reason: str, when: float) -> None:
        stats["last_failure_reason"] = reason
        stats["last_failure_time"] = when
        recent = stats["recent_failures"]
        if not (recent and recent[-1]["reason"] == reason and when - recent[-1]["time"] < 60):
            _append(recent, {"time": when, "reason": reason}, RECENT_FAILURES)  # not twice for one event

    @staticmethod
    def _decision(stats: dict[str, Any], when: float, decision: str, reason: str | None) -> None:
        entry = {"time": when, "decision": decision}
        if reason:
            entry["reason"] = reason
        _append(stats["recent_decisions"], entry, RECENT_DECISIONS)

    def _load(self) -> None:
        if not self.state_file or not os.path.exists(self.state_file):
            return
        try:
            with open(self.state_file, encoding="utf-8") as handle:
                data = json.load(handle)
            for name, saved in data.get("processes", {}).items():
                merged = new_process_stats()
                merged.update({k: v for k, v in saved.items() if v is not None or merged.get(k) is None})
                if "kills_by_reason" not in saved and merged["kills"]:
                    merged["kills_by_reason"] = {"other": merged["kills"]}  # a file from before the split
                self.processes[name] = merged
        except (OSError, ValueError):
            # A damaged state file must not stop supervisord from starting; counts restart at zero.
            self.processes = {}

    def _save(self) -> None:
        if not self.state_file:
            return
        directory = os.path.dirname(os.path.abspath(self.state_file))
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".olmocr-state.")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump({"version": 1, "processes": self.processes}, handle)
            os.replace(tmp, self.state_file)
        except OSError:
            try:
                os.unlink(tmp)
            except OSError:
                pass


class OlmocrNamespaceRPCInterface:
    """Methods served as ``olmocr.<name>`` on supervisord's XML-RPC endpoint."""

    def __init__(self, supervisord: Any, store: ProcessStatsStore,
                 slots: list[ServerSlot] | None = None) -> None:
        self.supervisord = supervisord
        self.store = store
        self.slots = slots or plan_servers((), 1, ServerSettings.port)

    def getServers(self) -> list[dict[str, Any]]:
        """The box's vLLM servers, in order: process name, XML-RPC name, port, URL and GPUs."""
        try:
            host = ServerSettings.from_env().client_host
        except SettingsError:
            host = "127.0.0.1"
        return [{"index": s.index, "name": s.name, "rpc_name": s.rpc_name, "port": s.port,
                 "url": s.url(host), "gpus": list(s.gpus)} for s in self.slots]

    def getAPIVersion(self) -> str:
        return API_VERSION

    def _check_name(self, name: str) -> None:
        """A name supervisord does not run is a ``BAD_NAME`` fault, as ``supervisor.getProcessInfo`` answers;
        a read never creates (and persists) a record for it."""
        groups = getattr(self.supervisord, "process_groups", None)
        if groups is None:
            return
        known = {pname for group in groups.values() for pname in group.processes} | set(groups)
        if name not in known and name not in self.store.processes:
            raise RPCError(Faults.BAD_NAME, name)

    def getProcessStats(self, name: str) -> dict[str, Any]:
        """Restart counts, last exit, last health probe and failure reason of program ``name``."""
        self._check_name(name)
        return _xmlrpc_safe(self.store.peek(name))

    def getAllProcessStats(self) -> dict[str, Any]:
        return {name: _xmlrpc_safe(stats) for name, stats in self.store.processes.items()}

    def getSettings(self) -> dict[str, Any]:
        """The deployment settings supervisord's environment gives its programs (model, port...)."""
        try:
            settings = ServerSettings.from_env()
        except SettingsError as exc:
            raise RPCError(Faults.FAILED, str(exc)) from None
        try:
            status = status_url()
        except SettingsError:
            status = None
        return _xmlrpc_safe({"model": settings.model, "port": settings.port, "host": settings.host,
                             "base_url": settings.base_url,
                             "vllm_url": port_range_url(settings.client_host, self.slots),
                             "status_url": status,
                             "max_restart_attempts": settings.max_restart_attempts,
                             "health_interval": settings.health_interval})

    def recordProbe(self, name: str, record: dict[str, Any]) -> bool:
        """Called by the health listener after each probe."""
        self._check_name(name)
        self.store.record_probe(name, record)
        return True

    def recordKill(self, name: str, reason: str, kind: str = "") -> bool:
        """Called by the health listener when it kills an unhealthy server; ``kind`` is the KillKind."""
        self._check_name(name)
        self.store.record_kill(name, reason, kind)
        return True

    def recordGiveUp(self, name: str, reason: str) -> bool:
        """Called by the health listener when it leaves a crash-looping server stopped."""
        self._check_name(name)
        self.store.record_give_up(name, reason)
        return True


def _xmlrpc_safe(value: Any) -> Any:
    """XML-RPC has no None and only 32-bit ints: drop None, send big numbers as floats."""
    if isinstance(value, dict):
        return {k: _xmlrpc_safe(v) for k, v in value.items() if v is not None}
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and abs(value) > 2**31 - 1:
        return float(value)
    return value


_stores: dict[str, tuple[ProcessStatsStore, Callable[[Any], None]]] = {}


def make_rpcinterface(supervisord: Any, **config: str) -> OlmocrNamespaceRPCInterface:
    """supervisord's factory hook, called once per HTTP server (unix socket, TCP) and again on every
    ``supervisorctl reload``: all of them must share one store and one event subscription."""
    state_file = config.get("state_file") or os.path.join(
        os.path.dirname(os.path.abspath(supervisord.options.pidfile)), "olmocr-state.json")
    if state_file not in _stores:
        try:
            reset_after = ServerSettings.from_env().restart_reset_after
        except SettingsError:
            reset_after = ServerSettings.restart_reset_after
        store = ProcessStatsStore(state_file, reset_after=reset_after)
        _stores[state_file] = (store, _recorder(store, supervisord))
    store, recorder = _stores[state_file]
    slots = _expand_servers(supervisord)
    # A reload clears supervisord's subscriptions (events.clear()) before calling the factories again.
    if (events.ProcessStateEvent, recorder) not in events.callbacks:
        events.subscribe(events.ProcessStateEvent, recorder)
    return OlmocrNamespaceRPCInterface(supervisord, store, slots)


def _refuse(supervisord: Any, problem: str) -> NoReturn:
    """Stop supervisord before it daemonizes or starts any program: ``Error: olmocr: <line>`` on stderr and in
    its log, exit 2. Not by raising: supervisord turns any exception from a factory into a traceback in its log
    and "Could not make olmocr rpc interface" on the console, which hides the line."""
    line = f"olmocr: {problem}"
    supervisord.options.logger.critical(line)
    sys.stderr.write(f"Error: {line}\n")
    sys.stderr.flush()
    os._exit(2)


def _expand_servers(supervisord: Any) -> list[ServerSlot]:
    """One process per server of OLMOCR_GPUS, before supervisord starts any (olmocr/server/expansion.py).

    Settings the box cannot serve (``OLMOCR_GPUS=4`` with fewer GPUs, a status port inside the servers'
    range or taken) refuse the start in one line, as the foreground manager does: supervisord exits 2
    before it starts anything, rather than serving something else than was asked."""
    logger = supervisord.options.logger
    try:
        slots = ServerSettings.from_env().server_slots()
        if getattr(supervisord.options, "first", True) and _runs_status_service(supervisord):
            # Only on the first start: after a reload (SIGHUP) the stopped status service may still be
            # releasing its port, and supervisord's restart loop reports a later failure (FATAL).
            if (problem := status_port_problem(slots)) is not None:
                _refuse(supervisord, problem)
    except SettingsError as exc:
        _refuse(supervisord, str(exc))
    if not any(getattr(g, "name", None) == PROGRAM_NAME for g in supervisord.options.process_group_configs):
        return slots  # no [program:vllm] here (an include for another layout): nothing to expand
    try:
        if expand_in_supervisord(supervisord, slots):
            logger.info("olmocr: " + ", ".join(f"{s.rpc_name} on port {s.port}"
                                               + (f" (GPU {','.join(s.gpus)})" if s.gpus else "")
                                               for s in slots))
    except ValueError as exc:
        logger.error(f"olmocr: {exc}")
    return slots


def _runs_status_service(supervisord: Any) -> bool:
    return any(getattr(g, "name", None) == STATUS_PROGRAM for g in supervisord.options.process_group_configs)


#: The wait status of the process supervisord reaped last (None once an event has used it).
_last_wait_status: list[int | None] = [None]


def _record_wait_statuses() -> None:
    """Keep the raw wait status of each reaped process, to name the signal that killed it.

    supervisord decodes it in ``Subprocess.finish`` (``decode_wait_status``: exit status -1 and the
    message "terminated by SIGKILL", which it only logs) and then, in the same call, fires the EXITED or
    BACKOFF event; neither the event nor ``getProcessInfo`` carries the signal. Wrapping the function
    ``supervisor.process`` calls is the one place that sees it; supervisord is single-threaded, so the
    status read by the event handler is the one of the process the event is about.
    """
    import supervisor.process

    original = supervisor.process.decode_wait_status
    if getattr(original, "olmocr_recording", False):
        return

    def recording(sts: int) -> Any:
        _last_wait_status[0] = sts
        return original(sts)

    recording.olmocr_recording = True  # type: ignore[attr-defined]
    supervisor.process.decode_wait_status = recording


def signal_name(wait_status: int | None) -> str | None:
    """``"SIGKILL"`` for the wait status of a process killed by SIGKILL; None if it exited by itself."""
    if wait_status is None or not os.WIFSIGNALED(wait_status):
        return None
    number = os.WTERMSIG(wait_status)
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _recorder(store: ProcessStatsStore, supervisord: Any) -> Callable[[Any], None]:
    _record_wait_statuses()

    def on_event(event: Any) -> None:
        process = event.process
        to_state = process.state
        description = None
        if to_state in (ProcessStates.BACKOFF, ProcessStates.FATAL) or (
            to_state == ProcessStates.EXITED and not event.expected
        ):
            description = process.spawnerr or None
        killed_by = None
        if to_state in (ProcessStates.EXITED, ProcessStates.BACKOFF, ProcessStates.STOPPED):
            killed_by = signal_name(_last_wait_status[0])
            _last_wait_status[0] = None
        try:
            store.on_state_change(process.config.name, event.from_state, to_state,
                                  exitstatus=process.exitstatus,
                                  expected=bool(event.expected), description=description,
                                  signal_name=killed_by)
        except Exception as exc:  # never break supervisord's event dispatch
            supervisord.options.logger.warn(f"olmocr rpc extension: cannot record event: {exc!r}")

    return on_event
