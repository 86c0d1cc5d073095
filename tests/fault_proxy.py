"""A fault-injecting HTTP proxy on 127.0.0.1, for tests and benchmarks of S3 (or any HTTP) clients.

Put it between a client and a real server (moto's S3 in server mode, for instance) and it forwards every
request, except a chosen share that it answers with a fault instead:

* ``503`` -- ``503 SlowDown`` (S3's throttling answer) without forwarding the request;
* ``500`` -- ``500 InternalError`` without forwarding;
* ``reset-before`` -- the connection is reset (TCP RST) before the request reaches the server;
* ``reset-after`` -- the request IS forwarded and executed, then the connection is reset instead of
  answering: the client cannot know its write happened (the hard case for conditional writes);
* ``stall`` -- the answer is held back ``stall_s`` seconds (longer than a client's read timeout);
* ``truncate`` -- the answer's headers and half its body are sent, then the connection is reset (a
  connection that breaks while an object streams in).

Faults are drawn at random (``error_rate`` for 503/500, ``drop_rate`` for the three kinds of reset,
``stall_rate``),
reproducibly from ``seed``, or chosen per request by ``rule(method, path) -> action | None`` (rules win).
Rates can be changed while it runs (plain attributes). ``counts`` tallies what was done.

Usage::

    with FaultProxy("http://127.0.0.1:9000", error_rate=0.05) as proxy:
        client = boto3.client("s3", endpoint_url=proxy.url)

Standard library only; one thread per connection; the upstream is reached with a fresh connection per
request (a loopback server: cheap, and a reset never leaves a half-used upstream connection).
"""

from __future__ import annotations

import http.client
import random
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

ACTIONS = ("503", "500", "reset-before", "reset-after", "stall", "truncate")
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "date", "server",
               "proxy-connection", "upgrade", "te", "trailer"}
_ERROR_XML = ('<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{msg}</Message>'
              '<RequestId>fault-proxy</RequestId></Error>')


class FaultProxy:
    def __init__(self, upstream: str, *, error_rate: float = 0.0, drop_rate: float = 0.0,
                 stall_rate: float = 0.0, stall_s: float = 30.0, seed: int | None = None,
                 rule: Callable[[str, str], str | None] | None = None) -> None:
        parts = urlsplit(upstream)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"upstream must be http://host:port, got {upstream!r}")
        self.upstream_host = parts.hostname
        self.upstream_port = parts.port or 80
        self.error_rate = error_rate
        self.drop_rate = drop_rate
        self.stall_rate = stall_rate
        self.stall_s = stall_s
        self.rule = rule
        self.counts: Counter[str] = Counter()
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> FaultProxy:
        proxy = self

        class Handler(_Handler):
            owner = proxy

        server = _Server(("127.0.0.1", 0), Handler)
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="fault-proxy", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self._server is not None, "not started"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def faults(self) -> int:
        """Requests answered with a fault so far."""
        with self._lock:
            return sum(n for action, n in self.counts.items() if action != "forwarded")

    # -- decisions ---------------------------------------------------------------------------------
    def choose(self, method: str, path: str) -> str | None:
        if self.rule is not None:
            action = self.rule(method, path)
            if action is not None:
                return action
        with self._lock:
            r = self._rng.random()
            pick = self._rng.random()
        if r < self.error_rate:
            return "503" if pick < 0.5 else "500"
        if r < self.error_rate + self.drop_rate:
            return "reset-before" if pick < 1 / 3 else "reset-after" if pick < 2 / 3 else "truncate"
        if r < self.error_rate + self.drop_rate + self.stall_rate:
            return "stall"
        return None

    def count(self, action: str) -> None:
        with self._lock:
            self.counts[action] += 1


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # resets we make on purpose, and clients that hang up, are not news


class _Handler(BaseHTTPRequestHandler):
    owner: FaultProxy
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass

    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        self._proxy()

    do_PUT = do_POST = do_DELETE = do_HEAD = do_PATCH = do_GET  # noqa: N815

    def _read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        return self.rfile.read(length) if length else b""

    def _reset(self) -> None:
        """Abort the connection with a TCP RST (SO_LINGER 0), as a crashed load balancer would."""
        self.close_connection = True
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
        except OSError:
            pass

    def _error(self, status: int, code: str, msg: str) -> None:
        body = _ERROR_XML.format(code=code, msg=msg).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        if status == 503:
            self.send_header("Retry-After", "1")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _proxy(self) -> None:
        owner = self.owner
        body = self._read_body()
        action = owner.choose(self.command, self.path)
        if action not in (None, *ACTIONS):
            raise ValueError(f"unknown fault action {action!r}")
        owner.count(action or "forwarded")
        if action == "503":
            return self._error(503, "SlowDown", "Please reduce your request rate.")
        if action == "500":
            return self._error(500, "InternalError", "We encountered an internal error. Please try again.")
        if action == "reset-before":
            return self._reset()
        try:
            status, headers, payload = self._forward(body)
        except OSError:
            return self._reset()
        if action == "reset-after":
            return self._reset()
        if action == "stall":
            time.sleep(owner.stall_s)
        self.send_response(status)
        for name, value in headers:
            if name.lower() not in _HOP_BY_HOP:
                self.send_header(name, value)
        if self.command == "HEAD":
            length = next((v for n, v in headers if n.lower() == "content-length"), "0")
            self.send_header("Content-Length", length)
        else:
            self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if action == "truncate" and self.command != "HEAD":
            self.wfile.write(payload[: len(payload) // 2])
            self.wfile.flush()
            return self._reset()
        if self.command != "HEAD" and payload:
            self.wfile.write(payload)

    def _forward(self, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
        conn = http.client.HTTPConnection(self.owner.upstream_host, self.owner.upstream_port, timeout=60)
        try:
            headers = {k: v for k, v in self.headers.items()
                       if k.lower() not in ("connection", "keep-alive", "transfer-encoding", "expect",
                                            "content-length", "proxy-connection")}
            headers["Content-Length"] = str(len(body))
            conn.request(self.command, self.path, body=body if body or self.command in ("PUT", "POST") else None,
                         headers=headers)
            resp = conn.getresponse()
            payload = resp.read()
            return resp.status, resp.getheaders(), payload
        finally:
            conn.close()
