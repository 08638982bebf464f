"""A client that stops reading while its resume follows a reply another process answers.

On one process a client that takes nothing from a full outbox for ``send_timeout`` is closed
as a slow consumer (4010; PROTOCOL.md, "Errors and close codes"): the agent's frames wait for
room meanwhile, so the server holds at most ``send_queue`` of them. A resume on process B that
follows process A's reply queued every frame it read from A's log, however full the outbox:
the client was never closed, and B held the rest of the reply in memory (a 10 MB reply grew B
by 45 MB) until it ended. Each case runs on one process (the ``memory`` store, the client
resuming on it) and on two ``python -m connic run`` processes sharing a real ``redis-server``
(the client resuming on B); the client is a raw socket with a 4 KiB receive buffer.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from redis_server import redis_server_fixture  # noqa: F401  (a fixture)
from reliability.conftest import scrape
from reliability.rawws import open_raw
from resume_helpers import Clients, ResumeSession, clients_fixture, turns  # noqa: F401  (a fixture)
from test_redis_held import launch  # noqa: F401  (a fixture)

from conftest import SECRET, CliServer


def _kernel_send_buffer_max() -> int:
    """The most a loopback socket's kernel send buffer grows to (tcp_wmem max): it fills before the outbox does."""
    try:
        return int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])
    except (OSError, IndexError, ValueError):
        return 4 * 2**20


WORD = "y" * 3999  # the echo agent streams one word (and its space) a chunk
# Well over what the kernel buffers: the outbox fills, and the reply still runs long after.
WORDS = (3 * _kernel_send_buffer_max() + 4 * 2**20) // (len(WORD) + 1)
CONNECTOR = (
    "send_queue = 16",
    "send_timeout = 1",
    "heartbeat = 0",  # the close must come from send_timeout, not a missed pong
    f"max_frame_bytes = {2 * WORDS * (len(WORD) + 1)}",
)
AGENT = 'use = "echo"\ndelay = 0.005'


def http(server: CliServer) -> str:
    return f"http://127.0.0.1:{server.port}"


@pytest.mark.parametrize("shared", [False, True], ids=["one_process", "follower"])
async def test_a_client_that_stops_reading_while_following_is_closed_as_a_slow_consumer(
    launch: Any,  # noqa: F811  (the fixture imported above)
    clients: Clients,
    shared: bool,
) -> None:
    a = await launch(*CONNECTOR, shared=shared, agent=AGENT)
    b = await launch(*CONNECTOR, agent=AGENT) if shared else a
    message = " ".join(f"{WORD}{i}" for i in range(WORDS))
    session = ResumeSession(clients, a.url)
    conn = await session.start(max_size=None)
    await conn.send({"type": "message", "id": "m1", "payload": {"message": message}})
    while len(session.transcript.chunks("m1", "assistant")) < 5:
        await conn.recv()
    session.drop()

    raw = await open_raw(b.port, rcvbuf=4096)
    await raw.send_json({**session.resume_frame(), "secret": SECRET})
    connected = (await raw.read_frame()).json()
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
    code, frames, _ = await raw.closed(timeout=30)
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
