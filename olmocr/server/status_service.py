"""``olmocr-status-service``: the deployment's state over HTTP for Prometheus, dashboards and scripts.

What it serves (``/metrics``, ``/status``, ``/ws``, ``/``, ``/livez``, ``/readyz``), its port and its token
are the operator's guide: docs/observability.md. One per box, beside vLLM under supervisord; its fixed port
comes from olmocr/server/box_ports.py. This docstring says only how it is built.

It reads the state as the status script does (``olmocr.server.status.fetch_box_parts``: one XML-RPC
multicall to supervisord and the olmocr RPC extension, in a worker thread, every
``OLMOCR_STATUS_POLL_INTERVAL`` seconds) and answers every request from the latest reading, so
no client, however many or slow, adds load on supervisord. Each connection is fresh, so a supervisord
restart costs one failed reading (reported as ``olmocr_supervisor_up 0``), not a dead service.
Counters come from the RPC extension's state file, so they never go back when supervisord restarts.

Each WebSocket client has a bounded queue that drops its oldest message (every message is a whole
snapshot, so only the newest matters) and a send timeout after which it is disconnected: a slow or
dead client never stalls the service or the other clients.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from aiohttp import WSMsgType, web
from prometheus_client import CollectorRegistry, Counter, Gauge, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from olmocr import __version__, envs
from olmocr.endpoints import (
    DEFAULT_HOST,
    check_exposure,
    metrics_response,
    read_token,
    start_app,
)
from olmocr.server import status_page
from olmocr.server.errors import EndpointConfigError
from olmocr.server.health import KillKind
from olmocr.server.livez_readyz import ProbeAnswer, liveness, readiness, stale_after
from olmocr.server.rpcclient import connect_from_child_env
from olmocr.server.settings import PROGRAM_NAME
from olmocr.server.status import (
    add_connection_arguments,
    box_status_from_parts,
    connection_from_args,
    fetch_box_parts,
    history_fields,
    unreachable_status,
)

log = logging.getLogger(__name__)

DEFAULT_PORT = envs.DEFAULT_STATUS_PORT
#: Paths answered without the bearer token: the kubelet's probes.
PROBE_PATHS = frozenset({"/livez", "/readyz"})
TOKEN_VAR, TOKEN_FILE_VAR = "OLMOCR_STATUS_TOKEN", "OLMOCR_STATUS_TOKEN_FILE"
#: ``{field: OLMOCR_STATUS_* variable}`` (olmocr/envs.py).
ENV_NAMES = envs.field_names(envs.STATUS)
#: Health phases reported as ``olmocr_server_health_phase{phase=...}`` (exactly one is 1). The listener
#: records starting/healthy/unhealthy; a program that is not running reports its supervisord state.
PHASES = ("starting", "healthy", "unhealthy", "backoff", "exited", "stopping", "stopped", "fatal", "unknown")


@dataclass(frozen=True)
class ServiceSettings:
    host: str = envs.default("OLMOCR_STATUS_HOST")
    port: int = DEFAULT_PORT
    poll_interval: float = envs.default("OLMOCR_STATUS_POLL_INTERVAL")
    push_interval: float = envs.default("OLMOCR_STATUS_PUSH_INTERVAL")
    queue_size: int = envs.default("OLMOCR_STATUS_QUEUE_SIZE")  # per WebSocket client, before the oldest is dropped
    send_timeout: float = envs.default("OLMOCR_STATUS_SEND_TIMEOUT")  # a slower client is disconnected
    token: str | None = field(default=None, repr=False)

    @classmethod
    def from_env(cls, env: Mapping[str, str], *, token_file: str | None = None, **overrides: Any
                 ) -> ServiceSettings:
        values: dict[str, Any] = {}
        for f in fields(cls):
            if f.name == "token":
                continue
            name = ENV_NAMES[f.name]
            raw = env.get(name, "")
            if raw == "":
                continue
            try:
                values[f.name] = envs.parse(envs.get(name), raw)
            except envs.SettingValueError as exc:
                raise EndpointConfigError(str(exc)) from None
        values.update({k: v for k, v in overrides.items() if v is not None})
        settings = cls(**values, token=read_token(env, TOKEN_VAR, TOKEN_FILE_VAR, token_file))
        settings.validate()
        return settings

    def validate(self) -> None:
        if not 0 < self.port < 65536:
            raise EndpointConfigError(f"status port {self.port} is out of range: use 1-65535 (OLMOCR_STATUS_PORT)")
        for name in ("poll_interval", "push_interval", "send_timeout"):
            if getattr(self, name) <= 0:
                raise EndpointConfigError(f"{ENV_NAMES[name]} must be positive")
        if self.queue_size < 1:
            raise EndpointConfigError("OLMOCR_STATUS_QUEUE_SIZE must be at least 1")
        check_exposure("the status service", self.host, self.token, TOKEN_VAR, TOKEN_FILE_VAR)


# ----------------------------------------------------------------------------------------- readings

@dataclass(frozen=True)
class ServerReading:
    """One server of the box in one reading: its status entry and the raw parts its metrics need."""

    name: str
    gpus: tuple[str, ...]
    status: dict
    info: Mapping[str, Any]
    stats: Mapping[str, Any]

    @property
    def gpu_label(self) -> str:
        return ",".join(self.gpus)


@dataclass(frozen=True)
class Snapshot:
    """One reading of supervisord: the status script's JSON plus the raw parts metrics need."""

    status: dict
    info: Mapping[str, Any] | None = None  # None: supervisord unreachable (one server: its info)
    stats: Mapping[str, Any] | None = None
    settings: Mapping[str, Any] | None = None
    taken_at: float = 0.0
    servers: tuple[ServerReading, ...] = ()  # empty: the one program of ``info``/``stats``, named vllm

    @property
    def reachable(self) -> bool:
        return self.info is not None

    def readings(self) -> list[ServerReading]:
        if self.servers:
            return list(self.servers)
        if not self.reachable:
            return []
        return [ServerReading(PROGRAM_NAME, (), self.status, self.info or {}, self.stats or {})]


