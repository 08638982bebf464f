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
from collections.abc import AsyncIterator, Iterator
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
from tcp_proxy import TcpProxy
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


class Partition(TcpProxy):
    """A proxy to Redis for one process: while :attr:`cut_off`, nothing it sends reaches Redis.

    Its connections open then stop forwarding (packets lost, not queued as a stopped Redis
    queues them: what was sent then never runs), and new ones are refused.
    """

    def __init__(self, target_port: int) -> None:
        super().__init__(target_port)
        self.cut_off = False

    def partition(self, on: bool) -> None:
        self.cut_off = self.refusing = on

    def passes(self, data: bytes) -> bool:
        return not self.cut_off


@pytest.fixture
async def partition(redis_server: RedisServer) -> AsyncIterator[Partition]:
    proxy = Partition(redis_server.port)
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.close()


@pytest.fixture
def served_at(tmp_path: Path) -> Iterator[Any]:
    """``served_at(redis_url, producer_timeout, connector)``: a ``python -m connic run`` on that Redis (echo agent).

    ``connector``: more lines of the connector's table.

    Killed at the end (a process a test stopped too).
    """
    pytest.importorskip("redis.asyncio", reason="redis-py is not installed (pip install 'connic[redis]')")
    env = store_plugin_env(tmp_path / "plugins")
    started: list[Served] = []

    async def start(url: str, producer_timeout: float, connector: str = "") -> Served:
        config = tmp_path / f"connic{len(started)}.toml"
        config.write_text(
            '[agents.assistant]\nuse = "echo"\ndelay = 0.01\n'
            f'[[connectors]]\npath = "/ws"\nsecrets = ["{SECRET}"]\nproducer_timeout = {producer_timeout}\n'
            + connector
            + "\n"
            f'[store]\nuse = "redis"\nurl = "{url}"\ntimeout = 0.5\n'
        )
        server = Served(await asyncio.to_thread(start_cli, "--config", str(config), env=env))
        started.append(server)
        return server

    yield start
    for server in started:
        if server.server.proc.poll() is None:
            server.server.proc.kill()


async def test_a_goodbye_sent_to_a_follower_cut_off_from_redis_ends_the_session_once_it_reaches_redis(
    served_at: Any, clients: Clients, redis_server: RedisServer, redis: Any, partition: Partition
) -> None:
    # A client following on B a reply that A runs says goodbye (close 1000) while B cannot reach
    # Redis. B passed it on in one call, which failed: the goodbye was dropped with a warning and
    # the session stayed resumable for its whole TTL instead of ending, as it would on one
    # process. (A stopped Redis runs the call later, once it runs again: nothing was lost then.)
    # It is tried again, as cancels are, until it goes through. A's lease is never in doubt.
    a = await served_at(redis_server.url, 10)
    b = await served_at(f"redis://127.0.0.1:{partition.port}/0", 10)
    session = await following(clients, a.url, b.url, words(1500))
    assert session.conn is not None
    record = f"connic:{{{session.session_id}}}:record"
    partition.partition(True)
    try:
        await session.conn.ws.close(1000)
        await b.printed(rf"session {session.session_id}: passing the client's goodbye to its owner failed")
        await asyncio.sleep(3)  # cut off a while longer (a partition, not a blip)
        assert await redis.exists(record)
    finally:
        partition.partition(False)
    for _ in range(300):  # 30 s at most
        if not await redis.exists(record):
            break
        await asyncio.sleep(0.1)
    assert not await redis.exists(record), "the session is still in the store: the goodbye was lost"
    await a.printed(rf"session {session.session_id}: its client said goodbye on another process: ended")
    again = await session.resume(url=a.url)
    assert again.connected["resumed"] is False and again.connected["session_id"] != session.session_id


async def test_a_message_refused_store_unavailable_as_redis_stalls_costs_no_rate_token_once_resent(
    served_at: Any, clients: Clients, redis_server: RedisServer, redis: Any
) -> None:
    # A message's rate token is taken in Redis before it is acked. Redis stops: the take times
    # out, the message is not acked (store_unavailable, 1011) and the client sends it again once
    # resumed, here on the other process, as PROTOCOL.md says. Redis ran the take that timed out
    # once it ran again: the message was charged twice, and a third message within the limit of
    # three was refused rate_limited.
    limit = "rate_limit = { messages = 3, per = 600 }"
    a = await served_at(redis_server.url, 10, limit)
    b = await served_at(redis_server.url, 10, limit)
    session = ResumeSession(clients, a.url)
    conn = await session.start()
    await conn.send({"type": "message", "id": "m1", "payload": {"message": "one"}})
    await conn.until_ended({"m1": ["assistant"]})
    history = f"connic:{{{session.session_id}}}:history"
    for _ in range(100):  # the reply's save written: nothing of the session's is under way in Redis
        if await redis.llen(history) == 2:
            break
        await asyncio.sleep(0.1)
    assert redis_server.proc is not None
    os.kill(redis_server.proc.pid, signal.SIGSTOP)
    try:
        await conn.send({"type": "message", "id": "m2", "payload": {"message": "two"}})
        code, frames = await conn.closed(timeout=20)
        assert code == 1011 and [f["code"] for f in frames if f["type"] == "error"] == ["store_unavailable"], frames
        assert not any(f["type"] == "ack" for f in frames), frames
        await asyncio.sleep(1)
    finally:
        os.kill(redis_server.proc.pid, signal.SIGCONT)
    conn = await session.resume(url=b.url)
    assert conn.connected["resumed"] is True, conn.connected
    for message_id, text in (("m2", "two"), ("m3", "three")):  # m2 again, not acked: then a third
        await conn.send({"type": "message", "id": message_id, "payload": {"message": text}})
        await conn.until(lambda f, m=message_id: f.get("id") == m and f["type"] in ("ack", "error"), timeout=20)
        refused = [f for f in conn.frames if f["type"] == "error" and f.get("id") == message_id]
        assert refused == [], refused
    await conn.until_ended({"m2": ["assistant"], "m3": ["assistant"]}, timeout=20)
