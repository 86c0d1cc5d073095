"""A real S3 API on 127.0.0.1 for tests: moto in server mode, no mocking of boto3.

The ``s3_server`` fixture (tests/conftest.py)::

    def test_x(s3_server):
        url = s3_server.url("workspace")        # s3://<bucket>/workspace
        client = s3_server.client()

The fixture starts the server on a free port, creates a fresh bucket, sets ``AWS_ENDPOINT_URL`` and dummy
credentials with ``monkeypatch`` (child processes started by the test inherit them), and stops the server
afterwards.

moto checks ``If-None-Match``/``If-Match`` and then writes in two steps, so two *concurrent* requests can
both pass the check (real S3 evaluates conditional writes atomically). To give tests the semantics of real
S3, the server handles one request at a time (a lock around the WSGI app); connections are still threaded.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any


class _SerializedApp:
    """WSGI middleware running one request at a time, body fully produced under the lock."""

    def __init__(self, app: Callable[..., Iterable[bytes]]) -> None:
        self.app = app
        self.lock = threading.Lock()

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        with self.lock:
            result = self.app(environ, start_response)
            try:
                return list(result)
            finally:
                close = getattr(result, "close", None)
                if close is not None:
                    close()


@dataclass
class S3Server:
    """A running loopback S3 server with one bucket."""

    endpoint: str
    bucket: str
    _stop: Callable[[], None] = field(repr=False)

    def url(self, prefix: str = "") -> str:
        return f"s3://{self.bucket}/{prefix}" if prefix else f"s3://{self.bucket}"

    def client(self) -> Any:
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1")

    def stop(self) -> None:
        self._stop()


def start_s3_server() -> tuple[str, Callable[[], None]]:
    """Start moto's S3 on 127.0.0.1:<free port>; returns (endpoint, stop)."""
    from moto.moto_server.werkzeug_app import (
        DomainDispatcherApplication,
        MotoRequestHandler,
        create_backend_app,
    )
    from werkzeug.serving import make_server

    app = _SerializedApp(DomainDispatcherApplication(create_backend_app))
    server = make_server("127.0.0.1", 0, app, threaded=True, request_handler=MotoRequestHandler)
    thread = threading.Thread(target=server.serve_forever, name="moto-s3", daemon=True)
    thread.start()
    host, port = server.server_address[:2]

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)

    return f"http://{host}:{port}", stop
