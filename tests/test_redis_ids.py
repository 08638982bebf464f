"""A message id used twice across processes with the ``redis`` store (PROTOCOL.md §7, docs/protocol.md).

The server does not check that client ids are unique: a message refused (not acked) may carry
the id of one still being answered. On one process that refusal ends nothing but the refused
message. When the process answering dies, the process that takes the session over reads from
the log which replies it left unfinished (:func:`connic.stores.redis.log.unfinished`): the
refusal must not be read as the end of the pending message with that id, or its reply never
ends for the client (no ``producer_lost``). Real ``python -m connic run`` processes sharing a
real ``redis-server``; the one answering is killed with SIGKILL mid-reply.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from redis_server import (
    redis_server_fixture,  # noqa: F401  (a fixture)
)
from resume_helpers import (
    Clients,
    ResumeSession,
    clients_fixture,  # noqa: F401  (a fixture)
    words,
)
from test_redis_following import launch  # noqa: F401  (a fixture)

from connic.stores.redis.log import unfinished

pytest.importorskip("redis.asyncio", reason="redis-py is not installed (pip install 'connic[redis]')")

PRODUCER_TIMEOUT = 3  # seconds: how long the killed process's lease outlives it


# Each case: more connector keys, the frames sent after m1 (the last one refused, with m1's id),
# the refusal's code, and the messages whose replies the killed process leaves unfinished.
_REFUSALS: dict[str, tuple[tuple[str, ...], list[dict[str, Any]], str, list[str]]] = {
    "unknown_agent": (
        (),
        [{"type": "message", "id": "m1", "payload": {"message": "x", "agent": "nobody"}}],
        "unknown_agent",
        ["m1"],
    ),
    "invalid_message": ((), [{"type": "message", "id": "m1", "payload": {"message": 5}}], "invalid_message", ["m1"]),
    "rate_limited": (
        ("rate_limit = { messages = 1, per = 600 }",),
        [{"type": "message", "id": "m1", "payload": {"message": "again"}}],
        "rate_limited",
        ["m1"],
    ),
    "queue_full": (
        ("max_queued = 1",),
        [
            {"type": "message", "id": "m2", "payload": {"message": "queued"}},
            {"type": "message", "id": "m1", "payload": {"message": "again"}},
        ],
        "queue_full",
        ["m1", "m2"],
    ),
}


@pytest.mark.parametrize("case", _REFUSALS)
async def test_a_refused_message_reusing_a_pending_id_does_not_end_it_when_its_process_dies(
    launch: Any,  # noqa: F811  (the fixture imported above)
    clients: Clients,
    case: str,
) -> None:
    # m1 is acked and streams on A; a second message with id m1 is refused (an error frame with
    # id m1 and no agent, logged). A dies mid-reply: B, which the client resumed on, must end
    # m1's reply (and any message queued behind it) with producer_lost, as for any reply A left.
    connector, sent, code, lost = _REFUSALS[case]
    lease = f"producer_timeout = {PRODUCER_TIMEOUT}"
    a, b = await launch(lease, *connector), await launch(lease, *connector)
    session = ResumeSession(clients, a.url)
    conn = await session.start()
    await conn.send({"type": "message", "id": "m1", "payload": {"message": words(500)}})  # about 10 s
    await conn.until(lambda f: f["type"] == "stream_chunk")
    for frame in sent:
        await conn.send(frame)
    refused = await conn.until(lambda f: f["type"] == "error")
    assert refused[-1]["id"] == "m1" and refused[-1]["code"] == code and "agent" not in refused[-1], refused[-1]
    session.drop()
    conn_b = await session.resume(url=b.url)
    assert conn_b.connected["resumed"] is True
    await conn_b.until(lambda f: f["type"] == "stream_chunk")  # B follows A's reply
    a.proc.kill()
    await asyncio.to_thread(a.proc.wait, 10)
    await conn_b.until_ended({message_id: ["assistant"] for message_id in lost}, timeout=PRODUCER_TIMEOUT + 3)
    for message_id in lost:
        end = session.transcript.end(message_id, "assistant")
        assert end is not None and end["type"] == "error" and end["code"] == "producer_lost", end
    session.transcript.assert_complete()


def _log(*frames: dict[str, Any]) -> list[str]:
    return [json.dumps({**frame, "seq": seq}) for seq, frame in enumerate(frames, 1)]


def test_only_the_drains_refusal_of_a_queued_message_ends_it_in_the_log() -> None:
    # What the log says of a pending message with an error that names no agent: the drain refuses
    # the messages still queued (server_shutting_down), and ends them; any other such error with
    # its id refused a new message with that id (PROTOCOL.md §5), and one being answered is never
    # refused (the drain lets it finish, or cancels it).
    ack = {"type": "ack", "id": "m1", "message_number": 1}
    start = {"type": "stream_start", "id": "m1", "agent": "a"}
    for code in ("unknown_agent", "rate_limited", "queue_full", "invalid_message", "not_found"):
        refused = {"type": "error", "id": "m1", "code": code}
        assert unfinished(_log(ack, start, refused), [("m1", 1, None)]) == [("m1", frozenset(), None)], code
        assert unfinished(_log(ack, refused), [("m1", 1, None)]) == [("m1", frozenset(), None)], code
    drained = {"type": "error", "id": "m1", "code": "server_shutting_down"}
    assert unfinished(_log(ack, drained), [("m1", 1, None)]) == []  # refused while queued
    # Being answered when a new m1 was refused during the drain: still unfinished.
    assert unfinished(_log(ack, start, drained), [("m1", 1, None)]) == [("m1", frozenset(), None)]
