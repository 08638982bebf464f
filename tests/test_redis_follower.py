"""The ``redis`` store's follower (one ``XREAD`` for every followed log) against a real ``redis-server``."""

from __future__ import annotations

import asyncio

import pytest
from redis_server import (
    RedisServer,
    redis_server_fixture,  # noqa: F401  (a fixture)
    redis_store_fixture,  # noqa: F401  (a fixture)
)

from connic.stores.redis import RedisStore

aioredis = pytest.importorskip("redis.asyncio", reason="redis-py is not installed (pip install 'connic[redis]')")
syncredis = pytest.importorskip("redis")


async def blocked_in_xread(url: str) -> None:
    """Until a client of the server is blocked in ``XREAD`` (bounded)."""
    client = aioredis.Redis.from_url(url, decode_responses=True)
    try:
        for _ in range(250):
            if any(c.get("cmd") == "xread" and "b" in c.get("flags", "") for c in await client.client_list()):
                return
            await asyncio.sleep(0.02)
    finally:
        await client.aclose()
    raise AssertionError("the follower never blocked in XREAD")


async def test_a_log_followed_again_never_gets_entries_a_read_sent_before_holds_again(
    redis_server: RedisServer, store: RedisStore
) -> None:
    # A resume follows a log from seq 0 and goes away (its client left) while the read is
    # under way; frames 1 and 2 are logged, and a new resume reads them with its claim and
    # follows from 2 before the read's reply is handled. That reply must not hand it 1 and 2
    # again: the take would see a gap ("frames trimmed") and refuse the resume.
    key = "connic:{s1}:log"
    follower = store._follower
    old = follower.follow(key, 0)
    await blocked_in_xread(redis_server.url)
    follower.stop(old)
    # A blocking client: the event loop (so the follower) runs only once both frames are logged.
    client = syncredis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        for seq in (1, 2):
            client.xadd(key, {"f": f"frame {seq}"}, id=f"0-{seq}")
    finally:
        client.close()
    new = follower.follow(key, 2)
    try:
        assert await follower.next(new, 0.5) == []
    finally:
        follower.stop(new)
