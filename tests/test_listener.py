"""The health listener driven line by line, as superlance tests its plugins: injected stdin/stdout,
an in-memory RPC proxy, a scripted probe, a manual clock and a recording signaller."""

from __future__ import annotations

import io
import logging
import signal
from collections import deque
from collections.abc import Callable

from olmocr.server.health import ProbeResult
from olmocr.server.listener import HealthListener
from olmocr.server.settings import ServerSettings

OK = ProbeResult(True, "ok", 0.01)
HUNG = ProbeResult(False, "completion probe timed out after 20 s (engine hung?)", 20.0)
REFUSED = ProbeResult(False, "connection refused (server not listening)", 0.0, refused=True)


class Namespace:
    def __init__(self, calls: list, prefix: str, answers: dict) -> None:
        self._calls, self._prefix, self._answers = calls, prefix, answers

    def __getattr__(self, name: str):
        def call(*args):
            self._calls.append((f"{self._prefix}.{name}", args))
            answer = self._answers.get(name)
            return answer(*args) if callable(answer) else answer
        return call


class FakeSupervisorRPC:
    def __init__(self) -> None:
        self.calls: list = []
        self.stats = {"consecutive_restarts": 0}
        self.info = {"statename": "RUNNING", "pid": 4242, "start": 100, "now": 130}
        self.supervisor = Namespace(self.calls, "supervisor",
                                    {"getProcessInfo": lambda name: self.info, "stopProcess": True})
        self.olmocr = Namespace(self.calls, "olmocr", {"getProcessStats": lambda name: self.stats,
                                                       "recordProbe": True, "recordKill": True,
                                                       "recordGiveUp": True})

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]


def event(name: str, payload: str = "", serial: int = 1) -> str:
    return (f"ver:3.0 server:supervisor serial:{serial} pool:vllm-health poolserial:{serial} "
            f"eventname:{name} len:{len(payload)}\n{payload}")


def state_event(state: str, from_state: str, **extra: object) -> str:
    payload = f"processname:vllm groupname:vllm from_state:{from_state}"
    payload += "".join(f" {k}:{v}" for k, v in extra.items())
    return event(f"PROCESS_STATE_{state}", payload)


class Harness:
    def __init__(self, probes: list[ProbeResult], **settings: object) -> None:
        self.now = 0.0
        self.rpc = FakeSupervisorRPC()
        self.probes = deque(probes)
        self.signals: list[tuple[int, int]] = []
        self.stdout = io.StringIO()
        base = {"health_interval": 10, "failure_threshold": 3, "startup_timeout": 600, "kill_grace": 15,
                "max_restart_attempts": 2}
        base.update(settings)
        self.settings = ServerSettings(**base)
        self.executor: Callable[[Callable[[], None]], None] = lambda fn: fn()  # probes answer at once

    def run(self, *events: str) -> None:
        listener = self.listener
        listener.stdin = io.StringIO("".join(events))
        listener.run()

    @property
    def listener(self) -> HealthListener:
        if not hasattr(self, "_listener"):
            self._listener = HealthListener(
                io.StringIO(), self.stdout, self.rpc, self.settings, probe=self.probes.popleft,
                clock=lambda: self.now, wall_clock=lambda: 1_700_000_000 + self.now,
                executor=self.executor, signal_group=self.signal)
        return self._listener

    def signal(self, pgid: int, sig: int) -> bool:
        self.signals.append((pgid, sig))
        return True

    def tick(self, seconds: float, count: int = 1) -> None:
        for _ in range(count):
            self.now += seconds
            self.run(event("TICK_5", "when:0"))


def test_protocol_answers_every_event_and_writes_nothing_else():
    h = Harness([OK, OK])
    h.run(state_event("STARTING", "STOPPED", tries=0), state_event("RUNNING", "STARTING", pid=4242),
          event("TICK_5", "when:1"))
    assert h.stdout.getvalue() == "READY\n" + "RESULT 2\nOKREADY\n" * 3


def test_healthy_probe_is_recorded():
    h = Harness([OK])
    h.run(state_event("STARTING", "STOPPED", tries=0))
    records = [args[1] for name, args in h.rpc.calls if name == "olmocr.recordProbe"]
    assert records[-1]["healthy"] and records[-1]["phase"] == "healthy"
    assert records[-1]["latency_ms"] == 10.0


