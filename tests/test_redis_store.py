"""The ``redis`` store: durable sessions that move between connic processes (PROTOCOL.md §7).

A real ``redis-server`` (tests/redis_server.py) on a free loopback port; "processes" are
connic apps in this test process, each with its own registry, store and TestServer, sharing
that one Redis. Clients are real ``websockets`` clients (tests/resume_helpers.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
import websockets
from redis_server import (
    RedisServer,
    redis_server_fixture,  # noqa: F401  (a fixture)
    store_plugin_env,
)
from resume_helpers import (
    Clients,
    ResumeSession,
    Transcript,
    clients_fixture,  # noqa: F401  (a fixture)
    words,
)

import connic
from conftest import ROOT, Server, StartServer, make_config
from connic.agent import HistoryEntry
from connic.registry import Registry
from connic.stores import SessionRecord
from connic.stores.redis import RedisStore
from connic.stores.redis.log import unfinished
from connic.stores.redis.record import decode, encode, encode_entry
from helpers import test_registry

aioredis = pytest.importorskip("redis.asyncio", reason="redis-py is not installed (pip install 'connic[redis]')")


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url


class Gated(connic.Agent):
    """Streams a word, waits until the test opens :attr:`gate`, then streams another."""

    gate: ClassVar[asyncio.Event]

    async def respond(self, turn: connic.Turn) -> AsyncIterator[str | connic.Usage]:
        yield "before "
        await Gated.gate.wait()
        yield "after"


def registry() -> Registry:
    reg = test_registry()
    reg.register("stores", "redis", RedisStore)
    reg.register("agents", "gated", Gated)
    return reg


def config(url: str, connector: dict[str, Any] | None = None, agents: dict[str, Any] | None = None) -> dict[str, Any]:
    data = make_config({"producer_timeout": 5, **(connector or {})}, agents)
    data["store"] = {"use": "redis", "url": url, "timeout": 2}
    return data


async def process(start_server: StartServer, url: str, **kwargs: Any) -> Server:
    """One connic "process": an app with its own registry and store, on its own port."""
    return await start_server(config(url, **kwargs), registry=registry())


async def chat(conn: Any, message_id: str, text: str) -> list[dict[str, Any]]:
    await conn.send({"type": "message", "id": message_id, "payload": {"message": text}})
    return await conn.until_ended({message_id: ["assistant"]})  # type: ignore[no-any-return]


async def history(conn: Any) -> list[dict[str, Any]]:
    await conn.send({"type": "history"})
    frames = await conn.until_type("history")
    return frames[-1]["entries"]  # type: ignore[no-any-return]


async def keys(url: str, pattern: str = "*") -> list[str]:
    client = aioredis.Redis.from_url(url, decode_responses=True)
    try:
        return sorted(await client.keys(pattern))
    finally:
        await client.aclose()


# --- the record ----------------------------------------------------------------------


def test_record_round_trip() -> None:
    record = SessionRecord(
        id="s",
        label="/ws",
        token="t" * 32,
        seq=17,
        count=3,
        limit_reached=True,
        tokens_in=5,
        tokens_out=7,
        states={"assistant": {"turns": 2, "nested": {"a": [1, "é"]}}},
        history=(
            HistoryEntry("user", "héllo \ud800 lone", None, "m1", 1),
            HistoryEntry("agent", "answer", "assistant", 2, 1),
        ),
        history_size=30,
    )
    assert decode(encode(record), [encode_entry(e) for e in record.history]) == (record, True)


def _frames(*frames: dict[str, Any]) -> list[str]:
    return [json.dumps({**frame, "seq": seq}) for seq, frame in enumerate(frames, 1)]


def test_unfinished_replies_read_from_the_log() -> None:
    ack = {"type": "ack", "id": "m1", "message_number": 1}
    start = {"type": "stream_start", "id": "m1"}
    # The message answered last, with the agents that ended their reply: every other one lost it.
    end_a = {"type": "stream_end", "id": "m1", "agent": "a"}
    assert unfinished(_frames(ack, {**start, "agent": "a"}, {**start, "agent": "b"}, end_a)) == [("m1", {"a"}, None)]
    done = {"type": "error", "id": "m1", "agent": "b", "code": "agent_error"}
    assert unfinished(_frames(ack, {**start, "agent": "b"}, done)) == [("m1", {"b"}, None)]
    # An error naming no agent refused a new message reusing the id: it ends nothing being answered.
    refused = {"type": "error", "id": "m1", "code": "rate_limited"}
    assert unfinished(_frames(ack, {**start, "agent": "a"}, refused)) == [("m1", set(), None)]
    # Only the drain refuses an accepted message, one still queued: that ends it for every agent.
    drained = {"type": "error", "id": 2, "code": "server_shutting_down"}
    queued_2 = {"type": "ack", "id": 2, "message_number": 2}
    assert unfinished(_frames(ack, queued_2, {**start, "agent": "a"}, drained)) == [("m1", set(), None)]
    assert unfinished(_frames(ack, {"type": "error", "id": "m1", "code": "server_shutting_down"})) == []
    # Streaming off (or before the first chunk): acked, nothing from any agent since.
    answered = {"type": "response", "id": "m1", "agent": "a", "response": "x"}
    queued = {"type": "ack", "id": 2, "message_number": 2}
    assert unfinished(_frames(ack, queued, answered)) == [("m1", {"a"}, None), (2, set(), None)]
    assert unfinished(_frames(ack)) == [("m1", set(), None)]
    # A message answered before the last one is finished, whatever its frames.
    start_2 = {"type": "stream_start", "id": 2, "agent": "b"}
    assert unfinished(_frames(ack, answered, queued, start_2)) == [(2, set(), None)]
    # "1" and 1 are two messages.
    assert unfinished(_frames(ack, {"type": "ack", "id": 1, "message_number": 2}, answered)) == [
        ("m1", {"a"}, None),
        (1, set(), None),
    ]
    # A message that named one agent: its ack says which (the answering one and a queued one).
    named = {**ack, "agent": "b"}
    assert unfinished(_frames(named, {**start, "agent": "b"})) == [("m1", set(), "b")]
    assert unfinished(_frames(named, {**queued, "agent": "a"}, {**start, "agent": "b"})) == [
        ("m1", set(), "b"),
        (2, set(), "a"),
    ]
    # Its ack trimmed from the log (a reply longer than replay_buffer): taken to name none.
    assert unfinished(_frames({**start, "agent": "b"})) == [("m1", set(), None)]


def test_unfinished_replies_of_the_messages_a_record_lists_as_pending() -> None:
    # The record lists the messages accepted and not answered: the log says which agents ended.
    ack = {"type": "ack", "id": "m1", "message_number": 1}
    chunk = {"type": "stream_chunk", "id": "m1", "chunk": "x"}
    end_a = {"type": "stream_end", "id": "m1", "agent": "a"}
    frames = _frames(ack, {**chunk, "agent": "a"}, {**chunk, "agent": "b"}, end_a)
    assert unfinished(frames, [("m1", 1, None)]) == [("m1", {"a"}, None)]
    assert unfinished(frames, [("m1", 1, "a")]) == []  # it named a, and a ended
    # Queued messages whose acks the log lost behind a long reply: the record still has them.
    long_reply = _frames(*[{**chunk, "agent": "b"}] * 5)
    assert unfinished(long_reply, [("m1", 1, "b"), (2, 2, "a"), ("3", 3, None)]) == [
        ("m1", set(), "b"),
        (2, set(), "a"),
        ("3", set(), None),
    ]
    # Only what follows its own ack counts: an earlier message of the same id ended before it.
    again = {**ack, "message_number": 2}
    assert unfinished(_frames(ack, end_a, again), [("m1", 2, None)]) == [("m1", set(), None)]
    # An error without an agent ended it as a whole; "1" and 1 are two messages.
    refused = {"type": "error", "id": 1, "code": "server_shutting_down"}
    assert unfinished(_frames(refused), [(1, 4, None), ("1", 5, None)]) == [("1", set(), None)]
    # Nothing pending: nothing unfinished, whatever the log holds.
    assert unfinished(frames, []) == []


# --- one process -----------------------------------------------------------------


async def test_session_keys_share_one_hash_tag_and_end_deletes_them(
    redis_url: str, start_server: StartServer, clients: Clients
) -> None:
    server = await process(start_server, redis_url)
    session = ResumeSession(clients, server.url())
    conn = await session.start()
    await chat(conn, "m1", "one two")
    prefix = f"connic:{{{session.session_id}}}:"
    # Beside the store's one key of its own, the epoch (connic/stores/redis/writeback.py).
    session_keys = [prefix + name for name in ("fence", "history", "log", "owner", "record")]
    assert await keys(redis_url) == ["connic:epoch", *session_keys]
    await conn.ws.close(1000)  # the client says goodbye: the session ends for good
    for _ in range(200):
        if await keys(redis_url) == ["connic:epoch"]:
            break
        await asyncio.sleep(0.02)
    assert await keys(redis_url) == ["connic:epoch"]


async def test_replay_log_is_a_stream_trimmed_to_replay_buffer(
    redis_url: str, start_server: StartServer, clients: Clients
) -> None:
    server = await process(start_server, redis_url, connector={"replay_buffer": 5})
    session = ResumeSession(clients, server.url())
    conn = await session.start()
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    log = f"connic:{{{session.session_id}}}:log"

    async def logged() -> None:
        # The log is written behind the client's frames, in batches: each reply's frames are
        # logged before the next message, so that no write holds two replies (one that did kept
        # the first reply's entry, which holds 5 of the newest frames before it, as it should).
        for _ in range(500):
            newest = await client.xrevrange(log, count=1)
            if newest and newest[0][0] == f"0-{session.transcript.last_seq}":
                return
            await asyncio.sleep(0.01)
        pytest.fail(f"the log never held seq {session.transcript.last_seq}")

    try:
        await chat(conn, "m1", words(6))  # ack, stream_start, 6 chunks, stream_end: seq 1..9
        await logged()
        await chat(conn, "m2", words(6))  # seq 10..18
        await logged()
        await chat(conn, "m3", words(6))  # seq 19..27: the first reply's entries hold none of the newest 5 before it
        await logged()
        last = session.transcript.last_seq
        entries = await client.xrange(log)
    finally:
        await client.aclose()
    # Each entry holds one write's frames joined by newlines; its id is its newest frame's seq.
    writes = [[json.loads(frame)["seq"] for frame in fields["f"].split("\n")] for _, fields in entries]
    assert [entry_id for entry_id, _ in entries] == [f"0-{seqs[-1]}" for seqs in writes]
    seqs = [seq for write in writes for seq in write]
    assert seqs == list(range(seqs[0], last + 1))
    assert 9 < seqs[0] <= last - 4  # the newest 5 are held, and no entry without one of the 5 before the last write
    session.drop()
    # From a seq still logged: the frames after it, no gap.
    resumed = await session.resume(last_seq=last - 2)
    assert resumed.connected["resumed"] is True and resumed.connected["recovered"] is True
    frames = [await resumed.recv() for _ in range(2)]
    assert [f["seq"] for f in frames] == [last - 1, last]
    session.drop()
    # From exactly replay_buffer frames back: all of them.
    resumed = await session.resume(last_seq=last - 5)
    assert resumed.connected["recovered"] is True
    assert [(await resumed.recv())["seq"] for _ in range(5)] == list(range(last - 4, last + 1))
    session.drop()
    # One more is past replay_buffer, as with the memory store, though an entry may still hold it.
    again = await session.resume(last_seq=last - 6)
    assert again.connected["resumed"] is True and again.connected["recovered"] is False
    await again.send({"type": "ping"})
    assert (await again.recv()) == {"type": "pong"}
    session.drop()
    # From a seq whose successor was trimmed: recovered false and nothing replayed.
    again = await session.resume(last_seq=1)
    assert again.connected["resumed"] is True and again.connected["recovered"] is False
    await again.send({"type": "ping"})
    assert (await again.recv()) == {"type": "pong"}


async def test_a_process_that_lost_ownership_writes_nothing(
    redis_url: str, start_server: StartServer, clients: Clients
) -> None:
    server = await process(start_server, redis_url, agents={"assistant": {"use": "echo", "delay": 0.05}})
    session = ResumeSession(clients, server.url())
    conn = await session.start()
    await chat(conn, "m1", "one")
    log_key = f"connic:{{{session.session_id}}}:log"
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        logged = await client.xlen(log_key)
        # Another process took the session over (this one's lease ran out meanwhile).
        await client.set(f"connic:{{{session.session_id}}}:owner", "999999")
        await conn.send({"type": "message", "id": "m2", "payload": {"message": words(20)}})
        code, frames = await conn.closed()
        assert code == 4011, frames
        assert any(f.get("code") == "session_taken_over" for f in frames), frames
        assert await client.xlen(log_key) == logged  # the fencing token refused every frame
    finally:
        await client.aclose()


async def test_resume_right_after_a_drop_never_gets_a_fresh_session(
    redis_url: str, start_server: StartServer, clients: Clients
) -> None:
    # The store lets a detached idle session go a round of the loop after the drop: a resume
    # that found it live just before must still resume it (it once got a fresh session).
    server = await process(start_server, redis_url)
    for i in range(150):
        session = ResumeSession(clients, server.url())
        conn = await session.start()
        await chat(conn, "m1", f"hello {i}")
        session.drop()
        again = await session.resume()
        assert again.connected["resumed"] is True, (i, again.connected)


async def test_owner_takes_a_cancel_flag_whose_message_was_lost(
    redis_url: str, start_server: StartServer, clients: Clients
) -> None:
    server = await process(start_server, redis_url, agents={"assistant": {"use": "echo", "delay": 0.02}})
    session = ResumeSession(clients, server.url())
    conn = await session.start()
    text = words(500)  # about 10 s
    await conn.send({"type": "message", "id": "m1", "payload": {"message": text}})
    while len(session.transcript.chunks("m1", "assistant")) < 5:
        await conn.recv()
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        # The flag another process sets, without its pub/sub message: the lease renewal
        # (every third of producer_timeout = 5 s) takes it. A set, as earlier code wrote it
        # (a rolling upgrade from it): read all the same.
        await client.sadd(f"connic:{{{session.session_id}}}:cancel", json.dumps("m1"))
    finally:
        await client.aclose()
    await conn.until_ended({"m1": ["assistant"]}, timeout=5)
    end = session.transcript.end("m1", "assistant")
    assert end is not None and end["finish_reason"] == "cancelled", end
    assert len(end["full_response"]) < len(text) // 2


# --- two processes ---------------------------------------------------------------


async def test_idle_session_resumes_on_another_process(
    redis_url: str, start_server: StartServer, clients: Clients
) -> None:
    a = await process(start_server, redis_url, agents={"assistant": {"use": "inspect"}})
    b = await process(start_server, redis_url, agents={"assistant": {"use": "inspect"}})
    session = ResumeSession(clients, a.url())
    conn = await session.start()
    await chat(conn, "m1", "first")
    await chat(conn, "m2", "second")
    before = await history(conn)
    session.drop()
    conn_b = await session.resume(url=b.url())
    assert conn_b.connected["resumed"] is True and conn_b.connected["recovered"] is True
    assert conn_b.connected["session_id"] == session.session_id
    assert conn_b.connected["last_seq"] == session.transcript.last_seq
    assert await history(conn_b) == before
    await chat(conn_b, "m3", "third")
    seen = json.loads(session.transcript.end("m3", "assistant")["full_response"])  # type: ignore[index]
    assert seen["number"] == 3  # message_number goes on
    assert [h["text"] for h in seen["history"]][:3] == ["first", before[1]["text"], "second"]
    assert seen["state"]["turns"] == 3  # the agent's own state came along
    # And back to A, which let it go and must take it again (never two copies).
    session.drop()
    conn_a = await session.resume(url=a.url())
    assert conn_a.connected["resumed"] is True
    await chat(conn_a, "m4", "fourth")
    seen = json.loads(session.transcript.end("m4", "assistant")["full_response"])  # type: ignore[index]
    assert seen["number"] == 4 and seen["state"]["turns"] == 4
    assert [h["text"] for h in seen["history"] if h["role"] == "user"] == ["first", "second", "third"]
    session.transcript.assert_complete()


async def test_wrong_token_on_another_process_gets_a_fresh_session_at_once(
    redis_url: str, start_server: StartServer, clients: Clients
) -> None:
    Gated.gate = asyncio.Event()  # A stays busy: a right token would follow it
    a = await process(start_server, redis_url, agents={"assistant": {"use": "gated"}})
    b = await process(start_server, redis_url, agents={"assistant": {"use": "gated"}})
    session = ResumeSession(clients, a.url())
    conn = await session.start()
    await conn.send({"type": "message", "id": "m1", "payload": {"message": "go"}})
    while not session.transcript.chunks("m1", "assistant"):
        await conn.recv()
    session.drop()
    right = session.resume_token
    session.resume_token = right[:-1] + ("A" if right[-1] != "A" else "B")
    wrong = await session.resume(url=b.url())  # the token is checked before anything waits on A
    assert wrong.connected["resumed"] is False and wrong.connected["session_id"] != session.session_id
    session.resume_token = right
    Gated.gate.set()
    conn_b = await session.resume(url=b.url())
    assert conn_b.connected["resumed"] is True
    await conn_b.until_ended({"m1": ["assistant"]})
    session.transcript.assert_complete()


async def test_a_let_go_session_is_taken_only_with_its_token_on_its_connector(
    redis_url: str, start_server: StartServer, clients: Clients
) -> None:
    # The claim itself checks the token and the connector: a failed resume takes nothing.
    a = await process(start_server, redis_url)
    b = await process(start_server, redis_url)
    other = await process(start_server, redis_url, connector={"path": "/other"})
    session = ResumeSession(clients, a.url())
    await chat(await session.start(), "m1", "kept")
    session.drop()
    await wait_until_let_go(redis_url, session.session_id)
    right = session.resume_token
    session.resume_token = right[:-1] + ("A" if right[-1] != "A" else "B")
    wrong = await session.resume(url=b.url())
    assert wrong.connected["resumed"] is False and wrong.connected["session_id"] != session.session_id
    session.resume_token = right
    elsewhere = await session.resume(url=other.url("/other"))  # the right token, another connector's session
    assert elsewhere.connected["resumed"] is False and elsewhere.connected["session_id"] != session.session_id
    assert await owner(redis_url, session.session_id) is None  # neither failed resume owns it
    conn_b = await session.resume(url=b.url())
    assert conn_b.connected["resumed"] is True
    assert [entry["text"] for entry in await history(conn_b)] == ["kept", "kept"]


async def owner(url: str, session_id: str) -> str | None:
    client = aioredis.Redis.from_url(url, decode_responses=True)
    try:
        return await client.get(f"connic:{{{session_id}}}:owner")  # type: ignore[no-any-return]
    finally:
        await client.aclose()


async def wait_until_let_go(url: str, session_id: str) -> None:
    """Until the session's process has let it go (no owner): bounded."""
    for _ in range(200):
        if await owner(url, session_id) is None:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"session {session_id} still owned after 4 s")


