"""The ``redis`` store's replay log and connection pool against a real ``redis-server`` (tests/redis_server.py)."""

from __future__ import annotations

import asyncio

import pytest
import websockets
from redis_server import (
    RedisServer,
    redis_server_fixture,  # noqa: F401  (a fixture)
    redis_store_fixture,  # noqa: F401  (a fixture)
    with_store,
)
from resume_helpers import Clients, ResumeSession

from conftest import StartServer
from connic.stores.redis import RedisStore
from connic.stores.redis.log import RedisReplayLog

aioredis = pytest.importorskip("redis.asyncio", reason="redis-py is not installed (pip install 'connic[redis]')")


async def test_since_is_not_spoiled_by_frames_numbered_while_it_reads(
    redis_server: RedisServer, store: RedisStore
) -> None:
    # A resume on the process serving a live session: replay() holds the frames numbered
    # from its start on, and asks the log for the ones before. A frame numbered while the
    # log is read must not make the read look like a gap (it once answered recovered false).
    log = RedisReplayLog(store, "s1", 100)
    client = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        # Logged as two writes: an entry of frames 1 to 3, then one of frames 4 and 5.
        await client.xadd("connic:{s1}:log", {"f": "frame 1\nframe 2\nframe 3"}, id="0-3")
        await client.xadd("connic:{s1}:log", {"f": "frame 4\nframe 5"}, id="0-5")
    finally:
        await client.aclose()
    log.last = 5
    assert await log.since(1) == ["frame 2", "frame 3", "frame 4", "frame 5"]  # from inside an entry
    reading = asyncio.create_task(log.since(3))
    await asyncio.sleep(0)  # the read is under way (XRANGE sent)
    log.append(6, "frame 6")  # the reply goes on meanwhile: the session holds it for the resume
    assert await reading == ["frame 4", "frame 5"]
    # A frame missing before the read started is a gap.
    log.last = 7
    assert await log.since(3) is None


async def test_more_handshakes_at_once_than_connections_in_the_pool_all_get_a_session(
    redis_server: RedisServer, start_server: StartServer
) -> None:
    # redis-py's pool refuses a call beyond its connections ("Too many connections") rather
    # than waiting for one: a burst of handshakes once got store_unavailable instead of sessions.
    server = await with_store(start_server, redis_server.url)()
    async with Clients() as clients:
        sessions = [ResumeSession(clients, server.url()) for _ in range(150)]
        conns = await asyncio.gather(*(session.start() for session in sessions))
    assert len({conn.connected["session_id"] for conn in conns}) == 150


async def test_the_writer_loads_its_scripts_again_when_redis_restarted_empty(
    redis_server: RedisServer, start_server: StartServer
) -> None:
    # The writer runs its scripts by SHA in pipelines; a restarted Redis has none of them.
    server = await with_store(start_server, redis_server.url)()
    async with Clients() as clients:
        conn = await ResumeSession(clients, server.url()).start()
        await conn.send({"type": "message", "id": "m1", "payload": {"message": "one"}})
        await conn.until_ended({"m1": ["assistant"]})
        redis_server.stop()
        redis_server.start()
        for _ in range(100):
            # Until the store has seen Redis back, a handshake gets 503, or store_unavailable
            # from a pooled connection the restart closed: the client tries again.
            session = ResumeSession(clients, server.url())
            try:
                conn = await session.start()
                break
            except (websockets.exceptions.InvalidStatus, AssertionError):
                await asyncio.sleep(0.1)
        await conn.send({"type": "message", "id": "m1", "payload": {"message": "two"}})
        await conn.until_ended({"m1": ["assistant"]})
        assert await conn.barrier() == []  # still open: its frames were written
        client = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
        try:
            entries = await client.xrange(f"connic:{{{session.session_id}}}:log")
            assert sum(len(fields["f"].split("\n")) for _, fields in entries) == session.transcript.last_seq
        finally:
            await client.aclose()
