"""More of what a resume on process B *holds* while it follows a reply process A answers (PROTOCOL.md §5, §7).

As tests/test_redis_held.py: each scenario runs twice with the same client frames, on one
process (the ``memory`` store, the client resuming on the same process) and on two
``python -m connic run`` processes sharing a real ``redis-server`` (the client resuming on B);
what the client gets must be the same. Here:

- messages A had *queued* behind its reply when the client dropped count for ``max_queued``
  when B admits what it held (B reads them from the session's record in Redis);
- a session record written by an earlier version, which does not list its pending messages:
  the replies a dead owner left unfinished are read from the log alone, and end ``producer_lost``;
- held messages that share an id, with a cancel of it held behind each: the room it makes comes
  where the client sent it.
"""

from __future__ import annotations

import asyncio
import json
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
from test_redis_held import (  # noqa: F401  (launch: a fixture)
    behind_reply,
    history,
    launch,
    outline,
    resumed_mid_reply,
    settled,
)

from connic.stores.redis.log import unfinished

aioredis = pytest.importorskip("redis.asyncio", reason="redis-py is not installed (pip install 'connic[redis]')")

# What the client sends to B while A's m1 streams (a cancel: "-id"), after m2 was accepted and
# queued on A behind m1 before the client dropped.
_AFTER_QUEUED = {
    "two more": ["m3", "m4"],
    "the queued one cancelled": ["m3", "-m2", "m4", "m5"],
}


@pytest.mark.parametrize("sent", _AFTER_QUEUED)
@pytest.mark.parametrize("max_queued", [1, 2])
async def test_messages_the_owner_queued_count_for_max_queued_on_the_follower(
    launch: Any,  # noqa: F811  (the fixture imported above)
    clients: Clients,
    max_queued: int,
    sent: str,
) -> None:
    # PROTOCOL.md §5: max_queued counts every message waiting behind the one answered, m2 too,
    # which A queued: B, which cannot see A's queue, must refuse the same ones queue_full.
    got = {}
    for shared in (False, True):
        a = await launch(f"max_queued = {max_queued}", shared=shared)
        b = await launch(f"max_queued = {max_queued}") if shared else a
        session = ResumeSession(clients, a.url)
        conn = await session.start()
        await conn.send({"type": "message", "id": "m1", "payload": {"message": words(80)}})
        while len(session.transcript.chunks("m1", "assistant")) < 5:
            await conn.recv()
        await conn.send({"type": "message", "id": "m2", "payload": {"message": "queued on A"}})
        await conn.until(lambda f: f["type"] == "ack" and f["id"] == "m2")
        session.drop()
        conn = await session.resume(url=b.url)
        assert conn.connected["resumed"] is True
        seen = len(session.transcript.chunks("m1", "assistant"))
        while len(session.transcript.chunks("m1", "assistant")) < seen + 5:  # m1 still streams, m2 waits
            await conn.recv()
        for message_id in _AFTER_QUEUED[sent]:
            if message_id.startswith("-"):
                await conn.send({"type": "cancel", "id": message_id[1:]})
            else:
                await conn.send({"type": "message", "id": message_id, "payload": {"message": f"{message_id} text"}})
        await conn.until_ended({"m1": ["assistant"]}, timeout=15)
        sent_all = ["m2", *_AFTER_QUEUED[sent]]
        cancelled = {message_id[1:] for message_id in sent_all if message_id.startswith("-")}
        messages = [message_id for message_id in sent_all if not message_id.startswith("-")]
        while not all(settled(session, message_id, message_id in cancelled) for message_id in messages):
            await conn.recv()
        session.transcript.assert_complete()
        got[shared] = (outline(session), await history(conn))
    assert got[True] == got[False], (max_queued, sent)
    refused = {key[1] for key in got[True][0] if key[4] == "queue_full"}
    assert refused == behind_reply(["m2", *_AFTER_QUEUED[sent]], max_queued), got[True][0]


