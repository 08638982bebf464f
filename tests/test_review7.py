"""Review 7: held cancels on a follower (process B) against one process, cases the heldm1 tests left out.

As tests/test_held_cancels.py (the fixtures of tests/test_review5.py): the session answers m1
on process A, the client resumes on B, which follows A's reply and holds what it sends meanwhile;
the same frames go to one process (the ``memory`` store). A second cancel behind a held message
is in tests/test_held_agents.py, with one agent and with two.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections import Counter
from typing import Any

import pytest
from redis_server import (
    RedisServer,
    redis_server_fixture,  # noqa: F401  (a fixture)
)
from resume_helpers import Clients, ResumeSession, clients_fixture, words  # noqa: F401  (a fixture)
from test_redis_held import following, launch  # noqa: F401  (launch: a fixture)

aioredis = pytest.importorskip("redis.asyncio", reason="redis-py is not installed (pip install 'connic[redis]')")


async def test_a_cancel_passed_into_an_earlier_versions_set_holding_its_id_gets_its_own_answer(
    launch: Any,  # noqa: F811  (the fixture imported above)
    clients: Clients,
    redis_server: RedisServer,
) -> None:
    # PROTOCOL.md §5: each cancel of an id neither queued nor in flight answers not_found. An
    # earlier version's follower left a cancel of m9 in a set (a rolling upgrade); the owner is slow
    # to take it (stopped here for a moment), and this client's cancel of m9 is added to that set.
    a, b = await launch(), await launch()
    session, conn = await following(a, b, clients, words(200))
    redis = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    key = f"connic:{{{session.session_id}}}:cancel"
    a.proc.send_signal(signal.SIGSTOP)
    try:
        await redis.sadd(key, json.dumps("m9"))  # what the earlier version's follower passed
        await redis.pexpire(key, 20_000)
        await conn.send({"type": "cancel", "id": "m9"})
        await conn.send({"type": "cancel", "id": "m8"})
        deadline = time.monotonic() + 5
        while await redis.scard(key) < 2 or not await _passed_m8(redis, key):  # m8 passed after m9
            assert time.monotonic() < deadline, "B never passed the cancels to A"
            await asyncio.sleep(0.01)
    finally:
        a.proc.send_signal(signal.SIGCONT)
        await redis.aclose()
    await conn.until_ended({"m1": ["assistant"]}, timeout=15)
    await conn.send({"type": "message", "id": "m2", "payload": {"message": "after"}})
    await conn.until_ended({"m2": ["assistant"]})
    not_found = Counter(f["id"] for f in session.transcript.ordered() if f.get("code") == "not_found")
    assert not_found == {"m9": 2, "m8": 1}, not_found


async def _passed_m8(redis: Any, key: str) -> bool:
    return bool(await redis.sismember(key, json.dumps("m8")))