def read_snapshot(proxy: Any, program: str, url: str, clock: Callable[[], float] = time.time) -> Snapshot:
    """Blocking (run it in a thread): never raises, an unreachable supervisord is a snapshot too."""
    try:
        servers, parts, settings = fetch_box_parts(proxy, program)
    except Exception as exc:  # noqa: BLE001 - refused, timeout, Fault: all mean "cannot tell"
        return Snapshot(unreachable_status(url, exc), taken_at=clock())
    status = box_status_from_parts(servers, parts, settings)
    status["status_service"]["answering"] = True  # it is this service, answering
    # What the status page draws, per server (and for the box when it is one server).
    for entry, (_info, stats) in zip(status["servers"], parts, strict=True):
        entry.update(history_fields(stats))
    if len(parts) == 1:
        status.update(history_fields(parts[0][1]))
    readings = tuple(ServerReading(entry["name"], tuple(entry["gpus"]), entry, info, stats)
                     for entry, (info, stats) in zip(status["servers"], parts, strict=True))
    first_info, first_stats = parts[0]
    return Snapshot(status, first_info, first_stats, settings, clock(), readings)


#: Fields that change every second by themselves (supervisord's description says "uptime 0:00:06").
_TICKING = frozenset({"uptime_seconds", "description"})


def change_key(status: Mapping[str, Any]) -> str:
    """What makes a status worth pushing: all of it except the fields that tick with the clock."""
    def strip(part: Mapping[str, Any]) -> dict:
        return {k: ([strip(e) for e in v] if k == "servers" else v) for k, v in part.items() if k not in _TICKING}

    return json.dumps(strip(status), sort_keys=True)


def status_phase(status: Mapping[str, Any] | None) -> str:
    if status is None:
        return "unknown"
    state = (status.get("state") or "unknown").lower()
    if state in ("starting", "running"):
        return status.get("health_phase") or "starting"
    return state


def health_phase(snapshot: Snapshot) -> str:
    return status_phase(snapshot.status if snapshot.reachable else None)