def test_hung_server_is_killed_as_a_group_after_three_failures_then_sigkilled():
    h = Harness([OK, HUNG, HUNG, HUNG])
    h.run(state_event("STARTING", "STOPPED", tries=0), state_event("RUNNING", "STARTING", pid=4242))
    h.tick(10)
    h.tick(10)
    assert h.signals == []  # two failures: slow, not dead
    h.tick(10)
    assert h.signals == [(4242, signal.SIGTERM)]
    assert "olmocr.recordKill" in h.rpc.names()
    h.tick(5, count=2)  # no further probes while the kill is pending
    h.tick(10)
    assert h.signals[-1] == (4242, signal.SIGKILL)  # it ignored SIGTERM past the grace period
    assert "supervisor.startProcess" not in h.rpc.names()  # supervisord restarts it, never the listener


def test_exit_after_kill_clears_pending_kill_and_reaps_orphans():
    h = Harness([OK, HUNG, HUNG, HUNG, REFUSED])
    h.run(state_event("STARTING", "STOPPED", tries=0), state_event("RUNNING", "STARTING", pid=4242))
    h.tick(10, count=3)
    h.run(state_event("EXITED", "RUNNING", expected=1, pid=4242), state_event("STARTING", "EXITED", tries=0))
    assert h.signals[-1] == (4242, signal.SIGKILL)  # engine processes orphaned by the exit
    h.tick(20)
    assert h.signals.count((4242, signal.SIGKILL)) == 1  # the kill is not repeated for the new process


def test_loading_server_is_not_failed_within_startup_timeout():
    h = Harness([REFUSED] * 10, startup_timeout=600)
    h.run(state_event("STARTING", "STOPPED", tries=0))
    h.tick(10, count=5)
    assert h.signals == []
    assert h.listener.state.phase == "starting"


def test_waiting_for_a_loading_server_is_logged_at_info_once_a_minute_not_warned(caplog, monkeypatch):
    caplog.set_level(logging.DEBUG, logger="olmocr.server.listener")
    # The listener's records straight to caplog, whatever a pipeline run earlier in this process (test_fleet,
    # test_upstream_flags) did to the propagation and handlers of olmocr.server.
    listener_log = logging.getLogger("olmocr.server.listener")
    monkeypatch.setattr(listener_log, "propagate", False)
    monkeypatch.setattr(listener_log, "handlers", [caplog.handler])
    h = Harness([REFUSED] * 13 + [HUNG], startup_timeout=600)
    h.run(state_event("STARTING", "STOPPED", tries=0))
    h.tick(10, count=12)  # two minutes of loading, a probe every 10 s
    waiting = [r for r in caplog.records if "is starting" in r.getMessage()]
    assert [r.levelno for r in waiting] == [logging.INFO] * 3  # at 0 s, 60 s and 120 s
    assert "waited 60 s of the 600 s startup timeout" in waiting[1].getMessage()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    h.run(state_event("RUNNING", "STARTING", pid=4242))
    h.tick(10)  # a real failure (it never became healthy, but the port is open) is still a warning
    assert [r for r in caplog.records if r.levelno == logging.WARNING and "timed out" in r.getMessage()]


def test_crash_loop_is_stopped_after_max_restart_attempts():
    h = Harness([REFUSED] * 10, max_restart_attempts=2)
    h.rpc.stats = {"consecutive_restarts": 2}
    h.run(state_event("STARTING", "EXITED", tries=0))
    assert "supervisor.stopProcess" not in h.rpc.names()
    h.rpc.stats = {"consecutive_restarts": 3}
    h.run(state_event("STARTING", "EXITED", tries=0))
    assert ("supervisor.stopProcess", ("vllm", False)) in h.rpc.calls
    reason = [args[1] for name, args in h.rpc.calls if name == "olmocr.recordGiveUp"][0]
    assert "crash loop" in reason and "supervisorctl start vllm" in reason


def test_listener_started_after_the_server_learns_its_state_from_supervisord():
    h = Harness([OK])
    h.run(event("TICK_5", "when:1"))
    assert h.rpc.names()[0] == "supervisor.getProcessInfo"
    assert h.listener.pid == 4242 and h.listener.state.phase == "healthy"


