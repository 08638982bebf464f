"""Held messages and cancels on a follower (process B) against one process, for sequences the heldq tests left out.

As tests/test_held3.py: the client's session answers m1 (80 chunks) on process A, the client
drops (after A queued what ``pre`` names behind m1) and resumes on B, which follows A's reply
and holds what the client sends meanwhile; the same client frames go to one process (the
``memory`` store, resuming there). What the client gets (the frames, less the chunks, in no
order) and the session's history must be the same.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from gated_agent import Gate
from redis_server import (
    RedisServer,
    redis_server_fixture,  # noqa: F401  (a fixture)
)
from resume_helpers import Clients, ResumeSession, clients_fixture, words  # noqa: F401  (a fixture)
from test_redis_held import (  # noqa: F401  (launch: a fixture)
    following,
    launch,
    settled_outline,
)

from connic.stores.redis.log import unfinished

aioredis = pytest.importorskip("redis.asyncio", reason="redis-py is not installed (pip install 'connic[redis]')")

_GATE = "gate"  # the id of the cancel whose not_found says what was sent before it is counted (_run)
_QUEUED = "queued on A"  # the text of the messages queued on A behind m1
_GATED_AGENT = f"{Path(__file__).with_name('gated_agent.py')}:GatedEcho"


async def _run(
    a: Any, b: Any, clients: Clients, pre: list[str], sent: list[str], gate: Gate | None = None
) -> tuple[Any, ...]:
    """What the client gets when ``sent`` (a cancel: "-id", a ping: "?") goes to ``b`` while ``a`` answers m1.

    ``gate``: what the replies to the messages in ``pre`` wait for (:mod:`gated_agent`), opened
    once ``b`` has read what ``sent`` holds; else they are answered at once.
    """
    session = ResumeSession(clients, a.url)
    conn = await session.start()
    await conn.send({"type": "message", "id": "m1", "payload": {"message": words(80)}})
    while len(session.transcript.chunks("m1", "assistant")) < 5:
        await conn.recv()
    for message_id in pre:
        await conn.send({"type": "message", "id": message_id, "payload": {"message": _QUEUED}})
        await conn.until(lambda f, message_id=message_id: f["type"] == "ack" and f["id"] == message_id)
    session.drop()
    conn = await session.resume(url=b.url)
    assert conn.connected["resumed"] is True
    seen = len(session.transcript.chunks("m1", "assistant"))
    while len(session.transcript.chunks("m1", "assistant")) < seen + 5:  # m1 still streams
        await conn.recv()
    for item in sent:
        if item == "?":  # a round trip: what the server does with the frames before is under way
            await conn.send({"type": "ping"})
            await conn.until_type("pong")
        elif item.startswith("-"):
            await conn.send({"type": "cancel", "id": item[1:]})
        else:
            await conn.send({"type": "message", "id": item, "payload": {"message": f"{item} text"}})
    if gate is not None:
        # A cancel of no message, answered not_found: read after what came before it (on B
        # passed to A, in order, and answered through its log), so what was sent is counted
        # while what A queued still waits.
        await conn.send({"type": "cancel", "id": _GATE})
        await conn.until(lambda f: f["type"] == "error" and f["id"] == _GATE and f["code"] == "not_found", timeout=15)
        gate.open()
    await conn.until_ended({"m1": ["assistant"]}, timeout=15)
    return await settled_outline(session, conn)


async def _compare(
    start: Any, clients: Clients, max_queued: int, pre: list[str], sent: list[str], gated: bool = False
) -> Counter[Any]:
    """What the client gets on two processes, the same as on one (:func:`_run`, ``gated``: with a gate)."""
    gates = (await Gate().start(), await Gate().start()) if gated else (None, None)
    try:

        def agent(gate: Gate | None) -> dict[str, str]:
            if gate is None:
                return {}
            return {"agent": f'use = "{_GATED_AGENT}"\ngate = {gate.port}\ngated = "{_QUEUED}"'}

        one = await start(f"max_queued = {max_queued}", shared=False, **agent(gates[0]))
        a = await start(f"max_queued = {max_queued}", **agent(gates[1]))
        b = await start(f"max_queued = {max_queued}", **agent(gates[1]))
        alone = await _run(one, one, clients, pre, sent, gates[0])
        shared = await _run(a, b, clients, pre, sent, gates[1])
    finally:
        for gate in gates:
            if gate is not None:
                await gate.close()
    assert shared == alone, (max_queued, pre, sent)
    frames: Counter[Any] = shared[0]
    return frames


# A message A queued (m2) and a held one sharing its id, the held one refused queue_full (A's
# counts for max_queued), then a cancel of m2: on one process it drops A's queued m2, so it
# answers no not_found (PROTOCOL.md §5). B held it behind its m2 and passed it to A, which
# dropped its m2: the held cancel then found only a refused message, and said not_found.
_OWNER_QUEUED = {
    "refused right before": (["m2"], ["m2", "-m2"]),
    "refused, others between": (["m2"], ["-m3", "m3", "m2", "-m2", "m4"]),
}


@pytest.mark.parametrize("case", _OWNER_QUEUED)
async def test_a_held_cancel_that_drops_a_message_the_owner_queued_answers_no_not_found(
    launch: Any,  # noqa: F811  (the fixture imported above)
    clients: Clients,
    case: str,
) -> None:
    pre, sent = _OWNER_QUEUED[case]
    frames = await _compare(launch, clients, 1, pre, sent)
    assert frames[("error", "m2", None, None, "not_found")] == 0, frames
    assert frames[("error", "m2", None, None, "queue_full")] == 1, frames


# A cancel of the message A answers (m1) while A has messages queued behind it: on one process
# the cancelled reply ends at once and the next queued one begins, so what the client sends
# once the cancel was handled (a ping's round trip after it) finds one message fewer queued
# (PROTOCOL.md §5). B counted the queued ones until it followed m1's end from A's log (a
# round trip through Redis, A and its log writer), and refused queue_full what one process accepts.
# The queued replies wait (a gate) until what was sent after the cancel is counted: answered
# in 60 ms, they could end before it came, under load on one run and not the other, and the
# room they left let in a message the other run refused.
_IN_FLIGHT = {
    "the queued one begins": (1, ["m2"], ["-m1", "?", "m3"]),
    "one with its id queued": (2, ["m1", "m2"], ["-m1", "?", "m3", "m4"]),
}


# With A's queued replies held back, one process always refuses m4 (queue_full: the second m1
# answered, m2 and m3 queued). B read A's record once the cancel was passed: under load one A
# saved after taking it (the second m1 begun, or the first one's cancelled end numbered), and B
# applied the cancel (and that end) to it again, stopping the second m1 too: it accepted m4.
@pytest.mark.parametrize("case", _IN_FLIGHT)
async def test_a_cancel_of_the_owners_reply_makes_room_where_it_came(
    launch: Any,  # noqa: F811  (the fixture imported above)
    clients: Clients,
    case: str,
) -> None:
    max_queued, pre, sent = _IN_FLIGHT[case]
    frames = await _compare(launch, clients, max_queued, pre, sent, gated=True)
    assert frames[("stream_end", "m1", None, "cancelled", None)] == 1, frames
    assert frames[("error", "m3", None, None, "queue_full")] == 0, frames
    # The message after it finds the queue full again (max_queued 2: the second m1 answered, m2 and m3 queued).
    assert frames[("error", "m4", None, None, "queue_full")] == (1 if "m4" in sent else 0), frames


async def test_each_cancel_passed_to_the_owner_gets_its_own_answer(
    launch: Any,  # noqa: F811  (the fixture imported above)
    clients: Clients,
    redis_server: RedisServer,
) -> None:
    # PROTOCOL.md §5: a cancel of an id neither queued nor in flight answers not_found, each one,
    # as on one process. B passes them to A, whose reply it follows; they wait for A together when
    # A is slow to take them (stopped here for a moment: a busy event loop, a long GC pause).
    a, b = await launch(), await launch()
    session, conn = await following(a, b, clients, words(200))
    redis = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    a.proc.send_signal(signal.SIGSTOP)
    try:
        for message_id in ("m9", "m9", "m8"):
            await conn.send({"type": "cancel", "id": message_id})
        cancels = f"connic:{{{session.session_id}}}:cancel"
        deadline = time.monotonic() + 5
        while not await _passed_all(redis, cancels):  # passed to A, which takes none while stopped
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


async def _passed_all(redis: Any, key: str) -> bool:
    # The three cancels wait in Redis: a set holds m9 once (m8 passed last), a list all three.
    kind = await redis.type(key)
    if kind == "set":
        return bool(await redis.scard(key) == 2)
    return kind == "list" and bool(await redis.llen(key) == 3)


# A session whose owner dies answering a message whose id an earlier message had, its record
# written by an earlier version (no list of its pending messages, as tests/test_held3.py makes
# it): the frames sent before the last, then what the client sent last, and how many of the
# m1 replies the dead owner left unfinished (each ends producer_lost, PROTOCOL.md §7).
_REUSED = {
    "answered, then sent again": (["hi"], words(500), 1),
    "sent again while it streams": ([words(500)], "again", 2),
}


@pytest.mark.parametrize("case", _REUSED)
async def test_a_record_without_its_pending_messages_ends_a_message_reusing_an_answered_id(
    launch: Any,  # noqa: F811  (the fixture imported above)
    clients: Clients,
    redis_server: RedisServer,
    case: str,
) -> None:
    # The log alone told the messages sharing an id apart by nothing: the first one's end made
    # the one in flight (or queued) look ended, and its client waited for it for ever.
    before, last, lost = _REUSED[case]
    a, b = await launch("producer_timeout = 2"), await launch("producer_timeout = 2")
    session = ResumeSession(clients, a.url)
    conn = await session.start()
    for text in before:
        await conn.send({"type": "message", "id": "m1", "payload": {"message": text}})
        await conn.until(lambda f: f["type"] in ("stream_end", "stream_chunk") and f["id"] == "m1")
    if before == ["hi"]:
        await conn.until_ended({"m1": ["assistant"]})
    await conn.send({"type": "message", "id": "m1", "payload": {"message": last}})
    await conn.until(lambda f: f["type"] == "ack" and f["message_number"] == 2)
    redis = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        keys = f"connic:{{{session.session_id}}}"
        seq = session.transcript.last_seq
        deadline = time.monotonic() + 5
        while not (
            len(json.loads(await redis.get(f"{keys}:record"))["pending"]) == lost
            and await redis.xrange(f"{keys}:log", f"0-{seq}", "+")
        ):
            assert time.monotonic() < deadline, "A never wrote what its client got"
            await asyncio.sleep(0.01)
        session.drop()
        a.proc.kill()
        await asyncio.to_thread(a.proc.wait, 10)
        record = json.loads(await redis.get(f"{keys}:record"))
        del record["pending"]  # as an earlier version wrote it
        assert await redis.set(f"{keys}:record", json.dumps(record), keepttl=True)
    finally:
        await redis.aclose()
    conn = await session.resume(url=b.url)  # taken over once A's lease runs out
    assert conn.connected["resumed"] is True
    await conn.until(
        lambda f: sum(1 for g in session.transcript.ordered() if g.get("code") == "producer_lost") == lost, timeout=10
    )
    await conn.send({"type": "message", "id": "m9", "payload": {"message": "after"}})  # the session goes on
    await conn.until_ended({"m9": ["assistant"]})
    assert [f["id"] for f in session.transcript.ordered() if f.get("code") == "producer_lost"] == ["m1"] * lost
    session.transcript.assert_complete()


def _log(*frames: dict[str, Any]) -> list[str]:
    return [json.dumps({**frame, "seq": seq}) for seq, frame in enumerate(frames, 1)]


def test_read_from_the_log_alone_messages_sharing_an_id_are_told_apart() -> None:
    # What the takeover above reads (unfinished() without the record's pending list), one case more:
    # the log lost the first m1's ack (its reply is longer than the log), a second m1 in flight.
    first, second = ({"type": "ack", "id": "m1", "message_number": n} for n in (1, 2))
    start = {"type": "stream_start", "id": "m1", "agent": "a"}
    chunk = {"type": "stream_chunk", "id": "m1", "agent": "a", "delta": "w"}
    end = {"type": "stream_end", "id": "m1", "agent": "a", "finish_reason": "stop"}
    assert unfinished(_log(first, start, end, second, start, chunk)) == [("m1", frozenset(), None)]
    assert unfinished(_log(first, start, second, chunk, end)) == [
        ("m1", frozenset({"a"}), None),
        ("m1", frozenset(), None),
    ]
    assert unfinished(_log(chunk, end, second, start)) == [("m1", frozenset(), None)]