async def test_reply_dropped_on_one_process_finishes_on_the_other(
    redis_url: str, start_server: StartServer, clients: Clients
) -> None:
    agents = {"assistant": {"use": "echo", "delay": 0.02}}
    a = await process(start_server, redis_url, agents=agents)
    b = await process(start_server, redis_url, agents=agents)
    session = ResumeSession(clients, a.url())
    conn = await session.start()
    text = words(60)
    await conn.send({"type": "message", "id": "m1", "payload": {"message": text}})
    while len(session.transcript.chunks("m1", "assistant")) < 5:
        await conn.recv()
    session.drop()  # mid-reply: A keeps answering into the log
    conn_b = await session.resume(url=b.url())
    assert conn_b.connected["resumed"] is True and conn_b.connected["recovered"] is True
    await conn_b.until_ended({"m1": ["assistant"]})
    session.transcript.assert_complete()  # every seq once, none missing
    end = session.transcript.end("m1", "assistant")
    assert end is not None and end["full_response"] == text
    assert "".join(session.transcript.chunks("m1", "assistant")) == text
    # B now serves the session: the next message is answered there, with the history.
    await chat(conn_b, "m2", "next")
    assert [e["text"] for e in await history(conn_b)] == [text, text, "next", "next"]


async def test_resume_on_another_process_follows_the_reply_live_and_holds_new_messages(
    redis_url: str, start_server: StartServer, clients: Clients
) -> None:
    Gated.gate = asyncio.Event()
    agents = {"assistant": {"use": "gated"}}
    a = await process(start_server, redis_url, agents=agents)
    b = await process(start_server, redis_url, agents=agents)
    session = ResumeSession(clients, a.url())
    conn = await session.start()
    await conn.send({"type": "message", "id": "m1", "payload": {"message": "go"}})
    while not session.transcript.chunks("m1", "assistant"):
        await conn.recv()
    session.drop()
    # A is still answering (its agent waits on the gate): B resumes at once, following A's log.
    conn_b = await session.resume(url=b.url())
    assert conn_b.connected["resumed"] is True and conn_b.connected["recovered"] is True
    await conn_b.send({"type": "ping"})
    assert await conn_b.recv() == {"type": "pong"}  # B reads the client meanwhile
    await conn_b.send({"type": "message", "id": "m2", "payload": {"message": "held"}})
    Gated.gate.set()  # the rest of A's reply reaches the client through B, live
    await conn_b.until_ended({"m1": ["assistant"], "m2": ["assistant"]})
    session.transcript.assert_complete()
    assert session.transcript.end("m1", "assistant")["full_response"] == "before after"  # type: ignore[index]
    order = [(f["type"], f["id"]) for f in session.transcript.ordered() if f["type"] in ("ack", "stream_end")]
    assert order == [("ack", "m1"), ("stream_end", "m1"), ("ack", "m2"), ("stream_end", "m2")]
    assert conn_b.connected["last_seq"] >= 3  # ack, stream_start, the first chunk
    texts = [e["text"] for e in await history(conn_b)]
    assert texts == ["go", "before after", "held", "before after"]


