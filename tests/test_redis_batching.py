"""The ``redis`` store's batching: many writes and many resumes share pipelines (docs/performance.md R7, R8).

A real ``redis-server`` (tests/redis_server.py); "processes" are connic apps in this test
process sharing it, with real ``websockets`` clients. What is counted is what Redis itself
reports (``INFO commandstats``, ``INFO clients``), never a timing.
"""

from __future__ import annotations

import asyncio
import json

import pytest
from redis_server import (
    RedisServer,
    redis_server_fixture,  # noqa: F401  (a fixture)
)
from resume_helpers import (
    Clients,
    ResumeSession,
    clients_fixture,  # noqa: F401  (a fixture)
    words,
)
from test_redis_store import chat, process

from conftest import StartServer

aioredis = pytest.importorskip("redis.asyncio", reason="redis-py is not installed (pip install 'connic[redis]')")


async def info(url: str, section: str) -> dict[str, object]:
    client = aioredis.Redis.from_url(url, decode_responses=True)
    try:
        result: dict[str, object] = await client.info(section)
        return result
    finally:
        await client.aclose()


async def evalsha_calls(url: str) -> int:
    stats = (await info(url, "commandstats")).get("cmdstat_evalsha", {"calls": 0})
    assert isinstance(stats, dict)
    return int(stats["calls"])


async def test_a_streamed_reply_is_logged_in_a_few_script_calls_not_one_per_chunk(
    redis_server: RedisServer, start_server: StartServer, clients: Clients
) -> None:
    # 60 chunks 1 ms apart: a pipeline per round of the loop wrote nearly one APPEND per chunk;
    # appends that wait BATCH_DELAY (5 ms) for each other need a fraction of that.
    server = await process(start_server, redis_server.url, agents={"assistant": {"use": "echo", "delay": 0.001}})
    session = ResumeSession(clients, server.url())
    conn = await session.start()
    await chat(conn, "m0", "warm up")
    await asyncio.sleep(0.1)  # the writer is done with the warm-up
    before = await evalsha_calls(redis_server.url)
    await chat(conn, "m1", words(60))
    await asyncio.sleep(0.1)
    calls = await evalsha_calls(redis_server.url) - before
    frames = 63  # ack, stream_start, 60 chunks, stream_end
    # Some 15 here (one per 5 ms, and the record's saves); a busy machine stretches the 1 ms sleeps.
    assert calls <= frames // 2, f"{calls} script calls for {frames} frames"
    # Nothing was lost by waiting: the log holds every frame, in order.
    client = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        entries = await client.xrange(f"connic:{{{session.session_id}}}:log")
    finally:
        await client.aclose()
    seqs = [json.loads(frame)["seq"] for _, fields in entries for frame in fields["f"].split("\n")]
    assert seqs == list(range(1, session.transcript.last_seq + 1))
    assert len(entries) <= frames // 2  # an entry per write, not per frame


async def test_a_burst_of_resumes_on_another_process_shares_its_redis_connections(
    redis_server: RedisServer, start_server: StartServer, clients: Clients
) -> None:
    # Each resume reads the record and claims the session: sent on a pooled connection each,
    # a burst of them opened a connection to Redis per resume (a connect and a handshake each).
    a = await process(start_server, redis_server.url)
    b = await process(start_server, redis_server.url)
    n = 40
    sessions = [ResumeSession(clients, a.url()) for _ in range(n)]
    await asyncio.gather(*(s.start() for s in sessions))
    for s in sessions:
        s.drop()
    await asyncio.sleep(0.3)  # A saw every drop and let each idle session go
    opened = int((await info(redis_server.url, "clients"))["connected_clients"])  # type: ignore[call-overload]
    resumed = await asyncio.gather(*(s.resume(url=b.url()) for s in sessions))
    assert all(conn.connected["resumed"] is True for conn in resumed)
    grown = int((await info(redis_server.url, "clients"))["connected_clients"]) - opened  # type: ignore[call-overload]
    assert grown <= n // 4, f"{grown} more connections to Redis for {n} resumes at once"
