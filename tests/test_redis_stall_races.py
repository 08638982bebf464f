"""Redis stalling for longer than ``producer_timeout`` while a resume follows another process's reply.

Real ``python -m connic run`` processes on a private ``redis-server`` (tests/redis_server.py),
real ``websockets`` clients on loopback, as in tests/test_redis_stall.py. Redis is stopped
(SIGSTOP) for longer than the owner's lease: every call under way fails, and what was sent
meanwhile runs once Redis runs again, in the order it reached Redis. No process dies: every
reply must go on. Every wait is bounded; nothing is timed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import websockets
from redis_server import (
    RedisServer,
    redis_client_fixture,  # noqa: F401  (a fixture)
    redis_server_fixture,  # noqa: F401  (a fixture)
    store_plugin_env,
)
from resume_helpers import (
    Clients,
    ResumeSession,
    clients_fixture,  # noqa: F401  (a fixture)
    words,
)
from test_redis_stall import Served

from conftest import SECRET, start_cli


async def following(clients: Clients, owner: str, follower: str, text: str) -> ResumeSession:
    """A session answering ``text`` (echoed) on ``owner``, its client resumed on ``follower`` and following it."""
    session = ResumeSession(clients, owner)
    conn = await session.start()
    await conn.send({"type": "message", "id": "m1", "payload": {"message": text}})
    while len(session.transcript.chunks("m1", "assistant")) < 3:
        await conn.recv()
    session.drop()
    conn = await session.resume(url=follower)
    assert conn.connected["resumed"] is True, conn.connected
    await conn.until(lambda f: f.get("type") == "stream_chunk")
    return session


async def test_a_claim_that_timed_out_on_its_follower_does_not_take_the_session_when_redis_runs_it_later(
    served_at: Any, clients: Clients, redis_server: RedisServer, redis: Any
) -> None:
    # A resume on B follows A's reply, claiming the session between its reads. Redis stops for
    # longer than A's lease: B's claim sent meanwhile times out on B (its resume ends 1011, and
    # B forgets it), but Redis runs it once it runs again. When it reached Redis before A's next
    # write, A's lapsed lease was B's: A found another owner and stopped its reply ("ownership
    # lost"), and B, which never learned its fence, produced nothing: the reply ended
    # producer_lost a lease later, though no process died. Which reached Redis first was
    # chance (4 of 6 sessions in one run, none in the next); A is stopped across the stall here
    # so that B's claim is first. A's lease is taken back by its next write, as after any stall.
    a, b = await served_at(redis_server.url, 1.0), await served_at(redis_server.url, 1.0)
    text = words(1500)  # 1500 chunks 10 ms apart: some 15 s
    session = await following(clients, a.url, b.url, text)
    assert redis_server.proc is not None and session.conn is not None
    owner_key = f"connic:{{{session.session_id}}}:owner"
    fence = await redis.get(owner_key)
    os.kill(a.server.proc.pid, signal.SIGSTOP)
    os.kill(redis_server.proc.pid, signal.SIGSTOP)
    try:
        with contextlib.suppress(websockets.ConnectionClosed):
            code, _ = await session.conn.closed(timeout=20)
            assert code == 1011, code  # B's claim timed out: store_unavailable
        await b.printed(rf"session {session.session_id}: the session store failed")
        await asyncio.sleep(3)  # three of A's leases in Redis's clock
    finally:
        os.kill(redis_server.proc.pid, signal.SIGCONT)
        await redis.ping()  # answered after what B sent during the stall ran
        await asyncio.sleep(0.5)
        claimed = await redis.get(owner_key)
        os.kill(a.server.proc.pid, signal.SIGCONT)
    assert claimed in (None, fence), (fence, claimed)
    conn = await session.resume(url=a.url)
    assert conn.connected["resumed"] is True, conn.connected
    await conn.until_ended({"m1": ["assistant"]}, timeout=30)
    end = session.transcript.end("m1", "assistant")
    assert end is not None and end["type"] != "error", end
    assert end["finish_reason"] == "stop" and end["full_response"] == text, end
    lost = [line for line in a.lines if "ownership lost" in line]
    assert lost == [], lost


@pytest.fixture
def served_at(tmp_path: Path) -> Iterator[Any]:
    """``served_at(redis_url, producer_timeout)``: a ``python -m connic run`` on that Redis (echo agent).

    Killed at the end (a process a test stopped too).
    """
    pytest.importorskip("redis.asyncio", reason="redis-py is not installed (pip install 'connic[redis]')")
    env = store_plugin_env(tmp_path / "plugins")
    started: list[Served] = []

    async def start(url: str, producer_timeout: float) -> Served:
        config = tmp_path / f"connic{len(started)}.toml"
        config.write_text(
            '[agents.assistant]\nuse = "echo"\ndelay = 0.01\n'
            f'[[connectors]]\npath = "/ws"\nsecrets = ["{SECRET}"]\nproducer_timeout = {producer_timeout}\n'
            f'[store]\nuse = "redis"\nurl = "{url}"\ntimeout = 0.5\n'
        )
        server = Served(await asyncio.to_thread(start_cli, "--config", str(config), env=env))
        started.append(server)
        return server

    yield start
    for server in started:
        if server.server.proc.poll() is None:
            server.server.proc.kill()
