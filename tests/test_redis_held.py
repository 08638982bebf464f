"""Messages a resume on process B *holds* while it follows a reply process A answers (PROTOCOL.md §5, §7).

B holds what the client sends until it takes the session over (A's reply ended); a ``cancel``
sent meanwhile must act as it would on one process: a cancelled queued message is dropped (its
``ack``, nothing else: it never starts), and when a held message shares its id with A's message
in flight, the cancel stops A's reply and the held message is answered after it. Each scenario
runs twice with the same client frames: on one process (the built-in ``memory`` store, the
client resuming on the same process) and on two ``python -m connic run`` processes sharing a
real ``redis-server`` (the client resuming on B); what the client gets must be the same.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from redis_server import (
    RedisServer,
    redis_server_fixture,  # noqa: F401  (a fixture)
    store_plugin_env,
)
from resume_helpers import (
    Clients,
    Conn,
    ResumeSession,
    clients_fixture,  # noqa: F401  (a fixture)
    words,
)

from conftest import SECRET, CliServer, start_cli

aioredis = pytest.importorskip("redis.asyncio", reason="redis-py is not installed (pip install 'connic[redis]')")

Frame = dict[str, Any]


@pytest.fixture
def launch(tmp_path: Path, redis_server: RedisServer) -> Iterator[Any]:
    """Start ``python -m connic run`` processes (connector keys: TOML lines), sharing ``redis_server``
    unless ``shared`` is false (the ``memory`` store); stopped after. ``agent``: the TOML lines of
    its one agent, ``assistant`` (echo, 20 ms a word, by default)."""
    env = store_plugin_env(tmp_path / "plugins")
    started: list[CliServer] = []

    async def start(*connector: str, shared: bool = True, agent: str = 'use = "echo"\ndelay = 0.02') -> CliServer:
        config = tmp_path / f"connic-{len(started)}.toml"
        store = f'[store]\nuse = "redis"\nurl = "{redis_server.url}"\n' if shared else ""
        config.write_text(
            f"[agents.assistant]\n{agent}\n"
            f'[[connectors]]\npath = "/ws"\nsecrets = ["{SECRET}"]\n'
            + "".join(f"{line}\n" for line in connector)
            + store
        )
        server = await asyncio.to_thread(start_cli, "--config", str(config), env=env)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop(signal.SIGKILL if server.proc.poll() is None else signal.SIGTERM)


async def resumed_mid_reply(launch: Any, clients: Clients, shared: bool, *connector: str) -> tuple[ResumeSession, Conn]:
    """A session answering ``m1`` (80 chunks, 20 ms apart), its client dropped and resumed mid-reply.

    ``shared``: on a second process sharing Redis, which follows the first one's reply (and
    holds what the client sends meanwhile); else on the same process, the ``memory`` store.
    """
    a = await launch(*connector, shared=shared)
    b = await launch(*connector) if shared else a
    session = ResumeSession(clients, a.url)
    conn = await session.start()
    await conn.send({"type": "message", "id": "m1", "payload": {"message": words(80)}})
    while len(session.transcript.chunks("m1", "assistant")) < 5:
        await conn.recv()
    session.drop()
    conn_b = await session.resume(url=b.url)
    assert conn_b.connected["resumed"] is True
    seen = len(session.transcript.chunks("m1", "assistant"))
    while len(session.transcript.chunks("m1", "assistant")) < seen + 5:  # m1 still streams: m2 waits behind it
        await conn_b.recv()
    return session, conn_b


async def following(a: Any, b: Any, clients: Clients, message: str) -> tuple[ResumeSession, Conn]:
    """A session answering ``message`` as ``m1`` on ``a``, its client dropped after 5 chunks and
    resumed on ``b``, which follows ``a``'s reply (a chunk of it came through ``b``)."""
    session = ResumeSession(clients, a.url)
    conn = await session.start()
    await conn.send({"type": "message", "id": "m1", "payload": {"message": message}})
    while len(session.transcript.chunks("m1", "assistant")) < 5:
        await conn.recv()
    session.drop()
    conn = await session.resume(url=b.url)
    assert conn.connected["resumed"] is True
    await conn.until(lambda f: f["type"] == "stream_chunk")  # B follows A's reply
    return session, conn


