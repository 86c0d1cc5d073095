"""The pipeline's hand-written HTTP/1.1 client (olmocr/pipeline/servers/http.py), edge by edge, against small
real servers on loopback (asyncio.start_server, and a real TLS server with a private CA): chunked bodies,
Content-Length edges, keep-alive connections the server closed or kept too long, and the one-line errors
for a server that speaks TLS, plain HTTP or no HTTP at all."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from olmocr.pipeline.errors import NotHttp, RequestTimeout, TlsError
from olmocr.pipeline.servers import http
from olmocr.pipeline.servers.http import HttpPool
from tests.test_fleet import _make_ca_and_cert

#: What a handler is given: the request's head (through the blank line) and its body.
Handler = Callable[[bytes, bytes, asyncio.StreamWriter], Awaitable[bool]]


class Server:
    """A loopback server that reads each request (head, Content-Length body) and lets ``handler`` answer;
    the connection stays open while the handler returns True. Counts connections and keeps requests."""

    def __init__(self, handler: Handler, tls: ssl.SSLContext | None = None) -> None:
        self.handler = handler
        self.tls = tls
        self.connections = 0
        self.requests: list[tuple[bytes, bytes]] = []
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> Server:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.tls)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                body = await reader.readexactly(length)
                self.requests.append((head, body))
                if not await self.handler(head, body, writer):
                    break
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()


def answer(*responses: bytes, keep_open: bool = True) -> Handler:
    """A handler that sends the next of ``responses`` to each request (the last one from then on)."""
    queue = list(responses)

    async def handle(_head: bytes, _body: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(queue.pop(0) if len(queue) > 1 else queue[0])
        await writer.drain()
        return keep_open

    return handle


async def get_in_turn(server: Server, count: int, timeout: float = 5) -> list[tuple[int, bytes]]:
    """``count`` GET requests, one after the other, through one pool: each answer's status and body."""
    pool = HttpPool(f"http://127.0.0.1:{server.port}")
    try:
        return [((r := await pool.request("GET", f"/{i}", timeout=timeout)).status, r.body) for i in range(count)]
    finally:
        pool.close()


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(scenario(), 30))


OK_2 = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}"


# ------------------------------------------------------------------------------------------ bodies

def test_a_chunked_body_is_joined_and_the_connection_reused():
    """Chunk extensions, a trailer: all read, so the next answer on the connection starts where it should."""
    chunked = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"4\r\nWiki\r\n5;name=value\r\npedia\r\nE\r\n in\r\n\r\nchunks.\r\n0\r\nX-Trailer: yes\r\n\r\n")

    async def scenario() -> None:
        async with Server(answer(chunked, OK_2)) as server:
            assert await get_in_turn(server, 2) == [(200, b"Wikipedia in\r\n\r\nchunks."), (200, b"{}")]
            assert server.connections == 1

    run(scenario)


def test_content_length_edges():
    """0 and a body of exactly Content-Length on one connection; 204 without a length has no body (not
    read until the server closes); an answer with neither length nor chunks is read to its end and the
    connection is not reused."""
    answers = [b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
               b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
               b"HTTP/1.1 204 No Content\r\n\r\n"]

    async def scenario() -> None:
        async with Server(answer(*answers, OK_2)) as server:
            got = await get_in_turn(server, 4, timeout=3)
            assert got == [(200, b""), (200, b"hello"), (204, b""), (200, b"{}")]
            assert server.connections == 1

        async def until_close(_head: bytes, _body: bytes, writer: asyncio.StreamWriter) -> bool:
            writer.write(b"HTTP/1.1 200 OK\r\n\r\nall of ")
            await writer.drain()
            writer.write(b"it")
            return False  # the server closes: the end of the body

        async with Server(until_close) as server:
            assert await get_in_turn(server, 2, timeout=3) == [(200, b"all of it")] * 2
            assert server.connections == 2

    run(scenario)


def test_the_request_says_the_length_of_all_its_pieces():
    async def scenario() -> None:
        async with Server(answer(OK_2)) as server:
            pool = HttpPool(f"http://127.0.0.1:{server.port}")
            pieces = [b'{"a": "', b"x" * 70_000, b'"}']
            await pool.request("POST", "/v1/chat/completions", body=pieces, timeout=5)
            head, body = server.requests[0]
            assert b"\r\nContent-Length: 70009\r\n" in head and body == b"".join([b'{"a": "', b"x" * 70_000, b'"}'])
            await pool.request("GET", "/health", timeout=5)
            assert b"\r\nContent-Length: 0\r\n" in server.requests[1][0]
            pool.close()

    run(scenario)


# ------------------------------------------------------------------------------------------ keep-alive

