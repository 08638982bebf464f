"""A client that reads steadily, then stops, is still a slow consumer: closed 4010 soon after it stops.

The rule for a slow consumer is a client that takes nothing for ``send_timeout``: no frame from
its outbox, and not one byte of what the server's buffers hold for it (docs/protocol.md). A
client reading a megabyte a second takes bytes all the time, even while the kernel, its send
buffer left to autotuning (megabytes), gives the server no room to write for over a second
(tests/test_compress_steady_reader.py and its AG-UI siblings). Once it stops reading, the bytes
stop moving, and it must be closed within about ``send_timeout`` (one look more, at most), on
every path: the Connic protocol plain and compressed, and both AG-UI bindings.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
from aiohttp.test_utils import TestServer
from deflate_client import Peer, connect
from reliability.conftest import report, scrape
from reliability.rawws import connect_tcp, open_raw, text
from test_agui_support import AUTH, SECRET, agui_config, agui_registry, run_input
from test_compress_steady_reader import QUEUE, RATE, SEND_TIMEOUT, _read_steadily, _words

import connic
from conftest import make_config

WORDS = 16000  # about 16 MB of reply: more than the client reads before it stops
READING = 3.0  # seconds the client reads steadily before it stops: past the kernel's first pause
# Seconds from the client's stop to its close: send_timeout, one more look at its progress, slack
# for a loaded machine. The kernel's buffers are full by then: the client reads into 16 KiB.
CLOSED_WITHIN = 2 * SEND_TIMEOUT + 4.0

Stop = Callable[[], None]


@asynccontextmanager
async def _server(app: Any) -> AsyncIterator[TestServer]:
    server = TestServer(app, host="127.0.0.1")  # the kernel sizes the send buffer
    await server.start_server()
    try:
        yield server
    finally:
        await server.close()


async def _connic_ws(server: TestServer, message: str, compress: bool) -> Stop:
    peer, _ = await connect(server.port, compress, rcvbuf=16 * 1024)
    await peer.ws.send_json({"id": "big", "message": message})
    code, ended, _frames = await _read_steadily(peer, READING)
    assert not ended, f"closed ({code}) while it read steadily"
    peer.ws.pause_reading()
    return peer.ws.reset


async def _agui_ws(server: TestServer, message: str) -> Stop:
    raw = await open_raw(server.port, "/agui/ws", headers=AUTH, rcvbuf=16 * 1024)
    await raw.send_raw(text(run_input("t-stops", message)))
    code, ended, _frames = await _read_steadily(Peer(raw, False), READING)
    assert not ended, f"closed ({code}) while it read steadily"
    raw.pause_reading()
    return raw.reset


async def _agui_sse(server: TestServer, message: str) -> Stop:
    reader, writer = await connect_tcp("127.0.0.1", server.port, rcvbuf=16 * 1024)
    body = json.dumps(run_input("t-stops", message)).encode()
    head = (
        f"POST /agui HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {SECRET}\r\n"
        f"Content-Type: application/json\r\nAccept: text/event-stream\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    writer.write(head.encode() + body)
    await writer.drain()
    received = 0
    started = time.monotonic()
    while (elapsed := time.monotonic() - started) < READING:
        ahead = received / RATE - elapsed
        if ahead > 0:
            await asyncio.sleep(ahead)
        data = await asyncio.wait_for(reader.read(16 * 1024), 10)
        assert data, "the stream ended while the client read steadily"
        received += len(data)
    writer.transport.pause_reading()

    def stop() -> None:  # holds the writer: a writer collected closes its connection
        writer.transport.abort()

    return stop


Path = Callable[[TestServer, str], Awaitable[Stop]]
WEBSOCKET = {"send_timeout": SEND_TIMEOUT, "send_queue": QUEUE, "heartbeat": 0, "on_disconnect": "cancel"}
AGUI = {"send_queue": QUEUE, "send_timeout": SEND_TIMEOUT}
PATHS = [
    pytest.param("ws plain", "/ws", {"compress": False}, lambda s, m: _connic_ws(s, m, False), id="ws-plain"),
    pytest.param("ws deflate", "/ws", {"compress": True}, lambda s, m: _connic_ws(s, m, True), id="ws-deflate"),
    pytest.param("agui ws", "/agui", None, _agui_ws, id="agui-ws"),
    pytest.param("agui sse", "/agui", None, _agui_sse, id="agui-sse"),
]


def _app(connector: str, options: dict[str, Any] | None, message: str) -> Any:
    if connector == "/ws":
        assert options is not None
        return connic.create_app(make_config({**WEBSOCKET, **options, "max_frame_bytes": 2 * len(message)}))
    return connic.create_app(agui_config({**AGUI, "max_body_bytes": 2 * len(message) + 4096}), registry=agui_registry())


@pytest.mark.parametrize(("name", "connector", "options", "read"), PATHS)
async def test_steady_reader_that_stops_is_closed_4010(
    name: str, connector: str, options: dict[str, Any] | None, read: Path
) -> None:
    message = _words(WORDS)
    async with _server(_app(connector, options, message)) as server:
        base = f"http://127.0.0.1:{server.port}"
        series = f'connic_slow_consumer_closes_total{{connector="{connector}"}}'
        stop = await read(server, message)
        stopped = time.monotonic()
        try:
            closed = False
            while not closed and time.monotonic() - stopped < 3 * CLOSED_WITHIN:
                await asyncio.sleep(0.05)
                closed = (await scrape(base)).get(series, 0) >= 1
            took = time.monotonic() - stopped
            report(f"{name}: steady reader that stops", f"closed 4010 {took:.2f} s after it stopped")
            assert closed, f"not closed {took:.1f} s after the client stopped reading"
            assert took < CLOSED_WITHIN, f"closed {took:.1f} s after the client stopped reading"
            # Its connection is over: nothing of it stays open on the server.
            metrics: dict[str, float] = {}

            async def gone() -> bool:
                metrics.update(await scrape(base))
                return metrics.get(f'connic_connections_open{{connector="{connector}"}}', 0) == 0

            assert await _eventually_async(gone), metrics
        finally:
            stop()


async def _eventually_async(predicate: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True
