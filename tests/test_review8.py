"""Two cancels of the owner's reply while messages with its id are queued behind it (the follower's max_queued count).

As tests/test_review5.py: the session answers m1 (80 chunks) on process A, the client drops
(after A queued what ``pre`` names behind m1) and resumes on B, which follows A's reply and
holds what the client sends meanwhile; the same client frames go to one process (the
``memory`` store). The owner (A, or the one process) is stopped (SIGSTOP) while the cancels
come, so that it takes both before the first one's stop ends: the second passes over the
stopped message and drops the queued ones with its id (PROTOCOL.md §5, docs/protocol.md
"Cancelling"), whatever the timing of the machine. What the client gets (the frames, less
the chunks, in no order) and the session's history must be the same.
"""

from __future__ import annotations

import asyncio
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
from test_redis_held import (  # noqa: F401  (launch: a fixture)
    launch,
    settled_outline,
)

aioredis = pytest.importorskip("redis.asyncio", reason="redis-py is not installed (pip install 'connic[redis]')")


async def _run(a: Any, b: Any, clients: Clients, redis_url: str, pre: list[str], sent: list[str]) -> tuple[Any, ...]:
    """What the client gets when ``sent`` goes to ``b`` while ``a`` answers m1, ``a`` stopped while the cancels come.

    ``sent``: the cancels first ("-id"), then messages; on two processes the messages are sent
    to ``b`` (held there) before ``a`` goes on, on one they come a ping's round trip after the
    cancels. The queued messages answer 40 chunks: ``b`` holds them while the first still runs.
    """
    cancels = [item[1:] for item in sent if item.startswith("-")]
    messages = [item for item in sent if not item.startswith("-")]
    session = ResumeSession(clients, a.url)
    conn = await session.start()
    await conn.send({"type": "message", "id": "m1", "payload": {"message": words(80)}})
    while len(session.transcript.chunks("m1", "assistant")) < 5:
        await conn.recv()
    for message_id in pre:
        await conn.send({"type": "message", "id": message_id, "payload": {"message": words(40, message_id)}})
        await conn.until(lambda f, message_id=message_id: f["type"] == "ack" and f["id"] == message_id)
    session.drop()
    conn = await session.resume(url=b.url)
    assert conn.connected["resumed"] is True
    seen = len(session.transcript.chunks("m1", "assistant"))
    while len(session.transcript.chunks("m1", "assistant")) < seen + 5:  # m1 still streams
        await conn.recv()
    a.proc.send_signal(signal.SIGSTOP)
    try:
        for message_id in cancels:
            await conn.send({"type": "cancel", "id": message_id})
        if a is not b:  # the cancels wait in Redis, all of them, for A to take them at once
            redis = aioredis.Redis.from_url(redis_url, decode_responses=True)
            try:
                key = f"connic:{{{session.session_id}}}:cancel"
                deadline = time.monotonic() + 5
                while await redis.llen(key) < len(cancels):
                    assert time.monotonic() < deadline, "B never passed the cancels to A"
                    await asyncio.sleep(0.01)
            finally:
                await redis.aclose()
            for message_id in messages:  # held on B while A is stopped
                await conn.send({"type": "message", "id": message_id, "payload": {"message": f"{message_id} text"}})
    finally:
        a.proc.send_signal(signal.SIGCONT)
    if a is b:  # the cancels were read at once; the messages come once they were handled
        await conn.send({"type": "ping"})
        await conn.until_type("pong")
        for message_id in messages:
            await conn.send({"type": "message", "id": message_id, "payload": {"message": f"{message_id} text"}})
    await conn.until_ended({"m1": ["assistant"]}, timeout=15)
    return await settled_outline(session, conn)


# The owner's queue behind m1 (``pre``), max_queued, and what the client sends once it resumed
# on B. On one process the first cancel stops m1, and the second (read before m1's stop ended)
# drops every queued m1: the messages sent next find only what is left queued. B followed A's
# queue as if the second cancel stopped the next m1 in flight (begun, as m1's stop were
# instant) and left the m1s behind it queued: it counted one more queued message than A had,
# and refused queue_full the last message that one process accepts.
_CASES = {
    "an m1 behind the next one": (3, ["m1", "m2", "m1"], ["-m1", "-m1", "m3", "m4", "m5"]),
    "two m1s, then the next": (3, ["m1", "m1", "m2"], ["-m1", "-m1", "m3", "m4", "m5"]),
    "three m1s, none after": (3, ["m1", "m1", "m1"], ["-m1", "-m1", "m3", "m4", "m5"]),
}


@pytest.mark.parametrize("case", _CASES)
async def test_a_second_cancel_that_drops_the_queued_messages_with_its_id_makes_room_on_the_follower(
    launch: Any,  # noqa: F811  (the fixture imported above)
    clients: Clients,
    redis_server: RedisServer,
    case: str,
) -> None:
    max_queued, pre, sent = _CASES[case]
    one = await launch(f"max_queued = {max_queued}", shared=False)
    a, b = await launch(f"max_queued = {max_queued}"), await launch(f"max_queued = {max_queued}")
    alone = await _run(one, one, clients, redis_server.url, pre, sent)
    shared = await _run(a, b, clients, redis_server.url, pre, sent)
    assert shared == alone, (max_queued, pre, sent)
    frames: Counter[Any] = shared[0]
    assert frames[("stream_start", "m1", None, None, None)] == 1, frames  # only the first m1 began
    assert frames[("error", "m5", None, None, "queue_full")] == 0, frames
