"""The pipeline's HTTP client against a real loopback server: request bodies (page images) are not kept
in memory while the server works on them; with 1,600 requests in flight that is the difference between
~80 MB and ~450 MB of RSS."""

from __future__ import annotations

import asyncio
import gc
import tracemalloc

from olmocr.pipeline.servers.http import HttpPool

BODY_BYTES = 8 << 20


async def _slow_server(answer: asyncio.Event, body_read: asyncio.Event) -> asyncio.Server:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))
        while length:  # read and drop, as vLLM reads a request before it queues it
            length -= len(await reader.read(min(length, 1 << 16)))
        body_read.set()
        await answer.wait()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: application/json\r\n\r\n{}")
        await writer.drain()
        writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


def test_request_body_is_released_once_sent_not_when_answered():
    async def scenario() -> tuple[int, int]:
        answer, body_read = asyncio.Event(), asyncio.Event()
        server = await _slow_server(answer, body_read)
        port = server.sockets[0].getsockname()[1]
        pool = HttpPool(f"http://127.0.0.1:{port}")
        try:
            gc.collect()
            baseline = tracemalloc.get_traced_memory()[0]
            request = asyncio.ensure_future(
                pool.request("POST", "/v1/chat/completions", body=[b"x" * BODY_BYTES], timeout=30))
            await asyncio.wait_for(body_read.wait(), 30)
            await asyncio.sleep(0.1)
            gc.collect()
            held_while_waiting = tracemalloc.get_traced_memory()[0] - baseline
            answer.set()
            response = await asyncio.wait_for(request, 30)
            assert response.status == 200 and response.body == b"{}"
            return held_while_waiting, BODY_BYTES
        finally:
            pool.close()
            server.close()
            await server.wait_closed()

    tracemalloc.start()
    try:
        held, body = asyncio.run(scenario())
    finally:
        tracemalloc.stop()
    assert held < body / 4, f"{held / 2**20:.1f} MiB still held while the server works on the request"
