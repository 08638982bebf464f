"""A client that stops reading while its resume follows a reply another process answers.

On one process a client that takes nothing from a full outbox for ``send_timeout`` is closed
as a slow consumer (4010; PROTOCOL.md, "Errors and close codes"): the agent's frames wait for
room meanwhile, so the server holds at most ``send_queue`` of them. A resume on process B that
follows process A's reply queued every frame it read from A's log, however full the outbox:
the client was never closed, and B held the rest of the reply in memory (a 10 MB reply grew B
by 45 MB) until it ended. Each case runs on one process (the ``memory`` store, the client
resuming on it) and on two ``python -m connic run`` processes sharing a real ``redis-server``
(the client resuming on B); the client is a raw socket with a 4 KiB receive buffer, offering
permessage-deflate when the connector compresses (aiohttp then frames each message itself).
"""

from __future__ import annotations

import asyncio
import random
import string
import time
from pathlib import Path
from typing import Any

import pytest
from deflate_client import RSV1, Peer
from redis_server import redis_server_fixture  # noqa: F401  (a fixture)
from reliability.conftest import scrape
from reliability.rawws import CLOSE, TEXT, Closed, open_raw
from resume_helpers import Clients, ResumeSession, clients_fixture, turns  # noqa: F401  (a fixture)
from test_redis_held import launch  # noqa: F401  (a fixture)

from conftest import SECRET, CliServer


def _kernel_send_buffer_max() -> int:
    """The most a loopback socket's kernel send buffer grows to (tcp_wmem max): it fills before the outbox does."""
    try:
        return int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])
    except (OSError, IndexError, ValueError):
        return 4 * 2**20


WORD_SIZE = 4000  # the echo agent streams one word (and its space) a chunk
# Well over what the kernel buffers, compressed too: the outbox fills, and the reply still runs long after.
WORDS = (3 * _kernel_send_buffer_max() + 4 * 2**20) * 3 // 2 // WORD_SIZE
_RANDOM = random.Random(7)  # letters and digits deflate to some 3/4 of their size: compression does not empty the wire
MESSAGE = " ".join(
    "".join(_RANDOM.choices(string.ascii_letters + string.digits, k=WORD_SIZE - 1)) for _ in range(WORDS)
)
CONNECTOR = (
    "send_queue = 16",
    "send_timeout = 1",
    "heartbeat = 0",  # the close must come from send_timeout, not a missed pong
    f"max_frame_bytes = {2 * len(MESSAGE)}",
)
AGENT = 'use = "echo"\ndelay = 0.005'


def http(server: CliServer) -> str:
    return f"http://127.0.0.1:{server.port}"


async def read_to_the_end(peer: Peer, timeout: float) -> tuple[int | None, list[dict[str, Any]]]:
    """The frames a client that reads again still gets (inflated if compressed), and the close code (None: EOF)."""
    frames: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while True:
        try:
            got = await peer.ws.read_frame(max(deadline - time.monotonic(), 0.001))
        except Closed:
            return None, frames
        if got.opcode == TEXT:
            frames.append(peer.decode(got))
        elif got.opcode == CLOSE:
            return got.close_code, frames


@pytest.mark.parametrize(
    ("shared", "compress"),
    [(False, False), (True, False), (False, True), (True, True)],
    ids=["one_process", "follower", "one_process_compressed", "follower_compressed"],
)
async def test_a_client_that_stops_reading_while_following_is_closed_as_a_slow_consumer(
    launch: Any,  # noqa: F811  (the fixture imported above)
    clients: Clients,
    shared: bool,
    compress: bool,
) -> None:
    connector = (*CONNECTOR, f"compress = {str(compress).lower()}")
    a = await launch(*connector, shared=shared, agent=AGENT)
    b = await launch(*connector, agent=AGENT) if shared else a
    message = MESSAGE
    session = ResumeSession(clients, a.url)
    conn = await session.start(max_size=None)
    await conn.send({"type": "message", "id": "m1", "payload": {"message": message}})
    while len(session.transcript.chunks("m1", "assistant")) < 5:
        await conn.recv()
    session.drop()

    headers = {"Sec-WebSocket-Extensions": "permessage-deflate"} if compress else None
    raw = await open_raw(b.port, headers=headers, rcvbuf=4096)
    peer = Peer(raw, compress)
    await raw.send_json({**session.resume_frame(), "secret": SECRET})
    got = await raw.read_frame()
    assert bool(got.rsv & RSV1) == compress, "permessage-deflate was not negotiated as asked"
    connected = peer.decode(got)
    assert connected["type"] == "connected" and connected["resumed"] is True, connected
    raw.pause_reading()  # the client stops reading

    # Closed as a slow consumer while A's reply still runs (it lasts several times longer).
    deadline = time.monotonic() + 120
    while (await scrape(http(b))).get('connic_slow_consumer_closes_total{connector="/ws"}', 0) < 1:
        replies = (await turns(http(a))).get(("assistant", "stop"), 0)
        assert not replies, "the reply ended and the client that stopped reading was never closed"
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)

    raw.resume_reading()
    code, frames = await read_to_the_end(peer, timeout=30)
    assert code in (4010, None), code  # its close frame, unless it was still behind the unread bytes
    for frame in frames:
        session.transcript.add(frame)

    # Nothing is lost: resumed again (reading), the client gets the rest of the reply.
    conn = await session.resume(url=b.url, max_size=None)
    assert conn.connected["resumed"] is True, conn.connected
    await conn.until_ended({"m1": ["assistant"]}, timeout=120)
    session.transcript.assert_complete()
    end = session.transcript.end("m1", "assistant")
    assert end is not None and end["finish_reason"] == "stop"
    assert "".join(session.transcript.chunks("m1", "assistant")) == end["full_response"] == message
