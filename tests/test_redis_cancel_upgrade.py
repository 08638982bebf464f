"""A rolling upgrade from the version that passed cancels in a Redis set, not a list.

An earlier version's follower left its cancels in a set at the session's cancel key (for up
to twice the owner's lease). A follower of this version pushing to a list there got Redis's
WRONGTYPE: the cancel was logged as a store failure and lost, and the reply it should have
stopped ran to its natural end.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from redis_server import (
    RedisServer,
    redis_server_fixture,  # noqa: F401  (a fixture)
)
from resume_helpers import Clients, ResumeSession, clients_fixture, words  # noqa: F401  (a fixture)
from test_redis_held import following, launch  # noqa: F401  (launch: a fixture)

aioredis = pytest.importorskip("redis.asyncio", reason="redis-py is not installed (pip install 'connic[redis]')")


async def test_a_cancel_passed_while_an_earlier_versions_cancel_set_waits_reaches_the_owner(
    launch: Any,  # noqa: F811  (the fixture imported above)
    clients: Clients,
    redis_server: RedisServer,
) -> None:
    a, b = await launch(), await launch()
    session, conn = await following(a, b, clients, words(400))  # 8 s of chunks
    redis = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        key = f"connic:{{{session.session_id}}}:cancel"
        # What an earlier version's follower left: a set, with a cancel of an id nobody has.
        await redis.sadd(key, json.dumps("m0"))
        await redis.pexpire(key, 20_000)
        await conn.send({"type": "cancel", "id": "m1"})
        await conn.until_ended({"m1": ["assistant"]}, timeout=5)
    finally:
        await redis.aclose()
    ends = [f for f in session.transcript.ordered() if f["type"] == "stream_end" and f["id"] == "m1"]
    assert [f.get("finish_reason") for f in ends] == ["cancelled"], ends
    assert len(session.transcript.chunks("m1", "assistant")) < 200, "cut short: not the 400 words"
    not_found = [f["id"] for f in session.transcript.ordered() if f.get("code") == "not_found"]
    assert not_found == ["m0"], not_found  # the earlier version's cancel was answered too