def server_metrics(current: Snapshot, last_good: Snapshot | None) -> list[Metric]:
    """The ``olmocr_server_*`` families for one reading (pure), one series per server of the box with
    ``server`` (supervisord process name) and ``gpu`` (its CUDA_VISIBLE_DEVICES, "" without GPU) labels.

    While supervisord is unreachable every server is reported down and unhealthy, and the counters keep
    their last known values (from ``last_good``) so that no counter ever goes back.
    """
    good = current if current.reachable else last_good
    model = str((good.settings or {}).get("model", "")) if good else ""
    known = good.readings() if good else []
    current_by_name = {r.name: r for r in current.readings()} if current.reachable else {}
    # (labels, reading of the last good snapshot, reading now or None)
    rows = [([model, r.name, r.gpu_label], r, current_by_name.get(r.name)) for r in known] or \
        [([model, PROGRAM_NAME, ""], None, None)]
    labels = ["model", "server", "gpu"]

    def gauge(name: str, doc: str, value: Callable[[ServerReading | None, ServerReading | None], float | None]
              ) -> GaugeMetricFamily:
        family = GaugeMetricFamily(name, doc, labels=labels)
        for row_labels, was, now in rows:
            v = value(was, now)
            if v is not None:
                family.add_metric(row_labels, v)
        return family

    def counter(name: str, doc: str, key: str) -> CounterMetricFamily:
        family = CounterMetricFamily(name, doc, labels=labels)
        for row_labels, was, _now in rows:
            family.add_metric(row_labels, float(was.stats.get(key, 0)))
        return family

    out: list[Metric] = [
        gauge("olmocr_server_up", "1 if supervisord runs the vLLM program (state RUNNING)",
              lambda _w, now: float(now is not None and now.status.get("state") == "RUNNING")),
        gauge("olmocr_server_healthy", "1 if the vLLM program is running and its last health probes passed",
              lambda _w, now: float(now is not None and bool(now.status.get("healthy")))),
    ]
    family = GaugeMetricFamily("olmocr_server_health_phase", "Health phase of the vLLM program (1 for the "
                               "current phase)", labels=["model", "server", "gpu", "phase"])
    for row_labels, _was, now in rows:
        phase = status_phase(now.status if now is not None else None)
        for name in PHASES + (() if phase in PHASES else (phase,)):
            family.add_metric([*row_labels, name], float(name == phase))
    out.append(family)
    if good is None:
        return out

    kills = CounterMetricFamily("olmocr_server_health_kills", "vLLM processes killed by the health check, by "
                                "reason", labels=["model", "server", "gpu", "reason"])
    for row_labels, was, _now in rows:
        # Every known reason from the start, at 0: a dashboard shows 0 before the first kill (not "No
        # data"), and increase() sees the first kill (a series born at 1 has no increase).
        by_reason = {kind.value: 0 for kind in KillKind} | (was.stats.get("kills_by_reason") or {})
        for reason, count in sorted(by_reason.items()):
            kills.add_metric([*row_labels, reason], float(count))
    out += [
        counter("olmocr_server_restarts", "Automatic restarts of the vLLM program after it exited or failed to "
                "start (kept across supervisord restarts)", "restarts"),
        counter("olmocr_server_starts", "Starts of the vLLM program, by supervisord or an operator, restarts "
                "included", "starts"),
        kills,
    ]

    def now_stats(now: ServerReading | None) -> Mapping[str, Any]:
        return now.stats if now is not None else {}

    def was_probe(was: ServerReading) -> Mapping[str, Any]:
        return was.stats.get("health") or {}

    out += [
        gauge("olmocr_server_consecutive_probe_failures", "Failed health probes in a row",
              lambda _w, now: float((now_stats(now).get("health") or {}).get("consecutive_failures", 0))),
        gauge("olmocr_server_consecutive_restarts", "Restarts in a row, each run shorter than "
              "OLMOCR_RESTART_RESET_AFTER (the crash-loop budget counts these)",
              lambda _w, now: float(now_stats(now).get("consecutive_restarts", 0))),
        gauge("olmocr_server_gave_up", "1 if the crash-loop limit left the vLLM program stopped",
              lambda _w, now: float(bool(now_stats(now).get("gave_up")))),
        gauge("olmocr_server_uptime_seconds", "Seconds since the running vLLM process started (0 if not "
              "running)", lambda _w, now: float(now.status.get("uptime_seconds") or 0) if now else 0.0),
        gauge("olmocr_server_last_probe_timestamp_seconds", "Unix time of the last health probe",
              lambda was, _n: float(was_probe(was)["time"]) if was_probe(was).get("time") else None),
        gauge("olmocr_server_last_probe_duration_seconds", "Duration of the last health probe",
              lambda was, _n: float(was_probe(was)["latency_ms"]) / 1000.0
              if was_probe(was).get("latency_ms") is not None else None),
        gauge("olmocr_server_last_healthy_timestamp_seconds", "Unix time of the last passed health probe",
              lambda was, _n: float(was.stats["last_healthy_time"]) if was.stats.get("last_healthy_time") else None),
    ]
    return [f for f in out if f.samples]


# -------------------------------------------------------------------------------------- WebSockets

class ClientQueue:
    """One WebSocket client's outbox: at most ``size`` messages, the oldest dropped first."""

    def __init__(self, size: int) -> None:
        self.messages: collections.deque[str] = collections.deque(maxlen=size)
        self.ready = asyncio.Event()
        self.dropped = 0

    def offer(self, message: str) -> int:
        """Queue ``message``; returns how many messages were dropped to make room (0 or 1)."""
        dropped = int(len(self.messages) == self.messages.maxlen)
        self.dropped += dropped
        self.messages.append(message)
        self.ready.set()
        return dropped

    async def get(self) -> str:
        while not self.messages:
            self.ready.clear()
            await self.ready.wait()
        return self.messages.popleft()


