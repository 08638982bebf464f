"""PROTOCOL.md section 8: the ``history`` frame.

``{"type": "history"}`` gets the session's conversation so far, oldest first; a reply is in
it once it ended with ``stream_end``/``response`` (``stop``, or ``cancelled`` with what was
produced), never while in progress nor when it ended with an error. ``history`` is a
connection-level frame (no ``seq``), carries the session's ``last_seq``, is not activity and
does not count against ``max_messages``.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import pytest
import resume_helpers
import websockets
from resume_helpers import Clients, Conn, ResumeSession, serve, words

from conftest import StartServer

# The fixtures these tests share with the other resume tests (resume_helpers): pytest finds a
# fixture in the test module's namespace.
store_url, start_server, clients = resume_helpers.store_url, resume_helpers.start_server, resume_helpers.clients_fixture


async def history(conn: Conn) -> dict[str, Any]:
    """Ask for the history; the ``history`` frame (frames of replies in flight may come before it)."""
    await conn.send({"type": "history"})
    # Stop at an id-null error too: a server without ``history`` answers unknown_type at once.
    frame = (await conn.until(lambda f: f["type"] == "history" or (f["type"] == "error" and f["id"] is None)))[-1]
    assert frame["type"] == "history", frame
    assert "seq" not in frame, frame
    assert {"type", "entries", "last_seq"} <= set(frame), frame
    for entry in frame["entries"]:
        assert set(entry) == {"role", "text", "id", "message_number", "agent"}, entry
    return frame


def user(text: str, message_id: Any, number: int) -> dict[str, Any]:
    return {"role": "user", "text": text, "id": message_id, "message_number": number, "agent": None}


def agent(text: str, message_id: Any, number: int, name: str) -> dict[str, Any]:
    return {"role": "agent", "text": text, "id": message_id, "message_number": number, "agent": name}


@pytest.mark.parametrize("streaming", [True, False])
async def test_entries_oldest_first(start_server: StartServer, clients: Clients, streaming: bool) -> None:
    server = await serve(start_server, {"streaming": streaming})
    session = ResumeSession(clients, server.url())
    conn = await session.start()
    empty = await history(conn)
    assert empty["entries"] == [] and empty["last_seq"] == 0
    await conn.send({"id": "m1", "message": "first question"})
    await conn.until_ended({"m1": ["assistant"]})
    await conn.send({"message": "second one"})  # the server assigns the id
    await conn.until(lambda f: f["type"] in ("stream_end", "response"))
    auto_id = next(f["id"] for f in conn.frames if f["type"] == "ack" and f["id"] != "m1")
    got = await history(conn)
    assert got["entries"] == [
        user("first question", "m1", 1),
        agent("first question", "m1", 1, "assistant"),
        user("second one", auto_id, 2),
        agent("second one", auto_id, 2, "assistant"),
    ]
    assert got["last_seq"] == session.transcript.last_seq == (10 if streaming else 4)


async def test_several_agents_each_reply_after_its_message(start_server: StartServer, clients: Clients) -> None:
    server = await serve(start_server, agents={"a": {"use": "echo", "delay": 0.01}, "b": {"use": "echo"}})
    session = ResumeSession(clients, server.url())
    conn = await session.start()
    for n, text in ((1, "one two"), (2, "three")):
        await conn.send({"id": f"m{n}", "message": text})
        await conn.until_ended({f"m{n}": ["a", "b"]})
    entries = (await history(conn))["entries"]
    assert entries[0] == user("one two", "m1", 1)
    assert sorted(entries[1:3], key=lambda e: e["agent"]) == [
        agent("one two", "m1", 1, "a"),
        agent("one two", "m1", 1, "b"),
    ]
    assert entries[3] == user("three", "m2", 2)
    assert sorted(entries[4:], key=lambda e: e["agent"]) == [agent("three", "m2", 2, "a"), agent("three", "m2", 2, "b")]


async def test_cancelled_reply_appears_with_what_was_produced(start_server: StartServer, clients: Clients) -> None:
    server = await serve(start_server, agents={"slow": {"use": "slow", "seconds": 30}})
    session = ResumeSession(clients, server.url())
    conn = await session.start()
    await conn.send({"id": "m1", "message": "take your time"})
    await conn.until_type("stream_chunk")
    await conn.send({"type": "cancel", "id": "m1"})
    end = (await conn.until_type("stream_end"))[-1]
    assert end["finish_reason"] == "cancelled" and end["full_response"] == "started "
    got = await history(conn)
    assert got["entries"] == [user("take your time", "m1", 1), agent("started ", "m1", 1, "slow")]
    assert got["last_seq"] == end["seq"]


async def test_errored_reply_does_not_appear(start_server: StartServer, clients: Clients) -> None:
    server = await serve(start_server, agents={"fail": {"use": "fail"}, "echo": {"use": "echo"}})
    session = ResumeSession(clients, server.url())
    conn = await session.start()
    await conn.send({"id": "m1", "message": "try this"})
    await conn.until_ended({"m1": ["fail", "echo"]})
    error = session.transcript.end("m1", "fail")
    assert error is not None and error["type"] == "error" and error["code"] == "agent_error"
    got = await history(conn)
    assert got["entries"] == [user("try this", "m1", 1), agent("try this", "m1", 1, "echo")]
    assert got["last_seq"] == session.transcript.last_seq


async def test_reply_in_progress_does_not_appear_until_it_ends(start_server: StartServer, clients: Clients) -> None:
    server = await serve(start_server, agents={"e": {"use": "echo", "delay": 0.05}})
    session = ResumeSession(clients, server.url())
    conn = await session.start()
    await conn.send({"id": "m1", "message": "done"})
    await conn.until_ended({"m1": ["e"]})
    text = words(40)  # about 2 s of streaming
    await conn.send({"id": "m2", "message": text})
    await conn.until_type("stream_chunk")
    seen = session.transcript.last_seq
    during = await history(conn)
    done = [user("done", "m1", 1), agent("done", "m1", 1, "e")]
    assert during["entries"][:2] == done
    # The message being answered may be listed already; its reply may not.
    assert during["entries"][2:] in ([], [user(text, "m2", 2)])
    await conn.until_ended({"m2": ["e"]})
    assert seen <= during["last_seq"] < session.transcript.last_seq  # the server's latest seq when it answered
    after = await history(conn)
    assert after["entries"] == [*done, user(text, "m2", 2), agent(text, "m2", 2, "e")]
    assert after["last_seq"] == session.transcript.last_seq


async def test_history_does_not_count_against_max_messages(start_server: StartServer, clients: Clients) -> None:
    server = await serve(start_server, {"max_messages": 2})
    session = ResumeSession(clients, server.url())
    conn = await session.start()
    for _ in range(3):
        await history(conn)
    await conn.send({"id": "m1", "message": "one"})
    await conn.until_ended({"m1": ["assistant"]})
    for _ in range(3):
        await history(conn)
    await conn.send({"id": "m2", "message": "two"})
    await conn.until_ended({"m2": ["assistant"]})
    assert [f["message_number"] for f in session.transcript.ordered() if f["type"] == "ack"] == [1, 2]
    assert len((await history(conn))["entries"]) == 4
    await conn.send({"id": "m3", "message": "three"})
    code, frames = await conn.closed()
    assert [(f["type"], f.get("code")) for f in frames] == [("error", "message_limit_reached")]
    assert code == 4009


async def test_history_is_not_activity(start_server: StartServer, clients: Clients) -> None:
    server = await serve(start_server, {"session_timeout": 0.6})
    session = ResumeSession(clients, server.url())
    conn = await session.start()

    async def keep_asking() -> None:
        with contextlib.suppress(websockets.ConnectionClosed):
            while True:
                await conn.send({"type": "history"})
                await asyncio.sleep(0.1)

    asker = asyncio.create_task(keep_asking())
    try:
        code, frames = await conn.closed(timeout=10)  # history every 0.1 s, yet the session expires
    finally:
        asker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asker
    assert code == 4008
    assert [f["code"] for f in frames if f["type"] == "error"] == ["session_expired"]
    assert any(f["type"] == "history" for f in frames)  # they were answered meanwhile
