"""The ``redis`` store: what a resume leaves behind when it fails, is cut short or loses its client.

- A resume that took the session over from a connection still attached, then failed, leaves
  the session detached with no client: ``on_disconnect = "cancel"`` applies as on any detach.
- A take whose claim's reply comes after its caller gave up (the client went away, so the
  resume was cancelled) owned the session in Redis unknown to this process: it is let go at
  once, not ``producer_timeout`` later.
- A resume following another process's reply stops following as soon as its client is gone.

A real ``redis-server`` (tests/redis_server.py); "processes" are connic apps in this test
process sharing it (as in tests/test_redis_fence.py), clients real ``websockets`` clients.
``producer_timeout`` is 30 s: a lease nobody renews or releases would outlive every bound here.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis_server import (
    RedisServer,
    redis_client_fixture,  # noqa: F401  (a fixture)
    redis_server_fixture,  # noqa: F401  (a fixture)
)
from resume_helpers import (
    Clients,
    ResumeSession,
    clients_fixture,  # noqa: F401  (a fixture)
    wait_turns,
)
from test_redis_fence import LONG_LEASE, Stalling, resume_stalled
from test_redis_store import Gated, process

from conftest import StartServer

aioredis = pytest.importorskip("redis.asyncio", reason="redis-py is not installed (pip install 'connic[redis]')")

GATED = {"assistant": {"use": "gated"}}  # a reply that ends only when the test opens Gated.gate


@pytest.fixture(name="stalling")
async def stalling_fixture(redis_server: RedisServer) -> AsyncIterator[Stalling]:
    """A proxy to Redis that stalls its connection at the first ``XRANGE`` while told to."""
    proxy = Stalling(redis_server.port)
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.close()


async def replying(session: ResumeSession) -> Any:
    """Start the session and a reply that runs until Gated.gate opens; the connection, its first chunk seen."""
    conn = await session.start()
    await conn.send({"type": "message", "id": "m1", "payload": {"message": "go"}})
    while not session.transcript.chunks("m1", "assistant"):
        await conn.recv()
    return conn


@pytest.mark.parametrize("how", ["timeout", "client_gone"])
async def test_a_failed_resume_that_took_over_a_connection_applies_on_disconnect_cancel(
    redis_server: RedisServer, stalling: Stalling, start_server: StartServer, clients: Clients, how: str
) -> None:
    # The resume takes the session from the connection still attached (4011), then its read of
    # the log stalls: it fails (store_unavailable after the store's 2 s, or its client drops).
    # Nothing is attached then: the running reply must be cancelled, as when a connection drops.
    Gated.gate = asyncio.Event()
    connector = {**LONG_LEASE, "on_disconnect": "cancel"}
    b = await process(start_server, f"redis://127.0.0.1:{stalling.port}/0", connector=connector, agents=GATED)
    session = ResumeSession(clients, b.url())
    first = await replying(session)
    stalling.stalling = True
    await resume_stalled(session, b.url(), stalling, how)
    code, frames = await first.closed(timeout=5)
    assert code == 4011 and [f["code"] for f in frames if f["type"] == "error"] == ["session_taken_over"], frames
    await wait_turns(b.http, "assistant", 1, reason="cancelled", timeout=5)
    again = await session.resume()
    assert again.connected["resumed"] is True, again.connected
    await again.until_ended({"m1": ["assistant"]})
    end = session.transcript.end("m1", "assistant")
    assert end is not None and end["finish_reason"] == "cancelled" and end["full_response"] == "before ", end
