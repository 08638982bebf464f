"""AG-UI over WebSocket: a client that reads slowly but steadily is never a slow consumer.

As tests/test_compress_steady_reader.py for the Connic protocol: a run's events queued faster
than the client reads wait for room, and get it as the client reads. The binding's writer once
took the whole outbox at once and signalled room only as it took the next batch: an agent
waiting behind a batch the client took longer than ``send_timeout`` to read dropped a client
reading a megabyte a second (4010, after 2.0 s and 1.9 MB read). The server's kernel send
buffer is fixed at 64 KiB, or left to the kernel
(:data:`~test_compress_steady_reader.SEND_BUFFERS`): then the writer cannot write for over a
second while the client reads, and the client was dropped (4010, after 4.6 s and 4.9 MB read)
until the bytes it took from the buffers counted as reading.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from aiohttp.test_utils import TestServer
from deflate_client import Peer
from reliability.conftest import report, scrape
from reliability.rawws import open_raw, text
from test_agui_support import AUTH, agui_config, agui_registry, run_input
from test_compress_steady_reader import QUEUE, RATE, READING, SEND_BUFFERS, _read_steadily, _words

import connic

WORDS = 16000  # about 16 MB of events: more than the client reads in READING


@pytest.mark.parametrize("socket_factory", SEND_BUFFERS)
async def test_steady_slow_reader_of_a_run_is_not_a_slow_consumer(socket_factory: Any) -> None:
    message = _words(WORDS)
    options = {"send_queue": QUEUE, "send_timeout": 1, "max_body_bytes": 2 * len(message) + 4096}
    app = connic.create_app(agui_config(options), registry=agui_registry())
    server = TestServer(app, host="127.0.0.1", socket_factory=socket_factory)
    await server.start_server()
    raw = await open_raw(server.port, "/agui/ws", headers=AUTH, rcvbuf=16 * 1024)
    try:
        await raw.send_raw(text(run_input("t-steady", message)))
        started = time.monotonic()
        code, ended, frames = await _read_steadily(Peer(raw, False), READING)
        took = time.monotonic() - started
        report(
            f"agui ws: steady reader at {RATE // 1024} KiB/s",
            f"{took:.1f} s, {raw.received} bytes, {len(frames)} events, ended {ended}, close {code}",
        )
        metrics = await scrape(f"http://127.0.0.1:{server.port}")
        assert metrics.get('connic_slow_consumer_closes_total{connector="/agui"}', 0) == 0, (
            f"closed as a slow consumer after {took:.1f} s of reading {raw.received} bytes at {RATE} bytes/s"
        )
        assert not ended, f"the connection ended (close {code}) after {took:.1f} s"
        assert len(frames) > QUEUE, "read less than an outbox: the test did not exercise the wait for room"
    finally:
        raw.reset()  # before the server stops: a connection left open would hold it
        await server.close()