# A session whose owner dies mid-reply, its record written by an earlier version (without the
# list of its pending messages): the frames sent after m1, the frame that answers the last one,
# and the messages whose replies the dead owner leaves unfinished.
_OLD_RECORD: dict[str, tuple[list[dict[str, Any]], tuple[str, str], list[str]]] = {
    "its reply": ([], ("stream_chunk", "m1"), ["m1"]),
    "a message queued behind it": (
        [{"type": "message", "id": "m2", "payload": {"message": "queued"}}],
        ("ack", "m2"),
        ["m1", "m2"],
    ),
    "a refused message with its id": (
        [{"type": "message", "id": "m1", "payload": {"message": "again", "agent": "nobody"}}],
        ("error", "m1"),
        ["m1"],
    ),
}


@pytest.mark.parametrize("case", _OLD_RECORD)
async def test_a_record_without_its_pending_messages_still_gets_the_dead_owners_replies_ended(
    launch: Any,  # noqa: F811  (the fixture imported above)
    clients: Clients,
    redis_server: RedisServer,
    case: str,
) -> None:
    # PROTOCOL.md §7: each reply a dead process left unfinished ends with producer_lost. A record
    # that does not list its pending messages has them read from the log alone: the message
    # answered last, and those acked after it (queued behind it). A message refused (not acked)
    # that reused its id ends nothing, as on one process.
    sent, answer, lost = _OLD_RECORD[case]
    a, b = await launch("producer_timeout = 2"), await launch("producer_timeout = 2")
    session = ResumeSession(clients, a.url)
    conn = await session.start()
    await conn.send({"type": "message", "id": "m1", "payload": {"message": words(500)}})  # about 10 s
    await conn.until(lambda f: f["type"] == "stream_chunk")
    for frame in sent:
        await conn.send(frame)
    await conn.until(lambda f: (f["type"], f.get("id")) == answer)
    redis = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        keys = f"connic:{{{session.session_id}}}"
        # Until A wrote what the client got (its record and its log), then it dies.
        seq = session.transcript.last_seq
        deadline = time.monotonic() + 5
        while not (
            len(json.loads(await redis.get(f"{keys}:record"))["pending"]) == len(lost)
            and await redis.xrange(f"{keys}:log", f"0-{seq}", "+")
        ):
            assert time.monotonic() < deadline, "A never wrote what its client got"
            await asyncio.sleep(0.01)
        session.drop()
        a.proc.kill()
        await asyncio.to_thread(a.proc.wait, 10)
        # The record as an earlier version wrote it: no list of the pending messages.
        record = json.loads(await redis.get(f"{keys}:record"))
        del record["pending"]
        assert await redis.set(f"{keys}:record", json.dumps(record), keepttl=True)
    finally:
        await redis.aclose()
    conn_b = await session.resume(url=b.url)  # taken over once A's lease runs out
    assert conn_b.connected["resumed"] is True
    await conn_b.until_ended({message_id: ["assistant"] for message_id in lost}, timeout=10)
    ends = {
        message_id: [(f["type"], f.get("code")) for f in session.transcript.of(message_id) if f.get("agent")][-1]
        for message_id in lost
    }
    assert ends == dict.fromkeys(lost, ("error", "producer_lost")), ends
    assert [f["id"] for f in session.transcript.ordered() if f.get("code") == "producer_lost"] == lost
    await conn_b.send({"type": "message", "id": "m9", "payload": {"message": "after"}})  # the session goes on
    await conn_b.until_ended({"m9": ["assistant"]})
    session.transcript.assert_complete()


def _log(*frames: dict[str, Any]) -> list[str]:
    return [json.dumps({**frame, "seq": seq}) for seq, frame in enumerate(frames, 1)]