async def test_sessions_survive_a_restart_of_every_process(
    redis_url: str, start_server: StartServer, clients: Clients
) -> None:
    agents = {"assistant": {"use": "inspect"}}
    a = await process(start_server, redis_url, agents=agents)
    b = await process(start_server, redis_url, agents=agents)
    session = ResumeSession(clients, a.url())
    conn = await session.start()
    await chat(conn, "m1", "remember me")
    for server in (a, b):
        await server.server.close()  # every process stops (drain: the session is let go, not ended)
    c = await process(start_server, redis_url, agents=agents)
    conn_c = await session.resume(url=c.url())
    assert conn_c.connected["resumed"] is True
    await chat(conn_c, "m2", "and now?")
    seen = json.loads(session.transcript.end("m2", "assistant")["full_response"])  # type: ignore[index]
    assert seen["history"][0]["text"] == "remember me"
    assert seen["number"] == 2


# --- Redis failures ------------------------------------------------------------------


async def test_redis_down_at_start_exits_1_naming_store_url(tmp_path: Path, redis_server: RedisServer) -> None:
    url = redis_server.url
    redis_server.stop()
    path = tmp_path / "connic.toml"
    path.write_text(
        '[agents.assistant]\nuse = "echo"\n[[connectors]]\npath = "/ws"\nsecrets = ["s"]\n'
        f'[store]\nuse = "redis"\nurl = "{url}"\ntimeout = 1\n'
    )
    proc = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "connic", "run", "--port", "0", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
        env=store_plugin_env(tmp_path / "plugins"),
    )
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "[store] url" in lines[0] and url in lines[0], proc.stderr


