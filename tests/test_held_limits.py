"""``rate_limit`` and ``max_messages`` for messages a resume on process B holds while process A answers.

B holds what the client sends while it follows A's reply and admits it once it took the session
over (docs/deployment.md: ``rate_limit`` applies to held messages then, not as they came). With a
bucket that does not refill during the test, and a ``max_messages`` the held messages reach, the
client must get the same acks, refusals, replies, history and close as on one process, where
the messages were admitted as they came. Each case runs on one process (the ``memory`` store,
the client resuming on it) and on two ``python -m connic run`` processes sharing a real
``redis-server`` (the client resuming on B), with the same client frames.
"""

from __future__ import annotations

from typing import Any

import pytest
from redis_server import redis_server_fixture  # noqa: F401  (a fixture)
from resume_helpers import Clients, ResumeSession, clients_fixture  # noqa: F401  (a fixture)
from test_redis_held import history, launch, outline, resumed_mid_reply  # noqa: F401  (launch: a fixture)

# What the client sends while m1 streams, with a bucket of 2 or 3 messages per 10 minutes (m1 took
# one) and max_queued = 1: one process acks while tokens last and room behind m1 remains, then
# refuses (queue_full before the bucket is empty, rate_limited after).
_RATE = {
    "bucket of 2": (("rate_limit = { messages = 2, per = 600 }",), 3),
    "bucket of 3, max_queued = 1": (("rate_limit = { messages = 3, per = 600 }", "max_queued = 1"), 6),
}


@pytest.mark.parametrize("case", _RATE)
async def test_held_messages_get_the_rate_limit_one_process_gives(
    launch: Any,  # noqa: F811  (the fixture imported above)
    clients: Clients,
    case: str,
) -> None:
    connector, count = _RATE[case]
    sent = [f"m{n}" for n in range(2, 2 + count)]
    got = {}
    for shared in (False, True):
        session, conn = await resumed_mid_reply(launch, clients, shared, *connector)
        for message_id in sent:
            await conn.send({"type": "message", "id": message_id, "payload": {"message": f"{message_id} text"}})
        await conn.until_ended({"m1": ["assistant"]}, timeout=15)
        while not all(settled(session, message_id) for message_id in sent):
            await conn.recv()
        session.transcript.assert_complete()
        got[shared] = (outline(session), await history(conn))
    assert got[True] == got[False], case
    codes = {key[1]: key[4] for key in got[True][0] if key[0] == "error"}
    assert "rate_limited" in codes.values(), codes  # the bucket ran out


def settled(session: ResumeSession, message_id: str) -> bool:
    """Whether a message sent while m1 streamed is refused or answered."""
    kinds = [f["type"] for f in session.transcript.of(message_id)]
    return "error" in kinds or "stream_end" in kinds


# max_messages reached by held messages (3: m1 and two of them), or by the one held message over
# it while A still has an accepted one queued behind m1 (2: m1 and m2, then m3 held on B).
_LIMIT = {"held messages reach it": (3, [], ["m2", "m3", "m4", "m5"]), "one held over it": (2, ["m2"], ["m3"])}


@pytest.mark.parametrize("case", _LIMIT)
async def test_held_messages_over_max_messages_are_refused_and_the_session_closes_4009(
    launch: Any,  # noqa: F811  (the fixture imported above)
    clients: Clients,
    case: str,
) -> None:
    limit, before, held = _LIMIT[case]
    got = {}
    for shared in (False, True):
        a = await launch(f"max_messages = {limit}", shared=shared)
        b = await launch(f"max_messages = {limit}") if shared else a
        session = ResumeSession(clients, a.url)
        conn = await session.start()
        for message_id, text in [("m1", " ".join(f"w{i}" for i in range(150))), *((m, "x") for m in before)]:
            await conn.send({"type": "message", "id": message_id, "payload": {"message": text}})
            await conn.until(lambda f, message_id=message_id: f.get("id") == message_id and f["type"] == "ack")
        while len(session.transcript.chunks("m1", "assistant")) < 5:
            await conn.recv()
        session.drop()
        conn = await session.resume(url=b.url)
        assert conn.connected["resumed"] is True
        seen = len(session.transcript.chunks("m1", "assistant"))
        while len(session.transcript.chunks("m1", "assistant")) < seen + 3:  # m1 still streams
            await conn.recv()
        for message_id in held:
            await conn.send({"type": "message", "id": message_id, "payload": {"message": "y"}})
        code, frames = await conn.closed(timeout=30)
        session.transcript.assert_complete()
        unsequenced = [(f["type"], f.get("code")) for f in frames if "seq" not in f]
        got[shared] = (outline(session), code, unsequenced)
    assert got[True] == got[False], case
    assert got[True][1] == 4009, got[True]