class Broadcaster:
    def __init__(self, queue_size: int) -> None:
        self.queue_size = queue_size
        self.clients: set[ClientQueue] = set()
        self.dropped_total = 0

    def add(self) -> ClientQueue:
        client = ClientQueue(self.queue_size)
        self.clients.add(client)
        return client

    def remove(self, client: ClientQueue) -> None:
        self.clients.discard(client)

    def publish(self, message: str) -> None:
        """Never waits: each client's sender task drains its own queue."""
        for client in self.clients:
            self.dropped_total += client.offer(message)


# ----------------------------------------------------------------------------------------- service

class StatusService:
    def __init__(self, settings: ServiceSettings, read: Callable[[], Snapshot],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.read = read
        self.clock = clock
        self.snapshot = Snapshot({"healthy": False, "error": "no reading of supervisord yet"})
        self.last_good: Snapshot | None = None
        # clock() times of the latest reading and of the latest one that reached supervisord (the
        # service's start before the first): what /livez judges staleness by.
        self.read_at = self.good_at = clock()
        self.broadcaster = Broadcaster(settings.queue_size)
        self._last_key: str | None = None
        self._last_push = float("-inf")
        self.registry = CollectorRegistry()
        self.registry.register(_SnapshotCollector(self))
        Gauge("olmocr_status_websocket_clients", "WebSocket clients connected to the status service",
              registry=self.registry).set_function(lambda: len(self.broadcaster.clients))
        Gauge("olmocr_supervisor_up", "1 if the status service's last reading of supervisord succeeded",
              registry=self.registry).set_function(lambda: float(self.snapshot.reachable))
        self.dropped = Counter("olmocr_status_websocket_dropped_messages", "Status messages dropped for "
                               "WebSocket clients too slow to take them", registry=self.registry)
        self.disconnected = Counter("olmocr_status_websocket_slow_disconnects", "WebSocket clients "
                                    "disconnected for not taking a message in time", registry=self.registry)

    # -- state --------------------------------------------------------------------------------------
    def message(self) -> str:
        return json.dumps(self.snapshot.status)

    def update(self, snapshot: Snapshot) -> bool:
        """Take a new reading; push it if it changed or the push interval passed. True if pushed."""
        if snapshot.reachable and not self.snapshot.reachable:
            log.info("supervisord reachable")
        elif not snapshot.reachable and self.snapshot.reachable:
            log.warning("%s", snapshot.status.get("error"))
        self.snapshot = snapshot
        self.read_at = self.clock()
        if snapshot.reachable:
            self.last_good = snapshot
            self.good_at = self.read_at
        key = change_key(snapshot.status)
        if key != self._last_key or self.clock() - self._last_push >= self.settings.push_interval:
            self._last_key = key
            self.push()
            return True
        return False

    def push(self) -> None:
        self._last_push = self.clock()
        before = self.broadcaster.dropped_total
        self.broadcaster.publish(self.message())
        if self.broadcaster.dropped_total > before:
            self.dropped.inc(self.broadcaster.dropped_total - before)

    async def poll_forever(self) -> None:
        while True:
            started = self.clock()
            self.update(await asyncio.to_thread(self.read))
            await asyncio.sleep(max(0.0, self.settings.poll_interval - (self.clock() - started)))

    async def heartbeat_forever(self) -> None:
        """Pushes the last reading even while a reading hangs (supervisord stuck): clients see life."""
        while True:
            wait = self._last_push + self.settings.push_interval - self.clock()
            if wait <= 0:
                self.push()
                wait = self.settings.push_interval
            await asyncio.sleep(wait)

    # -- HTTP ---------------------------------------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application(middlewares=[status_page.auth_middleware(self.settings.token, open_paths=PROBE_PATHS)])
        status_page.add_routes(app, self.settings.token)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/status", self.status)
        app.router.add_get("/ws", self.websocket)
        app.router.add_get("/livez", self.livez)
        app.router.add_get("/readyz", self.readyz)
        return app

    def liveness(self) -> ProbeAnswer:
        now = self.clock()
        return liveness(self.snapshot.status, self.snapshot.reachable, now - self.good_at, now - self.read_at,
                        stale_after(self.settings.poll_interval))

    def readiness(self) -> ProbeAnswer:
        return readiness(self.snapshot.status, self.snapshot.reachable)

    async def livez(self, _request: web.Request) -> web.Response:
        return _probe_response(self.liveness())

    async def readyz(self, _request: web.Request) -> web.Response:
        return _probe_response(self.readiness())

    async def metrics(self, _request: web.Request) -> web.Response:
        return metrics_response(self.registry)

    async def status(self, _request: web.Request) -> web.Response:
        healthy = bool(self.snapshot.status.get("healthy"))
        return web.json_response(self.snapshot.status, status=200 if healthy else 503)

    async def websocket(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(heartbeat=30.0, max_msg_size=4096)
        await ws.prepare(request)
        client = self.broadcaster.add()
        client.offer(self.message())  # the current state at once
        sender = asyncio.create_task(self._send_forever(ws, client, request))
        try:
            async for msg in ws:  # clients have nothing to say; this loop ends when they leave
                if msg.type == WSMsgType.ERROR:
                    break
        finally:
            self.broadcaster.remove(client)
            sender.cancel()
        return ws

    async def _send_forever(self, ws: web.WebSocketResponse, client: ClientQueue, request: web.Request) -> None:
        while not ws.closed:
            message = await client.get()
            try:
                await asyncio.wait_for(ws.send_str(message), self.settings.send_timeout)
            except TimeoutError:
                # Its socket buffers are full: it reads too slowly, or is gone without a FIN.
                self.disconnected.inc()
                log.info("disconnecting a WebSocket client that took no message for %g s",
                         self.settings.send_timeout)
                if request.transport is not None:
                    request.transport.abort()
                return
            except (ConnectionError, RuntimeError):
                return  # closed under us


def _probe_response(answer: ProbeAnswer) -> web.Response:
    # no-store: a probe answer is about this instant only.
    return web.Response(text=answer.reason + "\n", status=answer.http_status, headers={"Cache-Control": "no-store"})


class _SnapshotCollector:
    """prometheus_client custom collector: the server's metrics from the service's latest reading."""

    def __init__(self, service: StatusService) -> None:
        self.service = service

    def describe(self) -> Iterable[Metric]:
        return []  # metric names depend on what supervisord reports; nothing to check at registration

    def collect(self) -> Iterable[Metric]:
        return server_metrics(self.service.snapshot, self.service.last_good)


async def serve(service: StatusService, stop: asyncio.Event | None = None) -> None:
    """Run until ``stop`` is set (or SIGTERM/SIGINT when ``stop`` is None)."""
    if stop is None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
    service.update(await asyncio.to_thread(service.read))  # the first reading before the first client
    runner = await start_app(service.app(), service.settings.host, service.settings.port)
    log.info("serving /metrics, /status and /ws on %s:%d%s", service.settings.host, service.settings.port,
             " (bearer token required)" if service.settings.token else "")
    tasks = [asyncio.create_task(service.poll_forever()), asyncio.create_task(service.heartbeat_forever())]
    try:
        await stop.wait()
    finally:
        for task in tasks:
            task.cancel()
        await runner.cleanup()  # closes WebSockets with 1001 "going away"
    log.info("stopped")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="olmocr-status-service", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"olmocr-serve {__version__}")
    add_connection_arguments(parser)
    parser.add_argument("--host", default=None,
                        help=f"address to listen on (default {DEFAULT_HOST}, env OLMOCR_STATUS_HOST); any other "
                             f"than loopback needs {TOKEN_VAR} or {TOKEN_FILE_VAR}")
    parser.add_argument("--port", type=int, default=None,
                        help=f"port (default {DEFAULT_PORT}, whatever the number of servers; env OLMOCR_STATUS_PORT)")
    parser.add_argument("--token-file", default=None, help=f"file holding the bearer token (or {TOKEN_FILE_VAR})")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    from olmocr.logformat import LOG_FORMAT

    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr, format=LOG_FORMAT)
    disable_created_metrics()  # *_created series only add noise to a handful of counters
    try:
        settings = ServiceSettings.from_env(os.environ, host=args.host, port=args.port, token_file=args.token_file)
    except EndpointConfigError as exc:
        log.error("%s", exc)
        return 2
    try:
        if args.server_url or args.configuration or "SUPERVISOR_SERVER_URL" not in os.environ:
            url, proxy = connection_from_args(args)
        else:  # run by supervisord: it tells its children where it listens
            url = os.environ["SUPERVISOR_SERVER_URL"]
            proxy = connect_from_child_env(os.environ, timeout=args.timeout)
    except (OSError, ValueError) as exc:
        log.error("%s; pass -c supervisord.conf or --server-url", exc)
        return 2
    service = StatusService(settings, lambda: read_snapshot(proxy, args.program, url))
    try:
        asyncio.run(serve(service))
    except EndpointConfigError as exc:
        log.error("%s", exc)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