async def test_redis_down_at_start_never_prints_the_urls_password(tmp_path: Path, redis_server: RedisServer) -> None:
    port = redis_server.url.rpartition(":")[2].partition("/")[0]
    redis_server.stop()
    url = f"redis://connic:hunter2-secret@127.0.0.1:{port}/0"
    path = tmp_path / "connic.toml"
    path.write_text(
        '[agents.assistant]\nuse = "echo"\n[[connectors]]\npath = "/ws"\nsecrets = ["s"]\n'
        f'[store]\nuse = "redis"\nurl = "{url}"\ntimeout = 1\n'
    )
    proc = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "connic", "run", "--port", "0", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
        env=store_plugin_env(tmp_path / "plugins"),
    )
    assert proc.returncode == 1, proc.stderr
    assert "[store] url" in proc.stderr and f"***@127.0.0.1:{port}" in proc.stderr, proc.stderr
    assert "hunter2" not in proc.stderr + proc.stdout


@pytest.mark.parametrize("connector", [{}, {"rate_limit": {"messages": 10, "per": 1}}], ids=["plain", "rate_limit"])
async def test_store_failure_while_running_closes_1011_refuses_handshakes_503_then_recovers(
    redis_server: RedisServer,
    start_server: StartServer,
    clients: Clients,
    connector: dict[str, Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    # With a rate limit the message's token is taken in Redis before it is accepted: that call fails instead.
    server = await process(start_server, redis_server.url, connector=connector)
    session = ResumeSession(clients, server.url())
    conn = await session.start()
    await chat(conn, "m1", "one")
    redis_server.stop()
    await conn.send({"type": "message", "id": "m2", "payload": {"message": "two"}})
    code, frames = await conn.closed(timeout=15)
    assert code == 1011, frames
    error = next(f for f in frames if f.get("code") == "store_unavailable")
    assert error["id"] is None, error
    # What Redis or redis-py said (its host and port, a script's SHA) is for the log, not the client.
    port = redis_server.url.rpartition(":")[2].partition("/")[0]
    assert port not in error["message"] and "127.0.0.1" not in error["message"], error
    logged = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    # "Redis failed (ConnectionError) (Error 111 connecting to ...)", or a timeout (nothing more to say).
    assert any(re.search(r"Redis failed \(\w+\) \(.+\)|no answer from Redis", line) for line in logged), logged
    # A new handshake while Redis is down is refused before the upgrade (the server does not crash).
    for _ in range(2):
        with pytest.raises(websockets.exceptions.InvalidStatus) as refused:
            async with websockets.connect(server.url(), open_timeout=15):
                pass
        assert refused.value.response.status_code == 503
        assert refused.value.response.headers["Retry-After"] == "5"
    redis_server.start()  # back (empty: it kept nothing): new sessions work without a restart
    again = ResumeSession(clients, server.url())
    conn = await again.start()
    await chat(conn, "m1", "hello again")


async def test_a_second_resume_following_one_session_on_one_process_takes_the_first_over_and_gets_its_frames(
    redis_url: str, start_server: StartServer, clients: Clients
) -> None:
    # A client whose first resume's socket is half-open resumes again on the same process: the
    # second takes the first over (4011, PROTOCOL.md §7) and gets the owner's frames live, the
    # first following the same log a moment before (follower.py once kept one follower per log).
    Gated.gate = asyncio.Event()
    agents = {"assistant": {"use": "gated"}}
    a = await process(start_server, redis_url, agents=agents)
    b = await process(start_server, redis_url, agents=agents)
    session = ResumeSession(clients, a.url())
    conn = await session.start()
    await conn.send({"type": "message", "id": "m1", "payload": {"message": "go"}})
    while not session.transcript.chunks("m1", "assistant"):
        await conn.recv()
    session.drop()
    first = await session.resume(url=b.url())
    assert first.connected["resumed"] is True, first.connected
    assert await first.barrier() == []  # following A: it holds the session
    first.transcript = Transcript()  # its own: the second resume adopts the session's
    second = await session.resume(url=b.url())
    assert second.connected["resumed"] is True, second.connected
    assert await second.barrier() == []
    code, frames = await first.closed(timeout=5)
    assert code == 4011 and frames[-1]["code"] == "session_taken_over", frames
    Gated.gate.set()  # the rest of A's reply: the second resume gets it live
    await second.until(lambda f: f.get("type") == "stream_end" and f.get("id") == "m1", timeout=5)
