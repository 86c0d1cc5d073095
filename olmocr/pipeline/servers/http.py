"""A small asyncio HTTP/1.1 client with one keep-alive connection pool.

Why not aiohttp/httpx: the pipeline only needs POST/GET with JSON bodies to one host; a tiny client lets
the request body be handed over as pre-built byte pieces (the base64 image is never re-encoded or copied
into a JSON string) and dropped right after it is sent, and every request has one overall timeout.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from dataclasses import dataclass
from urllib.parse import urlsplit

from olmocr.pipeline.errors import ConnectionRefused, NotHttp, RequestTimeout, TlsError, TransportError

#: Servers close idle keep-alive connections (uvicorn after 5 s); do not reuse one idle for longer.
IDLE_REUSE_S = 4.0


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    #: The ``Retry-After`` header as sent (seconds or an HTTP date), None without one.
    retry_after: str | None = None


class _Conn:
    __slots__ = ("reader", "writer", "idle_since")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.idle_since = 0.0

    def close(self) -> None:
        try:
            self.writer.close()
        except Exception:  # noqa: BLE001
            pass


class HttpPool:
    """Keep-alive connections to one ``scheme://host:port``; idle connections are reused LIFO."""

    def __init__(self, base_url: str, *, max_idle: int = 64, ca_bundle: str | None = None) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        self.host = parts.hostname
        self.tls = parts.scheme == "https"
        self.port = parts.port or (443 if self.tls else 80)
        self.host_header = parts.netloc.rpartition("@")[2]
        self.max_idle = max_idle
        self._idle: deque[_Conn] = deque()
        # Certificates are always verified; ``ca_bundle`` adds trust in a private CA (PEM file).
        self._ssl = ssl.create_default_context(cafile=ca_bundle) if self.tls else None

    async def _connect(self) -> _Conn:
        reader, writer = await asyncio.open_connection(self.host, self.port, ssl=self._ssl, limit=1 << 20)
        return _Conn(reader, writer)

    def _release(self, conn: _Conn, reusable: bool) -> None:
        if reusable and len(self._idle) < self.max_idle and not conn.writer.is_closing():
            conn.idle_since = time.monotonic()
            self._idle.append(conn)
        else:
            conn.close()

    def _take_idle(self) -> _Conn | None:
        """The most recently used idle connection that the server has probably not closed yet."""
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()
            if now - conn.idle_since < IDLE_REUSE_S and not conn.writer.is_closing() and not conn.reader.at_eof():
                return conn
            conn.close()
        return None

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: list[bytes] | None = None,
        headers: dict[str, str] | None = None,
        timeout: float,
    ) -> Response:
        """One request with an overall ``timeout``; raises :class:`TransportError` on any transport failure."""
        try:
            async with asyncio.timeout(timeout):
                return await self._request(method, path, body or [], headers or {})
        except TimeoutError:
            raise RequestTimeout(f"no response within {timeout:g}s") from None

    async def _request(self, method: str, path: str, body: list[bytes], headers: dict[str, str]) -> Response:
        length = sum(len(b) for b in body)
        head = [f"{method} {path} HTTP/1.1", f"Host: {self.host_header}", "Connection: keep-alive"]
        if body:
            head.append("Content-Type: application/json")
        head.append(f"Content-Length: {length}")
        head.extend(f"{k}: {v}" for k, v in headers.items())
        head_bytes = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1")

        # ``body`` is cleared once it has been handed to the socket, so large request bodies (page images)
        # are not kept alive while the server works on them. A reused connection that fails while the body
        # is still here is retried once on a fresh connection.
        while True:
            conn = self._take_idle()
            reused = conn is not None
            if conn is None:
                try:
                    conn = await self._connect()
                except ssl.SSLCertVerificationError as exc:
                    raise TlsError(f"certificate of {self.host}:{self.port} not trusted: {exc.verify_message}") from None
                except ssl.SSLError as exc:  # e.g. WRONG_VERSION_NUMBER: https:// to a plain-HTTP port
                    raise TlsError(f"TLS handshake with {self.host}:{self.port} failed ({exc.reason or exc}); "
                                   "the server may not speak https: try http://") from None
                except ConnectionRefusedError:
                    raise ConnectionRefused(f"connection refused: nothing listens on {self.host}:{self.port}") from None
                except OSError as exc:
                    raise TransportError(f"cannot connect to {self.host}:{self.port}: {exc.strerror or exc}") from None
            sent = False
            try:
                # writelines, not a loop: a loop variable would keep the last piece (the page image)
                # alive until the response arrives, defeating body.clear() below.
                conn.writer.writelines([head_bytes, *body])
                await conn.writer.drain()
                sent = True
                body.clear()
                status_line = await conn.reader.readline()
                if not status_line:
                    raise ConnectionResetError("connection closed before a response")
                response, keep = await self._read_response(conn.reader, status_line)
            except NotHttp:
                conn.close()
                raise
            except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
                conn.close()
                if reused and not sent:
                    continue
                raise TransportError(f"{type(exc).__name__}: {exc}") from None
            except BaseException:
                conn.close()
                raise
            self._release(conn, keep)
            return response

    @staticmethod
    async def _read_response(reader: asyncio.StreamReader, status_line: bytes) -> tuple[Response, bool]:
        if status_line.startswith(b"\x15\x03"):  # a TLS alert record: plain HTTP sent to a TLS port
            raise NotHttp("the server answered with TLS (it speaks https): use https://")
        parts = status_line.decode("latin-1").split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
            shown = status_line[:40].decode("ascii", "replace").strip()
            raise NotHttp(f"the server does not speak HTTP (it answered {shown!r})")
        status = int(parts[1])
        keep = parts[0] == "HTTP/1.1"
        hdrs: dict[str, str] = {}
        while True:
            line = await reader.readline()
            if line in (b"\r\n", b"\n"):
                break
            if not line:
                raise ConnectionResetError("connection closed inside the headers")
            key, _, value = line.decode("latin-1").partition(":")
            hdrs[key.strip().lower()] = value.strip()
        conn_hdr = hdrs.get("connection", "").lower()
        if conn_hdr == "close":
            keep = False
        elif conn_hdr == "keep-alive":
            keep = True
        if "chunked" in hdrs.get("transfer-encoding", "").lower():
            chunks = []
            while True:
                size = int((await reader.readline()).split(b";")[0].strip(), 16)
                if size == 0:
                    while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                        pass
                    break
                chunks.append(await reader.readexactly(size))
                await reader.readline()
            body = b"".join(chunks)
        elif "content-length" in hdrs:
            body = await reader.readexactly(int(hdrs["content-length"]))
        elif status in (204, 304) or 100 <= status < 200:
            body = b""
        else:
            body = await reader.read()
            keep = False
        return Response(status, body, hdrs.get("retry-after")), keep

    def close(self) -> None:
        while self._idle:
            self._idle.pop().close()
