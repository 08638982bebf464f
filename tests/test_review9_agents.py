"""Two messages sharing an id, each naming another agent, stopped one after the other on the owner, against one process.

As tests/test_held_agents.py (two agents, ``assistant`` and ``helper``): the session answers
m1 naming ``assistant`` on process A with m1 naming ``helper`` queued, the client resumes on
B, which follows A's reply and holds a third m1 (both agents), with two cancels of m1 behind
it; the same frames go to one process (the ``memory`` store). On one process the first cancel
stops the m1 in flight, the helper's m1 begins, the second cancel stops that one, and the third
m1 is answered. B counts the messages A stopped from their cancelled ends, one stop a message:
it took the helper's cancelled end for the assistant's message's (an agent that had not ended
yet), counted one stop, and dropped the third m1 with the second cancel it thought A had not
taken. Which agents each of A's messages names is in A's record (read before the cancels reach
A), so B tells the two apart (ws_held.Doubts). Real ``python -m connic run`` processes, a real
``redis-server``, real ``websockets`` clients.
"""

from __future__ import annotations

from typing import Any

from redis_server import redis_server_fixture  # noqa: F401  (a fixture)
from resume_helpers import Clients, ResumeSession, clients_fixture, words  # noqa: F401  (a fixture)
from test_held_agents import launch, one_or_two, resumed_mid_reply  # noqa: F401  (a fixture)
from test_redis_held import history, outline


def _ended(session: ResumeSession, agent: str, reason: str) -> int:
    frames = session.transcript.ordered()
    return sum(1 for f in frames if f["type"] == "stream_end" and f["agent"] == agent and f["finish_reason"] == reason)


async def test_a_second_messages_stop_is_counted_when_it_names_another_agent(
    launch: Any,  # noqa: F811  (the fixture imported above)
    clients: Clients,
) -> None:
    got = {}
    for shared in (False, True):
        a, b = await one_or_two(launch, shared)
        session = ResumeSession(clients, a.url)
        conn = await session.start()
        for agent in ("assistant", "helper"):
            await conn.send({"type": "message", "id": "m1", "payload": {"message": words(150), "agent": agent}})
            await conn.until(lambda f: f["type"] == "ack" and f["id"] == "m1")
        conn = await resumed_mid_reply(session, b)
        await conn.send({"type": "message", "id": "m1", "payload": {"message": "third one"}})
        await conn.send({"type": "cancel", "id": "m1"})
        # Sent once the helper's m1 began: on either run the second cancel stops it in flight.
        await conn.until(lambda f: f["type"] == "stream_start" and f.get("agent") == "helper", timeout=15)
        await conn.send({"type": "cancel", "id": "m1"})
        await conn.until(lambda f, s=session: _ended(s, "helper", "cancelled") == 1, timeout=15)
        await conn.send({"type": "message", "id": "z", "payload": {"message": "last"}})
        await conn.until_ended({"z": ["assistant", "helper"]}, timeout=15)
        session.transcript.assert_complete()
        got[shared] = (outline(session), await history(conn))
    assert got[True] == got[False]
    assert _ended(session, "assistant", "stop") == 2, got[True]  # the third m1, and z
