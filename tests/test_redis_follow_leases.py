"""A cancel sent while two resumes on one process follow a session's dead owner, with the ``redis`` store.

A cancel no process takes waits in Redis for the next owner, for twice the owner's lease
(``producer_timeout``): long enough for the claim that follows the lease running out to
find it. A resume taken over by a newer one on the same process used to take the newer
one's lease with it when it ended, so a cancel sent meanwhile was kept 2 x 10 s only, and
with a longer ``producer_timeout`` was gone before the next owner could take it. Two real
``python -m connic run`` processes share one real ``redis-server``; clients are real
``websockets`` clients on loopback.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

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
from test_redis_following import following, launch  # noqa: F401  (launch: a fixture)

aioredis = pytest.importorskip("redis.asyncio", reason="redis-py is not installed (pip install 'connic[redis]')")


async def test_a_cancel_while_a_newer_resume_follows_is_kept_for_twice_the_owners_lease(
    launch: Any,  # noqa: F811  (the fixture imported above)
    clients: Clients,
    redis_server: RedisServer,
) -> None:
    lease = 30.0  # the owner's lease: longer than the 10 s floor, so that the two TTLs differ
    a, b = await launch(f"producer_timeout = {lease:g}"), await launch(f"producer_timeout = {lease:g}")
    session = ResumeSession(clients, a.url)
    older = await following(session, a, b, words(500))  # B follows A's reply live
    a.proc.kill()  # kill -9: A's lease runs on (30 s), and nobody takes a cancel
    a.proc.wait(10)
    newer = await session.resume(url=b.url)  # a second resume of the session on B
    assert newer.connected["resumed"] is True
    code, frames = await older.closed(timeout=10)  # the newer one took the older one over: it ended
    assert code == 4011 and frames[-1]["code"] == "session_taken_over", frames

    await newer.send({"type": "cancel", "id": "m1"})  # while the newer one still follows A
    redis = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        key = f"connic:{{{session.session_id}}}:cancel"
        deadline = time.monotonic() + 10
        while (ttl := await redis.pttl(key)) < 0:  # -2 until B's pipeline ran
            assert time.monotonic() < deadline, "the cancel never reached Redis"
            await asyncio.sleep(0.02)
        # 2 x the owner's lease (60 s); it was 2 x 10 s once the older resume ended.
        assert 2 * lease * 1000 - 10_000 < ttl <= 2 * lease * 1000, ttl
    finally:
        await redis.aclose()