def test_other_programs_events_are_ignored_and_errors_survived():
    h = Harness([OK])
    h.run(event("PROCESS_STATE_EXITED", "processname:other groupname:other from_state:RUNNING expected:0 pid:9"))
    assert (9, signal.SIGKILL) not in h.signals

    def broken_probe() -> ProbeResult:
        raise RuntimeError("bug")

    h2 = Harness([])
    h2.listener.probe = broken_probe
    h2.run(state_event("STARTING", "STOPPED", tries=0), event("TICK_5", "when:1"))
    assert h2.stdout.getvalue().count("RESULT 2\nOK") == 2
    assert "probe error" in h2.listener.state.reason


def test_probes_keep_their_interval_when_ticks_arrive_slightly_early():
    # supervisord's TICK_5 events are not exact; a 10 s interval must mean a probe every second tick,
    # not every third (which would stretch hang detection from ~30 s to ~45 s).
    h = Harness([OK] * 10, health_interval=10)
    h.run(state_event("STARTING", "STOPPED", tries=0), state_event("RUNNING", "STARTING", pid=4242))
    probes_at_start = len(h.probes)
    h.tick(4.99, count=6)  # ~30 s
    assert probes_at_start - len(h.probes) == 3


def test_a_hung_server_is_killed_after_three_probe_timeouts_not_three_timeouts_plus_ticks():
    # Probes run in a thread and take the whole completion timeout (20 s) on a hung engine; the next
    # probe must start on the event that collects the last one's result, not one tick later.
    h = Harness([HUNG] * 4, health_interval=10, completion_timeout=20)
    running: list[tuple[float, Callable[[], None]]] = []
    h.executor = lambda fn: running.append((h.now, fn))
    h.run(state_event("STARTING", "STOPPED", tries=0), state_event("RUNNING", "STARTING", pid=4242))
    killed_at = None
    while killed_at is None and h.now < 200:
        if running and h.now + 5 - running[0][0] >= 20:
            running.pop()[1]()  # the probe times out between two ticks
        h.tick(5)
        if (4242, signal.SIGTERM) in h.signals:
            killed_at = h.now
    assert killed_at == 60  # 3 x 20 s, probes back to back (70 s with a tick lost after each)


def test_one_listener_for_a_box_kills_and_gives_up_per_server():
    """Three servers behind one listener: a hang on vllm-1 kills vllm-1's process group alone, and a
    crash loop of vllm-2 stops vllm-2 alone (XML-RPC names vllm:vllm-N, records under vllm-N)."""
    from olmocr.server.listener import BoxListener

    now = [0.0]
    rpcs = [FakeSupervisorRPC() for _ in range(3)]
    for i, rpc in enumerate(rpcs):
        rpc.info = {"statename": "RUNNING", "pid": 5000 + i, "start": 100, "now": 130}
    rpcs[2].stats = {"consecutive_restarts": 3}  # over the limit of 2 at its next automatic restart
    probes = {0: lambda: OK, 1: lambda: HUNG, 2: lambda: OK}
    signals: list[tuple[int, int]] = []
    settings = ServerSettings(health_interval=10, failure_threshold=2, startup_timeout=600, kill_grace=15,
                              max_restart_attempts=2)
    stdout = io.StringIO()
    watchers = [HealthListener(io.StringIO(), stdout, rpcs[i], settings, probes[i], program=f"vllm-{i}",
                               rpc_name=f"vllm:vllm-{i}", clock=lambda: now[0], wall_clock=lambda: 1000 + now[0],
                               executor=lambda fn: fn(), signal_group=lambda pgid, sig: signals.append((pgid, sig))
                               or True)
                for i in range(3)]
    box = BoxListener(io.StringIO(), stdout, watchers)
    for _ in range(3):  # three probe rounds, 10 s apart
        box.handle("TICK_5", "when:0")
        now[0] += 10
    assert signals == [(5001, signal.SIGTERM)]  # vllm-1 alone, by its process group
    assert ("supervisor.getProcessInfo", ("vllm:vllm-1",)) in rpcs[1].calls
    assert [c for c in rpcs[1].calls if c[0] == "olmocr.recordKill"][0][1][0] == "vllm-1"
    assert not [c for c in rpcs[0].calls + rpcs[2].calls if c[0] == "olmocr.recordKill"]

    box.handle("PROCESS_STATE_STARTING", "processname:vllm-2 groupname:vllm from_state:EXITED tries:0")
    assert ("supervisor.stopProcess", ("vllm:vllm-2", False)) in rpcs[2].calls
    assert not [c for c in rpcs[0].calls + rpcs[1].calls if c[0] == "supervisor.stopProcess"]