def test_a_connection_the_server_closed_while_idle_is_not_reused():
    """The server answers and closes without saying so (as uvicorn closes idle connections): the next
    request goes on a fresh connection instead of failing on the dead one."""
    async def scenario() -> None:
        async with Server(answer(OK_2, keep_open=False)) as server:
            pool = HttpPool(f"http://127.0.0.1:{server.port}")
            assert (await pool.request("GET", "/", timeout=5)).body == b"{}"
            await asyncio.sleep(0.2)  # the server's FIN arrives
            assert (await pool.request("GET", "/", timeout=5)).body == b"{}"
            assert server.connections == 2
            pool.close()

    run(scenario)


def test_a_connection_idle_too_long_is_not_reused(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(http, "IDLE_REUSE_S", 0.3)

    async def scenario() -> None:
        async with Server(answer(OK_2)) as server:
            pool = HttpPool(f"http://127.0.0.1:{server.port}")
            await pool.request("GET", "/", timeout=5)
            await pool.request("GET", "/", timeout=5)
            assert server.connections == 1  # reused while fresh
            await asyncio.sleep(0.5)
            await pool.request("GET", "/", timeout=5)
            assert server.connections == 2  # a server may be closing it just now: a new one
            pool.close()

    run(scenario)


def test_connection_close_is_honoured_and_a_hung_server_times_out():
    async def hang(_head: bytes, _body: bytes, writer: asyncio.StreamWriter) -> bool:
        await asyncio.sleep(30)
        return False

    async def scenario() -> None:
        async with Server(answer(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\n{}")) as server:
            assert await get_in_turn(server, 2) == [(200, b"{}")] * 2
            assert server.connections == 2
        async with Server(hang) as server:
            pool = HttpPool(f"http://127.0.0.1:{server.port}")
            with pytest.raises(RequestTimeout, match="no response within 0.3s"):
                await pool.request("GET", "/", timeout=0.3)
            pool.close()

    run(scenario)


# ------------------------------------------------------------------------------------------ who answers

def _first_request_raises(scheme: str, reply: bytes, error: type[Exception], match: str) -> None:
    """A request with ``scheme`` to a server that answers whatever arrives first with ``reply`` and closes
    raises ``error`` with a message matching ``match``."""
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1024)
        writer.write(reply)
        await writer.drain()
        writer.close()

    async def scenario() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        try:
            port = server.sockets[0].getsockname()[1]
            with pytest.raises(error, match=match):
                await HttpPool(f"{scheme}://127.0.0.1:{port}").request("GET", "/", timeout=5)
        finally:
            server.close()
            await server.wait_closed()

    run(scenario)


def test_plain_http_to_a_tls_port_says_use_https():
    """A TLS server that answers plain HTTP with a fatal alert record (protocol_version), as some do.
    (OpenSSL 3 servers, Python's and so uvicorn's, reset the connection instead: that is a TransportError.)"""
    _first_request_raises("http", b"\x15\x03\x03\x00\x02\x02\x46", NotHttp,
                          r"answered with TLS \(it speaks https\): use https://")


def test_https_with_a_private_ca_and_an_untrusted_certificate(tmp_path: Path):
    """A real TLS server whose certificate a private CA signed: trusted with that CA (and the connection
    reused), refused in one line without it."""
    ca, cert, key = _make_ca_and_cert(tmp_path)
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert, key)

    async def scenario() -> None:
        async with Server(answer(OK_2), tls=tls) as server:
            good = HttpPool(f"https://127.0.0.1:{server.port}", ca_bundle=str(ca))
            for _ in range(2):
                assert (await good.request("GET", "/", timeout=5)).body == b"{}"
            assert server.connections == 1
            good.close()
            with pytest.raises(TlsError, match=r"certificate of 127\.0\.0\.1:\d+ not trusted"):
                await HttpPool(f"https://127.0.0.1:{server.port}").request("GET", "/", timeout=5)

    run(scenario)


def test_https_to_a_plain_http_port_says_try_http():
    """A plain HTTP server answers a TLS ClientHello with a 400, as uvicorn does."""
    _first_request_raises("https", b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                          TlsError, r"the server may not speak https: try http://")


def test_a_server_that_does_not_speak_http_is_named():
    async def scenario() -> None:
        async with Server(answer(b"SSH-2.0-OpenSSH_9.2\r\n", keep_open=False)) as server:
            with pytest.raises(NotHttp, match=r"does not speak HTTP \(it answered 'SSH-2\.0-OpenSSH_9\.2'\)"):
                await HttpPool(f"http://127.0.0.1:{server.port}").request("GET", "/", timeout=5)

    run(scenario)
