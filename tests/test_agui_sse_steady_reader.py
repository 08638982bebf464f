"""AG-UI over SSE: a client that reads a run's stream slowly but steadily is never a slow consumer.

As tests/test_agui_ws_steady_reader.py for the WebSocket binding: the SSE writer once joined the
whole outbox into one write given one ``send_timeout``, and signalled room only as it took the
next batch; a client reading a megabyte a second was dropped (4010, after 1.8 s and 1.8 MB read)
from a run whose outbox held a few megabytes. The client is a raw socket with a small receive
buffer; the server's kernel send buffer is fixed at 64 KiB, or left to the kernel
(:data:`~test_compress_steady_reader.SEND_BUFFERS`): then a write could wait over a second
for the kernel while the client read, and the client was dropped (4010, after 4.7 s and 4.9 MB
read) until the bytes it took from the buffers counted as reading.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest
from aiohttp.test_utils import TestServer
from reliability.conftest import report, scrape
from reliability.rawws import connect_tcp
from test_agui_support import SECRET, agui_config, agui_registry, run_input
from test_compress_steady_reader import QUEUE, RATE, READING, SEND_BUFFERS, _words

import connic

WORDS = 16000  # about 16 MB of events: more than the client reads in READING


@pytest.mark.parametrize("socket_factory", SEND_BUFFERS)
async def test_steady_slow_reader_of_an_sse_run_is_not_a_slow_consumer(socket_factory: Any) -> None:
    message = _words(WORDS)
    options = {"send_queue": QUEUE, "send_timeout": 1, "max_body_bytes": 2 * len(message) + 4096}
    app = connic.create_app(agui_config(options), registry=agui_registry())
    server = TestServer(app, host="127.0.0.1", socket_factory=socket_factory)
    await server.start_server()
    reader, writer = await connect_tcp("127.0.0.1", server.port, rcvbuf=16 * 1024)
    try:
        body = json.dumps(run_input("t-steady", message)).encode()
        head = (
            f"POST /agui HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {SECRET}\r\n"
            f"Content-Type: application/json\r\nAccept: text/event-stream\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        writer.write(head.encode() + body)
        await writer.drain()
        received = 0
        ended = False
        started = time.monotonic()
        while (elapsed := time.monotonic() - started) < READING:
            ahead = received / RATE - elapsed
            if ahead > 0:
                await asyncio.sleep(ahead)
            data = await asyncio.wait_for(reader.read(16 * 1024), 10)
            if not data:
                ended = True
                break
            received += len(data)
        took = time.monotonic() - started
        report(f"agui sse: steady reader at {RATE // 1024} KiB/s", f"{took:.1f} s, {received} bytes, ended {ended}")
        metrics = await scrape(f"http://127.0.0.1:{server.port}")
        assert metrics.get('connic_slow_consumer_closes_total{connector="/agui"}', 0) == 0, (
            f"closed as a slow consumer after {took:.1f} s of reading {received} bytes at {RATE} bytes/s"
        )
        assert not ended, f"the stream ended after {took:.1f} s"
        assert received > 2 * QUEUE * 1000, "read less than two outboxes: the test did not exercise the wait for room"
    finally:
        writer.transport.abort()  # before the server stops: a connection left open would hold it
        await server.close()