def test_read_from_the_log_alone_only_the_drains_refusal_of_a_queued_message_ends_it() -> None:
    # A record without its pending messages (an earlier version's): unfinished() reads the log
    # alone, by the same rule as for a listed message (test_redis_ids.py): an error that names
    # no agent ends a message only when it is the drain's refusal of it while queued.
    ack = {"type": "ack", "id": "m1", "message_number": 1}
    start = {"type": "stream_start", "id": "m1", "agent": "a"}
    for code in ("unknown_agent", "rate_limited", "queue_full", "invalid_message", "not_found"):
        refused = {"type": "error", "id": "m1", "code": code}
        assert unfinished(_log(ack, start, refused)) == [("m1", frozenset(), None)], code
        assert unfinished(_log(ack, refused)) == [("m1", frozenset(), None)], code
    drained = {"type": "error", "id": "m1", "code": "server_shutting_down"}
    assert unfinished(_log(ack, drained)) == []  # refused while queued
    assert unfinished(_log(ack, start, drained)) == [("m1", frozenset(), None)]  # a new m1 refused
    queued = {"type": "ack", "id": "m2", "message_number": 2}
    end = {"type": "stream_end", "id": "m1", "agent": "a", "finish_reason": "stop"}
    assert unfinished(_log(ack, queued, start, end, {**drained, "id": "m2"})) == [("m1", frozenset({"a"}), None)]


# What the client sends to B while A's m1 streams (a cancel: "-id"): a cancel of a held message
# after other messages came (some sharing its id). B holds the cancel right behind each held
# message with its id, to drop it before it can start; the room it makes must come where the
# client sent it, as on one process: the messages sent before it still count it as queued.
_SHARED_IDS = {
    "a cancel after another message": ["m2", "m3", "-m2"],
    "two with its id": ["m2", "m2", "-m2"],
    "two with its id, one between": ["m2", "m3", "m2", "-m2"],
    "two with its id, a cancel between": ["m2", "-m2", "m2", "m3", "-m2", "m4"],
}


def one_process(sent: list[str], max_queued: int) -> tuple[list[str], list[str]]:
    """The messages refused queue_full and those answered when ``sent`` comes while a reply runs."""
    queued: list[str] = []
    refused = []
    for message_id in sent:
        if message_id.startswith("-"):
            queued = [queued_id for queued_id in queued if queued_id != message_id[1:]]
        elif len(queued) < max_queued:
            queued.append(message_id)
        else:
            refused.append(message_id)
    return refused, queued


def handled(session: ResumeSession, messages: int, answered: int) -> bool:
    """Whether each of the ``messages`` sent while m1 streamed was acked or refused, and ``answered`` of them ended."""
    got = [(f["type"], f.get("code")) for f in session.transcript.ordered() if f.get("id") != "m1"]
    acked = got.count(("ack", None)) + got.count(("error", "queue_full"))
    return acked == messages and got.count(("stream_end", None)) == answered


@pytest.mark.parametrize("sent", _SHARED_IDS)
@pytest.mark.parametrize("max_queued", [1, 2])
async def test_held_messages_sharing_an_id_with_a_cancel_behind_them_are_refused_as_on_one_process(
    launch: Any,  # noqa: F811  (the fixture imported above)
    clients: Clients,
    max_queued: int,
    sent: str,
) -> None:
    # PROTOCOL.md §5, docs/protocol.md "Cancelling": a cancel drops every queued message with its
    # id; max_queued counts them as queued until then. B drops each held one as it admits it.
    frames = _SHARED_IDS[sent]
    refused, answered = one_process(frames, max_queued)
    messages = [message_id for message_id in frames if not message_id.startswith("-")]
    got = {}
    for shared in (False, True):
        session, conn = await resumed_mid_reply(launch, clients, shared, f"max_queued = {max_queued}")
        for message_id in frames:
            if message_id.startswith("-"):
                await conn.send({"type": "cancel", "id": message_id[1:]})
            else:
                await conn.send({"type": "message", "id": message_id, "payload": {"message": f"{message_id} text"}})
        await conn.until_ended({"m1": ["assistant"]}, timeout=15)
        while not handled(session, len(messages), len(answered)):
            await conn.recv()
        session.transcript.assert_complete()
        got[shared] = (outline(session), await history(conn))
    assert got[True] == got[False], (max_queued, sent)
    assert sorted(key[1] for key in got[True][0].elements() if key[4] == "queue_full") == sorted(refused), got[True]
    assert [entry[1] for entry in got[True][1] if entry[0] == "user"] == ["m1", *answered], got[True]