def outline(session: ResumeSession) -> Counter[tuple[Any, ...]]:
    """The frames the client got, without the chunks (how many a cancelled reply had is timing) and
    in no order: B acks what it held once it took the session over, after the frames of m1."""
    return Counter(
        (f["type"], f.get("id"), f.get("message_number"), f.get("finish_reason"), f.get("code"))
        for f in session.transcript.ordered()
        if f["type"] != "stream_chunk"
    )


async def history(conn: Conn) -> list[tuple[Any, ...]]:
    """The session's history (PROTOCOL.md §8): who said what, for which message."""
    await conn.send({"type": "history"})
    frames = await conn.until_type("history")
    return [(e["role"], e["id"], e["message_number"]) for e in frames[-1]["entries"]]


_LAST = "z"  # the ids of the messages sent last by :func:`settled_outline` (left out of what it returns)


async def settled_outline(session: ResumeSession, conn: Conn) -> tuple[Counter[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """:func:`outline` and :func:`history`, once everything the client sent before settled.

    Everything before is settled once a message sent last is answered (it may be refused
    queue_full while held ones still wait: sent again then); the messages sent last are left out.
    """
    for n in range(1, 20):
        last = f"{_LAST}{n}"
        await conn.send({"type": "message", "id": last, "payload": {"message": "last"}})
        got = await conn.until(lambda f, last=last: f.get("id") == last and f["type"] in ("ack", "error"), timeout=15)
        if got[-1]["type"] == "ack":
            await conn.until_ended({last: ["assistant"]}, timeout=15)
            break
        await conn.until(lambda f: f["type"] == "stream_end", timeout=15)  # a queued one began: room again
    else:
        pytest.fail("the message sent last was never accepted")
    session.transcript.assert_complete()
    frames = Counter({key: n for key, n in outline(session).items() if not str(key[1]).startswith(_LAST)})
    entries = [entry for entry in await history(conn) if not str(entry[1]).startswith(_LAST)]
    return frames, entries


_QUEUED = {"default": (), "max_queued=1": ("max_queued = 1",)}


@pytest.mark.parametrize("queued", _QUEUED)
async def test_a_held_message_cancelled_behind_it_never_starts(launch: Any, clients: Clients, queued: str) -> None:
    # PROTOCOL.md §5: a queued message's cancel drops it: its ack, no other frame; it is not in
    # the history. B takes the session over once m1 ended, idle: m2 must not start meanwhile.
    got = {}
    for shared in (False, True):
        session, conn = await resumed_mid_reply(launch, clients, shared, *_QUEUED[queued])
        await conn.send({"type": "message", "id": "m2", "payload": {"message": "dropped"}})
        await conn.send({"type": "cancel", "id": "m2"})
        await conn.until_ended({"m1": ["assistant"]}, timeout=15)
        await conn.send({"type": "message", "id": "m3", "payload": {"message": "after"}})
        await conn.until_ended({"m3": ["assistant"]})
        m2 = session.transcript.of("m2")
        assert [(f["type"], f.get("message_number")) for f in m2] == [("ack", 2)], (shared, m2)
        session.transcript.assert_complete()
        got[shared] = (outline(session), await history(conn))
    assert got[True] == got[False]
    assert got[True][1] == [("user", "m1", 1), ("agent", "m1", 1), ("user", "m3", 3), ("agent", "m3", 3)]


async def test_a_cancel_of_an_id_the_owner_answers_and_a_held_message_share_stops_the_owners_reply(
    launch: Any, clients: Clients
) -> None:
    # docs/protocol.md "Cancelling": ids need not be unique; when several messages share the id,
    # the one in flight is cancelled (if its agents still run), the queued one is answered after it.
    got, ends = {}, {}
    for shared in (False, True):
        session, conn = await resumed_mid_reply(launch, clients, shared)
        await conn.send({"type": "message", "id": "m1", "payload": {"message": "again"}})
        await conn.send({"type": "cancel", "id": "m1"})
        await conn.until_ended({"m1": ["assistant"]}, timeout=15)
        await conn.send({"type": "message", "id": "m3", "payload": {"message": "after"}})
        await conn.until_ended({"m3": ["assistant"]})  # answered after any message before it
        session.transcript.assert_complete()
        got[shared] = (outline(session), await history(conn))
        ends[shared] = [
            (f["finish_reason"], f["full_response"]) for f in session.transcript.of("m1") if f["type"] == "stream_end"
        ]
    assert got[True] == got[False]
    for shared in (False, True):
        assert [reason for reason, _ in ends[shared]] == ["cancelled", "stop"] and ends[shared][1][1] == "again", shared


async def test_a_held_cancel_left_by_a_dead_owner_is_settled_by_the_follower_alone(
    launch: Any, clients: Clients, redis_server: RedisServer
) -> None:
    # The owner dies before taking the cancel passed to it ({"held": id} in the session's cancel
    # set): the follower takes the session over once its lease runs out, and the set with it.
    # The held message is dropped as a queued one (its ack); nobody answers the cancel not_found.
    a, b = await launch("producer_timeout = 2"), await launch("producer_timeout = 2")
    session = ResumeSession(clients, a.url)
    conn = await session.start()
    await conn.send({"type": "message", "id": "m1", "payload": {"message": words(500)}})
    while len(session.transcript.chunks("m1", "assistant")) < 5:
        await conn.recv()
    session.drop()
    conn_b = await session.resume(url=b.url)
    assert conn_b.connected["resumed"] is True
    await conn_b.until_type("stream_chunk")  # B follows A's reply
    a.proc.kill()
    a.proc.wait(10)
    await conn_b.send({"type": "message", "id": "m1", "payload": {"message": "again"}})
    await conn_b.send({"type": "cancel", "id": "m1"})
    redis = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        cancels = f"connic:{{{session.session_id}}}:cancel"
        deadline = time.monotonic() + 5
        while not await redis.exists(cancels):  # passed to A, which is dead
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        assert await redis.lrange(cancels, 0, -1) == ['{"held": "m1"}']
    finally:
        await redis.aclose()
    await conn_b.until(lambda f: f["type"] == "ack" and f["message_number"] == 2, timeout=10)
    await conn_b.send({"type": "message", "id": "m3", "payload": {"message": "after"}})
    await conn_b.until_ended({"m3": ["assistant"]})
    frames = [(f["type"], f.get("message_number"), f.get("code")) for f in session.transcript.of("m1")]
    assert [f for f in frames if f[0] != "stream_chunk"] == [
        ("ack", 1, None),
        ("stream_start", None, None),
        ("error", None, "producer_lost"),
        ("ack", 2, None),
    ], frames
    assert session.transcript.of("m3")[0]["message_number"] == 3
    session.transcript.assert_complete()


# What the client sends while m1 streams: messages (id, agent named) and one cancel of m2 last.
# m2 is refused when it names an agent the connector lacks (unknown_agent: never acked).
_SHARING = {
    "both accepted": [("m2", None), ("m3", None), ("m2", None)],
    "first refused": [("m2", "nobody"), ("m3", None), ("m2", None)],
    "second refused": [("m2", None), ("m3", None), ("m2", "nobody")],
    "both refused": [("m2", "nobody"), ("m3", None), ("m2", "nobody")],
}


@pytest.mark.parametrize("sent", _SHARING)
async def test_a_cancel_drops_every_held_message_with_its_id(launch: Any, clients: Clients, sent: str) -> None:
    # docs/protocol.md "Cancelling": ids need not be unique; with no message of that id in flight,
    # a cancel drops every queued message that has it (their acks, nothing else), and answers
    # not_found only when none was queued (each one refused). B held the cancel right behind the
    # first held m2 only: the second was answered, and a refused first one got not_found.
    got = {}
    for shared in (False, True):
        session, conn = await resumed_mid_reply(launch, clients, shared)
        for message_id, agent in _SHARING[sent]:
            payload = {"message": f"{message_id} text"} | ({"agent": agent} if agent else {})
            await conn.send({"type": "message", "id": message_id, "payload": payload})
        await conn.send({"type": "cancel", "id": "m2"})
        await conn.until_ended({"m1": ["assistant"], "m3": ["assistant"]}, timeout=15)
        await conn.send({"type": "message", "id": "m4", "payload": {"message": "after"}})
        await conn.until_ended({"m4": ["assistant"]})
        m2 = [(f["type"], f.get("code")) for f in session.transcript.of("m2")]
        assert ("stream_start", None) not in m2, (shared, m2)
        session.transcript.assert_complete()
        got[shared] = (outline(session), await history(conn))
    assert got[True] == got[False], sent
    assert [entry[:2] for entry in got[True][1]] == [
        ("user", "m1"),
        ("agent", "m1"),
        ("user", "m3"),
        ("agent", "m3"),
        ("user", "m4"),
        ("agent", "m4"),
    ]
    not_found = got[True][0][("error", "m2", None, None, "not_found")]
    assert not_found == (1 if sent == "both refused" else 0), got[True][0]


async def test_a_cancel_the_owner_takes_leaves_every_held_message_with_its_id_to_be_answered(
    launch: Any, clients: Clients
) -> None:
    # The one in flight comes first: the cancel stops the owner's m1, and neither held m1 (each
    # with the cancel held behind it on B) is dropped: both are answered after it, as on one process.
    got = {}
    for shared in (False, True):
        session, conn = await resumed_mid_reply(launch, clients, shared)
        for text in ("again", "and again"):
            await conn.send({"type": "message", "id": "m1", "payload": {"message": text}})
        await conn.send({"type": "cancel", "id": "m1"})
        await conn.until(
            lambda f: f["type"] == "stream_end" and f["id"] == "m1" and f["full_response"] == "and again", timeout=15
        )
        session.transcript.assert_complete()
        got[shared] = (outline(session), await history(conn))
        ends = [
            (f["finish_reason"], f["full_response"]) for f in session.transcript.of("m1") if f["type"] == "stream_end"
        ]
        assert [reason for reason, _ in ends] == ["cancelled", "stop", "stop"] and ends[1][1] == "again", (shared, ends)
    assert got[True] == got[False]


# What the client sends while m1 streams (m2's cancel: "-m2"); with max_queued = N, one process
# queues N messages behind the reply in flight and refuses the rest with queue_full, and a cancel
# of a queued message makes room again. B holds them until A's reply ended: it must refuse the
# same ones, though its queue is empty when it takes the session over (the owner's reply counts).
_BEHIND = {
    "three": ["m2", "m3", "m4"],
    "four": ["m2", "m3", "m4", "m5"],
    "cancel makes room": ["m2", "-m2", "m3", "m4", "m5"],
}
_LIMITS = {
    "max_queued=1": ("max_queued = 1",),
    "max_queued=2": ("max_queued = 2",),
    "max_queued=1 rate_limit": ("max_queued = 1", "rate_limit = { messages = 100, per = 1 }"),
}


@pytest.mark.parametrize("sent", _BEHIND)
@pytest.mark.parametrize("limits", _LIMITS)
async def test_held_messages_are_refused_queue_full_as_behind_the_owners_reply(
    launch: Any, clients: Clients, limits: str, sent: str
) -> None:
    # PROTOCOL.md §5: max_queued counts the messages waiting behind the one answered. B admits
    # what it held after A's reply ended: the ones that would not have fit behind it are refused.
    # (A rate limit makes B's admission wait on Redis: its answering task runs meanwhile.)
    got = {}
    for shared in (False, True):
        session, conn = await resumed_mid_reply(launch, clients, shared, *_LIMITS[limits])
        for message_id in _BEHIND[sent]:
            if message_id.startswith("-"):
                await conn.send({"type": "cancel", "id": message_id[1:]})
            else:
                await conn.send({"type": "message", "id": message_id, "payload": {"message": f"{message_id} text"}})
        await conn.until_ended({"m1": ["assistant"]}, timeout=15)
        cancelled = {message_id[1:] for message_id in _BEHIND[sent] if message_id.startswith("-")}
        messages = [message_id for message_id in _BEHIND[sent] if not message_id.startswith("-")]
        while not all(settled(session, message_id, message_id in cancelled) for message_id in messages):
            await conn.recv()
        session.transcript.assert_complete()
        got[shared] = (outline(session), await history(conn))
    assert got[True] == got[False], (limits, sent)
    refused = {key[1] for key in got[True][0] if key[4] == "queue_full"}
    assert refused == behind_reply(_BEHIND[sent], int(limits[len("max_queued=")])), got[True][0]


def behind_reply(sent: list[str], max_queued: int) -> set[str]:
    """The messages refused queue_full when ``sent`` comes while a reply runs: room for ``max_queued``."""
    queued: list[str] = []
    refused = set()
    for message_id in sent:
        if message_id.startswith("-"):
            queued.remove(message_id[1:])
        elif len(queued) < max_queued:
            queued.append(message_id)
        else:
            refused.add(message_id)
    return refused


def settled(session: ResumeSession, message_id: str, cancelled: bool) -> bool:
    """Whether a message sent while m1 streamed is done with: refused, answered, or acked and ``cancelled``."""
    kinds = [f["type"] for f in session.transcript.of(message_id)]
    return "error" in kinds or "stream_end" in kinds or (cancelled and kinds == ["ack"])
