"""Messages the owner dropped, sharing an id with a held message and its held cancel, against one process.

As tests/test_review9_agents.py (two agents, ``assistant`` and ``helper``): the session answers
m1 naming ``assistant`` on process A with more m1s and m2 queued behind it; the client resumes
on B, which follows A's reply. A is stopped (SIGSTOP, as tests/test_review8.py) while two
cancels of m1 come, so that it takes both before the first one's stop ends: the second passes
over the stopped m1 and drops every queued m1 (docs/protocol.md, "Cancelling"). While m2 runs,
the client sends a fourth m1 (held on B) and a cancel of m1 (held behind it, passed to A). B
lets a held cancel go when it counts a stop of A's for it (ws_held.Doubts): A's record lists the
dropped m1s too, each a message whose agent's next end with the id would be taken for it; A ends
no m1 after them, so none is. On one process the third cancel drops the fourth m1 (queued behind
m2), and B drops it too. The same frames go to one process (the ``memory`` store). Real
``python -m connic run`` processes, a real ``redis-server``, real ``websockets`` clients.
"""

from __future__ import annotations

import asyncio
import signal
import time
from typing import Any

import pytest
from redis_server import RedisServer, redis_server_fixture  # noqa: F401  (a fixture)
from resume_helpers import Clients, ResumeSession, clients_fixture, words  # noqa: F401  (a fixture)
from test_held_agents import launch, one_or_two, resumed_mid_reply  # noqa: F401  (a fixture)
from test_redis_held import history, outline

aioredis = pytest.importorskip("redis.asyncio", reason="redis-py is not installed (pip install 'connic[redis]')")

# What A queues behind the m1 naming assistant: each one's id and the agent it names (None: both).
_CASES = {
    "the same agent": [("m1", "assistant"), ("m1", "assistant"), ("m2", None)],
    "each agent": [("m1", "assistant"), ("m1", "helper"), ("m2", None)],
    "both agents": [("m1", None), ("m2", None)],
}


async def _cancels_waiting(redis_url: str, session_id: str, count: int) -> None:
    # B passed the cancels to A: they wait in Redis for A, stopped, to take them all at once.
    redis = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        deadline = time.monotonic() + 5
        while await redis.llen(f"connic:{{{session_id}}}:cancel") < count:
            assert time.monotonic() < deadline, "B never passed the cancels to A"
            await asyncio.sleep(0.01)
    finally:
        await redis.aclose()


@pytest.mark.parametrize("case", _CASES)
async def test_a_held_cancel_of_an_id_whose_queued_messages_the_owner_dropped_drops_the_held_one(
    launch: Any,  # noqa: F811  (the fixture imported above)
    clients: Clients,
    redis_server: RedisServer,
    case: str,
) -> None:
    got = {}
    for shared in (False, True):
        a, b = await one_or_two(launch, shared)
        session = ResumeSession(clients, a.url)
        conn = await session.start()
        await conn.send({"type": "message", "id": "m1", "payload": {"message": words(150), "agent": "assistant"}})
        await conn.until(lambda f: f["type"] == "ack" and f["id"] == "m1")
        for message_id, agent in _CASES[case]:
            payload = {"message": words(40, message_id), **({"agent": agent} if agent else {})}
            await conn.send({"type": "message", "id": message_id, "payload": payload})
            await conn.until(lambda f, message_id=message_id: f["type"] == "ack" and f["id"] == message_id)
        conn = await resumed_mid_reply(session, b)
        a.proc.send_signal(signal.SIGSTOP)
        try:
            for _ in range(2):
                await conn.send({"type": "cancel", "id": "m1"})
            if shared:
                await _cancels_waiting(redis_server.url, session.session_id, 2)
        finally:
            a.proc.send_signal(signal.SIGCONT)
        await conn.until(lambda f: f["type"] == "stream_start" and f["id"] == "m2", timeout=15)
        await conn.send({"type": "message", "id": "m1", "payload": {"message": "fourth one"}})
        await conn.send({"type": "cancel", "id": "m1"})
        await conn.until_ended({"m2": ["assistant", "helper"]}, timeout=15)
        await conn.send({"type": "message", "id": "z", "payload": {"message": "last"}})
        await conn.until_ended({"z": ["assistant", "helper"]}, timeout=15)
        session.transcript.assert_complete()
        got[shared] = (outline(session), await history(conn))
    assert got[True] == got[False]
    frames = got[True][0]
    # Only the first m1 began (stopped); the queued ones were dropped, the fourth too.
    assert frames[("stream_start", "m1", None, None, None)] == 1, frames
    assert frames[("stream_end", "m1", None, "cancelled", None)] == 1, frames
    assert frames[("error", "m1", None, None, "not_found")] == 0, frames
