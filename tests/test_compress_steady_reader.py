"""A client that reads slowly but steadily is never a slow consumer, with ``compress = true`` as without.

docs/protocol.md: a slow consumer is a client that takes nothing for ``send_timeout``. A client
reading a megabyte a second, without pause, takes something all the time; a reply queued
faster than that waits for room, and must get it as the client reads. With compression on, the
writer once took a whole outbox's worth of frames at once and signalled room only when it took
the next batch: an agent waiting behind a batch that took longer than ``send_timeout`` to drain
closed a reading client 4010 (after 1.4 s and 1.5 MB read, here).

Each case runs with the server's kernel send buffer fixed at 64 KiB and left to the kernel
(:data:`SEND_BUFFERS`). Left to the kernel, the buffer grew to about 4 MB, the kernel reported
the socket writable only once over a megabyte of it drained (a second at this rate), and the
client, reading all the while, was closed 4010 after 4.6 s and 4.9 MB read: the wait for room
counted only frames the writer took, not the bytes the client took from the buffers.
"""

from __future__ import annotations

import asyncio
import random
import socket
import string
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp.test_utils import TestServer, get_port_socket
from deflate_client import Peer, connect, port_of, reset_clients
from reliability.conftest import report, scrape
from reliability.rawws import CLOSE, PING, PONG, TEXT, Closed, frame

import connic
from conftest import Server, make_config

__all__ = ["reset_clients"]

SEND_BUFFER = 64 * 1024


def _pinned_send_buffer(host: str, port: int, family: socket.AddressFamily) -> socket.socket:
    """The listening socket, its kernel send buffer fixed: the connections it accepts inherit it (Linux).

    Left to autotuning, a loopback send buffer grows to megabytes, and the kernel reports the
    socket writable again only once much of it drained: at a megabyte a second, a pause of over
    a second in what the server can write (the ``sndbuf-kernel`` cases).
    """
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
    sock.bind((host, port))
    return sock


SEND_BUFFERS = [
    pytest.param(_pinned_send_buffer, id="sndbuf-64k"),
    # Autotuned: the kernel reports the socket writable only after much of a buffer of
    # megabytes drained, a second or more at RATE. The client still reads all the while.
    pytest.param(get_port_socket, id="sndbuf-kernel"),
]


@pytest.fixture
async def start_server() -> AsyncIterator[Any]:
    """As conftest's, with the listening socket made by ``socket_factory`` (:data:`SEND_BUFFERS`)."""
    servers: list[TestServer] = []

    async def start(config: Any, socket_factory: Any = _pinned_send_buffer) -> Server:
        server = TestServer(connic.create_app(config), host="127.0.0.1", socket_factory=socket_factory)
        await server.start_server()
        servers.append(server)
        return Server(server)

    yield start
    for server in reversed(servers):
        await server.close()


PLAIN = pytest.param(False, id="plain")
DEFLATE = pytest.param(True, id="deflate")

SEND_TIMEOUT = 1.0
RATE = 1024 * 1024  # bytes a second the client reads: steady, never a pause near send_timeout
WORD = 1000  # random letters: deflate barely shrinks them, so the wire carries about what was queued
WORDS = 16000  # about 16 MB of reply: more than the client reads in READING
QUEUE = 4096  # an outbox of about 4 MB of stream chunks: some three seconds' reading at RATE, deflated
READING = 10.0  # seconds the client reads for: more than two outboxes' worth


def _words(count: int) -> str:
    rng = random.Random(11)
    letters = string.ascii_letters + string.digits
    return " ".join("".join(rng.choices(letters, k=WORD)) for _ in range(count))


async def _read_steadily(peer: Peer, seconds: float) -> tuple[int | None, bool, list[dict[str, Any]]]:
    """Read at about ``RATE`` for ``seconds`` or to the reply's end: (close code, whether the socket ended, frames)."""
    frames: list[dict[str, Any]] = []
    started = time.monotonic()
    while (elapsed := time.monotonic() - started) < seconds:
        ahead = peer.ws.received / RATE - elapsed
        if ahead > 0:
            await asyncio.sleep(ahead)
        try:
            got = await peer.ws.read_frame(timeout=max(seconds - elapsed, 0.001))
        except Closed:
            return None, True, frames
        except TimeoutError:
            break
        if got.opcode == PING:
            await peer.ws.send_raw(frame(PONG, got.payload))
        elif got.opcode == CLOSE:
            return got.close_code, True, frames
        elif got.opcode == TEXT:
            frames.append(peer.decode(got))
            if frames[-1].get("type") == "stream_end":
                break
    return None, False, frames


@pytest.mark.parametrize("socket_factory", SEND_BUFFERS)
@pytest.mark.parametrize("compress", [PLAIN, DEFLATE])
async def test_steady_slow_reader_is_not_a_slow_consumer(
    start_server: Any, compress: bool, socket_factory: Any
) -> None:
    message = _words(WORDS)
    options = {"compress": compress, "send_timeout": SEND_TIMEOUT, "send_queue": QUEUE, "heartbeat": 0}
    server = await start_server(
        make_config({**options, "max_frame_bytes": 2 * len(message), "on_disconnect": "cancel"}), socket_factory
    )
    peer, _ = await connect(port_of(server), compress, rcvbuf=16 * 1024)
    await peer.ws.send_json({"id": "big", "message": message})
    started = time.monotonic()
    code, ended, frames = await _read_steadily(peer, READING)
    took = time.monotonic() - started
    report(
        f"compress={compress}: steady reader at {RATE // 1024} KiB/s",
        f"{took:.1f} s, {peer.ws.received} bytes, {len(frames)} frames, ended {ended}, close {code}",
    )
    metrics = await scrape(f"http://127.0.0.1:{port_of(server)}")
    assert metrics.get('connic_slow_consumer_closes_total{connector="/ws"}', 0) == 0, (
        f"closed as a slow consumer after {took:.1f} s of reading {peer.ws.received} bytes at {RATE} bytes/s"
    )
    assert not ended, f"the connection ended (close {code}) after {took:.1f} s"
    assert len(frames) > QUEUE, "read less than an outbox: the test did not exercise the wait for room"
