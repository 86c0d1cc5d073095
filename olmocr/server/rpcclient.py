"""XML-RPC client for supervisord over its unix socket or loopback HTTP, with a timeout.

supervisor's own ``SupervisorTransport`` has no timeout and stays broken after one failed connect
(every later call raises ``CannotSendRequest``); this transport opens a fresh connection per call.
"""

from __future__ import annotations

import base64
import http.client
import socket
import urllib.parse
import xmlrpc.client
from collections.abc import Mapping


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._socket_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._socket_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


class TimeoutTransport(xmlrpc.client.Transport):
    """One connection per request, to a unix socket (``unix:///path``) or ``http://host:port``."""

    def __init__(self, server_url: str, timeout: float, username: str = "", password: str = "") -> None:
        super().__init__()
        self._url = urllib.parse.urlsplit(server_url)
        self._timeout = timeout
        self._auth = None
        if username:
            token = base64.b64encode(f"{username}:{password}".encode()).decode()
            self._auth = f"Basic {token}"

    def make_connection(self, host: str) -> http.client.HTTPConnection:
        if self._url.scheme == "unix":
            return _UnixHTTPConnection(self._url.path, self._timeout)
        return http.client.HTTPConnection(self._url.hostname or "127.0.0.1", self._url.port or 80,
                                          timeout=self._timeout)

    def send_headers(self, connection: http.client.HTTPConnection, headers: list) -> None:
        if self._auth:
            connection.putheader("Authorization", self._auth)
        super().send_headers(connection, headers)

    def request(self, host, handler, request_body, verbose=False):  # type: ignore[override]
        try:
            return super().request(host, handler, request_body, verbose)
        finally:
            self.close()  # never reuse: a half-dead connection must not poison later calls


def connect(server_url: str, *, username: str = "", password: str = "",
            timeout: float = 10.0) -> xmlrpc.client.ServerProxy:
    """A proxy for supervisord's XML-RPC at ``unix:///path/to/sock`` or ``http://127.0.0.1:9001``."""
    transport = TimeoutTransport(server_url, timeout, username, password)
    return xmlrpc.client.ServerProxy("http://127.0.0.1/RPC2", transport=transport, allow_none=True)


def connect_from_child_env(env: Mapping[str, str], timeout: float = 10.0) -> xmlrpc.client.ServerProxy:
    """The proxy for the supervisord that started this process (it sets ``SUPERVISOR_SERVER_URL``)."""
    return connect(env["SUPERVISOR_SERVER_URL"], username=env.get("SUPERVISOR_USERNAME", ""),
                   password=env.get("SUPERVISOR_PASSWORD", ""), timeout=timeout)
