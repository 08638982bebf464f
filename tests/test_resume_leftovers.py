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
import hashlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from redis_server import (
    RedisServer,
    redis_client_fixture,  # noqa: F401  (a fixture)
    redis_server_fixture,  # noqa: F401  (a fixture)
)
from resume_helpers import (
    Clients,
    ResumeSession,
    Transcript,
    clients_fixture,  # noqa: F401  (a fixture)
    wait_turns,
)
from tcp_proxy import TcpProxy
from test_redis_fence import LONG_LEASE, Stalling, key, let_go_on, resume_stalled, resumes_whole
from test_redis_store import Gated, chat, config, process, registry, wait_until_let_go

import connic
from conftest import StartServer
from connic.app import RUNTIME
from connic.stores.redis import scripts

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


CLAIM_SHA = hashlib.sha1(scripts.CLAIM.encode()).hexdigest().encode()  # what an EVALSHA of CLAIM carries


class HoldingClaims(TcpProxy):
    """A proxy to Redis that holds each ``CLAIM`` it carries, while :attr:`holding`, until :attr:`release` is set.

    Held, the claim has not run yet; released after its caller gave up, Redis runs it (the session
    gets an owner) and its reply comes back to a process no longer waiting for it.
    """

    def __init__(self, target_port: int) -> None:
        super().__init__(target_port)
        self.holding = False
        self.held = asyncio.Event()
        self.release = asyncio.Event()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                if self.holding and CLAIM_SHA in data:
                    self.held.set()
                    await self.release.wait()
                writer.write(data)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
        except (ConnectionError, OSError):
            writer.transport.abort()


@pytest.fixture(name="holding")
async def holding_fixture(redis_server: RedisServer) -> AsyncIterator[HoldingClaims]:
    proxy = HoldingClaims(redis_server.port)
    await proxy.start()
    try:
        yield proxy
    finally:
        proxy.release.set()
        await proxy.close()


async def test_a_claim_whose_reply_comes_after_the_resume_gave_up_lets_the_session_go_at_once(
    redis_server: RedisServer, redis: Any, holding: HoldingClaims, start_server: StartServer, clients: Clients
) -> None:
    # B's claim is held on its way to Redis while B's client drops (the test server cancels the
    # resume's handler), then goes through: Redis makes B the owner, with a fence B never sees.
    # It must let the session go at once, not leave the owner key for producer_timeout (30 s).
    a = await process(start_server, redis_server.url, connector=LONG_LEASE)
    config_b = config(f"redis://127.0.0.1:{holding.port}/0", LONG_LEASE)
    config_b["store"]["timeout"] = 10  # the held claim's pipeline is not cut short by the store's own bound
    b = await start_server(config_b, registry=registry())
    session = await let_go_on(a.url(), clients, redis_server.url)
    holding.holding = True
    conn = await session.clients.open(b.url(), Transcript())
    await conn.send(session.resume_frame(secret=session.secret))
    await asyncio.wait_for(holding.held.wait(), 10)
    conn.drop()
    connections = b.server.app[RUNTIME].transports[0].connections
    for _ in range(200):  # until B's resume was cancelled and its connection cleaned up
        if not connections:
            break
        await asyncio.sleep(0.02)
    assert not connections
    fence = key(session, "fence")
    before = int(await redis.get(fence))
    assert await redis.get(key(session, "owner")) is None  # the claim has not run yet
    holding.holding = False
    holding.release.set()
    for _ in range(200):  # until it ran: B owns the session in Redis (bounded: 4 s)
        if int(await redis.get(fence)) > before:
            break
        await asyncio.sleep(0.02)
    # Its claim moved the fencing counter on, and its letting go (RELEASE), if it came already, once more.
    assert int(await redis.get(fence)) in (before + 1, before + 2)
    await wait_until_let_go(redis_server.url, session.session_id)  # within 4 s, not producer_timeout's 30
    await resumes_whole(session, a.url())  # another process takes it at once


@pytest.fixture
async def served() -> AsyncIterator[Callable[[dict[str, Any]], Awaitable[tuple[web.Application, str]]]]:
    """Serve connic apps as ``connic run`` does: a handler is not cancelled when its client goes away."""
    runners: list[web.AppRunner] = []

    async def serve(data: dict[str, Any]) -> tuple[web.Application, str]:
        app = connic.create_app(data, registry=registry())
        runner = web.AppRunner(app, handler_cancellation=False, access_log=None)
        await runner.setup()
        runners.append(runner)
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        return app, f"ws://127.0.0.1:{runner.addresses[0][1]}/ws"

    yield serve
    for runner in reversed(runners):
        await runner.cleanup()


@pytest.mark.parametrize("how", ["drop", "close 1001"])
async def test_a_resume_following_another_process_stops_as_soon_as_its_client_is_gone(
    redis_server: RedisServer,
    start_server: StartServer,
    served: Callable[[dict[str, Any]], Awaitable[tuple[web.Application, str]]],
    clients: Clients,
    caplog: pytest.LogCaptureFixture,
    how: str,
) -> None:
    # A answers (its reply waits on the gate); the client resumes on B, which follows A's log,
    # sends a message B holds meanwhile, then goes away. B must stop following at once (its
    # handler ends, its follower reads nothing more), not when A's reply ends.
    Gated.gate = asyncio.Event()
    try:
        a = await process(start_server, redis_server.url, connector=LONG_LEASE, agents=GATED)
        app_b, url_b = await served(config(redis_server.url, LONG_LEASE, GATED))
        session = ResumeSession(clients, a.url())
        await replying(session)
        session.drop()
        conn = await session.resume(url=url_b)
        assert conn.connected["resumed"] is True, conn.connected
        assert await conn.barrier() == []  # B follows A: its frames come through B
        # Held by B until it owns the session (a ping after it would be held too): never acked.
        await conn.send({"type": "message", "id": "m2", "payload": {"message": "held"}})
        caplog.clear()
        if how == "drop":
            conn.drop()
        else:
            await conn.ws.close(1001)
        runtime = app_b[RUNTIME]
        connections = runtime.transports[0].connections
        for _ in range(200):  # bounded: 4 s, while A's reply goes on until the gate opens
            if not connections:
                break
            await asyncio.sleep(0.02)
        assert not connections, "B still follows A's reply for a client that is gone"
        assert not runtime.store._follower._follows  # no blocking read of A's log any more
        assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    finally:
        Gated.gate.set()
    # The session went on on A, untouched: its reply ends there, and a resume gets all of it.
    again = await session.resume(url=url_b)
    assert again.connected["resumed"] is True, again.connected
    await again.until_ended({"m1": ["assistant"]})
    session.transcript.assert_complete()
    assert session.transcript.end("m1", "assistant")["full_response"] == "before after"  # type: ignore[index]
    assert not session.transcript.of("m2")  # never accepted: its client never saw an ack
    await chat(again, "m3", "next")  # B serves the session now
