"""PROTOCOL.md section 7: sequence numbers, resume tokens and resuming a dropped session.

Every test runs real ``websockets`` clients against a real in-process server on loopback.
A drop is a TCP reset with no close frame (:meth:`resume_helpers.Conn.drop`). What a client
holds is kept by ``seq`` (:class:`resume_helpers.Transcript`), so "no gap, no duplicate" is
checked on what the client ends up with, and each connection's own arrival order is
checked too. Where a test needs a reply to have finished while no client was attached,
it waits on the server's ``connic_turns_total`` metric rather than sleeping.
"""

from __future__ import annotations

import ast
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import pytest
import resume_helpers
from resume_helpers import Clients, Conn, ResumeSession, Transcript, is_sequenced, serve, wait_turns, words

from conftest import SECRET, Connect, Server, StartServer

DATA = Path(__file__).parent / "data"

# The fixtures these tests share with the other resume tests (resume_helpers): pytest finds a
# fixture in the test module's namespace.
store_url, start_server, clients = resume_helpers.store_url, resume_helpers.start_server, resume_helpers.clients_fixture


async def started(clients: Clients, server: Server, **kwargs: Any) -> tuple[ResumeSession, Conn]:
    session = ResumeSession(clients, server.url(), **kwargs)
    conn = await session.start()
    return session, conn


def assert_seq_only_where_due(frames: list[dict[str, Any]]) -> None:
    """``seq`` on every frame that belongs to a message, on no connection-level frame."""
    for frame in frames:
        assert ("seq" in frame) == is_sequenced(frame), frame


async def chunks_seen(conn: Conn, count: int) -> None:
    """Read until ``count`` stream_chunk frames arrived on ``conn``."""
    while sum(f["type"] == "stream_chunk" for f in conn.frames) < count:
        await conn.recv()


# --- sequence numbers ------------------------------------------------------------


async def test_seq_on_message_frames_and_not_on_connection_frames(start_server: StartServer, clients: Clients) -> None:
    server = await serve(start_server, agents={"a": {"use": "echo"}, "b": {"use": "echo"}})
    session, conn = await started(clients, server)
    await conn.send({"type": "message", "id": "m1", "payload": {"message": "one two three"}})
    await conn.until_ended({"m1": ["a", "b"]})
    await conn.send({"type": "message", "id": "m2", "payload": {"message": "x", "agent": "nope"}})
    refused = await conn.recv()
    assert refused["type"] == "error" and refused["code"] == "unknown_agent" and refused["id"] == "m2"
    await conn.send({"type": "ping"})
    assert (await conn.recv()) == {"type": "pong"}
    await conn.send({"type": "cancel", "id": "ghost"})
    not_found = await conn.recv()
    assert not_found["type"] == "error" and not_found["code"] == "not_found" and not_found["id"] == "ghost"
    await conn.send("not json")
    bad = await conn.recv()
    assert bad["type"] == "error" and bad["code"] == "invalid_json" and bad["id"] is None
    await conn.send({"type": "history"})
    history = await conn.recv()
    assert history["type"] == "history"
    await conn.send({"type": "message", "id": "m3", "payload": {"message": "four five", "agent": "a"}})
    await conn.until_ended({"m3": ["a"]})

    assert "seq" not in conn.connected
    assert_seq_only_where_due(conn.frames)
    assert "seq" in refused and "seq" in not_found
    conn.assert_seqs_follow(0)  # 1, 2, 3 ... in arrival order, across the messages and refusals
    session.transcript.assert_complete()
    # m1: ack + 2 x (start, 3 chunks, end); m2: error; ghost: error; m3: ack, start, 2 chunks, end
    assert session.transcript.last_seq == 1 + 2 * 5 + 1 + 1 + 5
    assert history["last_seq"] == 1 + 2 * 5 + 1 + 1


async def test_seq_on_response_frames_with_streaming_off(start_server: StartServer, clients: Clients) -> None:
    server = await serve(start_server, {"streaming": False})
    session, conn = await started(clients, server)
    for n in (1, 2):
        await conn.send({"id": f"m{n}", "message": "whole answer"})
        await conn.until_ended({f"m{n}": ["assistant"]})
    assert [(f["type"], f["seq"]) for f in session.transcript.ordered()] == [
        ("ack", 1),
        ("response", 2),
        ("ack", 3),
        ("response", 4),
    ]
    assert_seq_only_where_due(conn.frames)


async def test_seq_on_rate_limited(start_server: StartServer, clients: Clients) -> None:
    server = await serve(start_server, {"rate_limit": {"messages": 1, "per": 60}})
    session, conn = await started(clients, server)
    await conn.send({"id": "m1", "message": "ok"})
    await conn.until_ended({"m1": ["assistant"]})
    await conn.send({"id": "m2", "message": "too many"})
    error = await conn.recv()
    assert error["code"] == "rate_limited" and error["id"] == "m2"
    assert error["seq"] == session.transcript.last_seq == 5  # ack, start, chunk, end, then this
    conn.assert_seqs_follow(0)


async def test_seq_on_queue_full(start_server: StartServer, clients: Clients) -> None:
    server = await serve(start_server, {"max_queued": 1}, {"s": {"use": "slow", "seconds": 30}})
    session, conn = await started(clients, server)
    await conn.send({"id": "m1", "message": "in flight"})
    await conn.until_type("stream_chunk")
    await conn.send({"id": "m2", "message": "queued"})
    assert (await conn.recv())["type"] == "ack"
    await conn.send({"id": "m3", "message": "one too many"})
    error = await conn.recv()
    assert error["code"] == "queue_full" and error["id"] == "m3"
    assert error["seq"] == 5  # ack m1, start, chunk, ack m2, then this
    conn.assert_seqs_follow(0)
    await conn.send({"type": "cancel", "id": "m2"})
    await conn.send({"type": "cancel", "id": "m1"})
    end = (await conn.until_type("stream_end"))[-1]
    assert end["finish_reason"] == "cancelled" and end["seq"] == 6
    session.transcript.assert_complete()


async def test_seq_on_message_limit_reached(start_server: StartServer, clients: Clients) -> None:
    server = await serve(start_server, {"max_messages": 1})
    _, conn = await started(clients, server)
    await conn.send({"id": "m1", "message": "only one"})
    await conn.until_ended({"m1": ["assistant"]})
    await conn.send({"id": "m2", "message": "over"})
    code, _ = await conn.closed()
    error = conn.frames[-1]
    assert error["type"] == "error" and error["code"] == "message_limit_reached" and error["id"] == "m2"
    assert error["seq"] == 6  # ack, start, 2 chunks, end, then this
    assert code == 4009
    conn.assert_seqs_follow(0)


async def test_resume_token_in_connected_and_unique(start_server: StartServer, clients: Clients) -> None:
    server = await serve(start_server)
    first, _ = await started(clients, server)
    second, _ = await started(clients, server)
    for session in (first, second):
        token = session.conn.connected["resume_token"]  # type: ignore[union-attr]
        assert isinstance(token, str) and len(token) >= 16  # >= 128 random bits, in some text encoding
    assert first.resume_token != second.resume_token
    assert first.session_id != second.session_id


async def test_resume_window_zero_no_token_and_no_resume(start_server: StartServer, clients: Clients) -> None:
    server = await serve(start_server, {"resume_window": 0})
    session, conn = await started(clients, server, strict=False)  # PROTOCOL.md does not tie seq to resuming
    assert "resume_token" not in conn.connected
    await conn.send({"id": "m1", "message": "hello there"})
    await conn.until_type("stream_end")
    conn.drop()
    session.resume_token = "no-token-was-given"
    again = await session.resume()
    assert again.connected.get("resumed") is not True
    assert again.connected["session_id"] != session.session_id
    assert "resume_token" not in again.connected
    await again.send({"id": "n1", "message": "new"})
    frames = await again.until_type("stream_end")
    assert frames[0]["type"] == "ack" and frames[0]["message_number"] == 1  # a new session counts from 1
    assert frames[-1]["full_response"] == "new"


# --- resuming after a drop ----------------------------------------------------------


async def test_mid_stream_drop_resumes_without_gap_or_duplicate(start_server: StartServer, clients: Clients) -> None:
    server = await serve(start_server, agents={"assistant": {"use": "echo", "delay": 0.03}})
    session, conn = await started(clients, server)
    text = words(30)
    await conn.send({"id": "m1", "message": text})
    await chunks_seen(conn, 5)
    assert session.transcript.last_seq == 7
    conn.drop()
    # The last three frames seen were lost on the way (as frames in flight are): the
    # server must replay at least those, whatever it produced meanwhile.
    session.transcript.keep_up_to(4)
    before = session.transcript.chunks("m1", "assistant")

    again = await session.resume(4)
    connected = again.connected
    assert connected["resumed"] is True and connected["recovered"] is True
    assert connected["session_id"] == session.session_id
    assert connected["resume_token"] == session.resume_token
    assert 7 <= connected["last_seq"] <= 1 + 1 + 30 + 1
    await again.until_ended({"m1": ["assistant"]})
    again.assert_seqs_follow(4)  # the replayed frames, then the live ones: no gap, no duplicate
    assert [f["chunk"] for f in again.frames[1:4]] == ["w2 ", "w3 ", "w4 "]
    session.transcript.assert_complete()
    chunks = session.transcript.chunks("m1", "assistant")
    assert chunks[: len(before)] == before
    end = session.transcript.end("m1", "assistant")
    assert end is not None and end["type"] == "stream_end" and end["finish_reason"] == "stop"
    assert "".join(chunks) == end["full_response"] == text
    assert len(chunks) == 30
    assert session.transcript.last_seq == 33
    # The session goes on on the new connection.
    await again.send({"id": "m2", "message": "next"})
    await again.until_ended({"m2": ["assistant"]})
    assert session.transcript.of("m2")[0] == {"type": "ack", "id": "m2", "message_number": 2, "seq": 34}


@pytest.mark.parametrize("saw_ack", [False, True])
async def test_drop_after_send_replays_the_whole_reply(
    start_server: StartServer, clients: Clients, saw_ack: bool
) -> None:
    server = await serve(start_server)
    session, conn = await started(clients, server)
    await conn.send({"id": "m1", "message": "one two three"})
    await conn.until_type("ack")  # the server has the message; the client may or may not have kept the ack
    conn.drop()
    if not saw_ack:
        session.transcript.keep_up_to(0)
    await wait_turns(server.http, "assistant", 1)  # the reply finished with nobody attached

    again = await session.resume()
    assert again.connected["resumed"] is True and again.connected["recovered"] is True
    assert again.connected["last_seq"] == 6
    await again.until_ended({"m1": ["assistant"]})
    replayed = [f["type"] for f in again.frames if "seq" in f]
    expected = ["stream_start", "stream_chunk", "stream_chunk", "stream_chunk", "stream_end"]
    assert replayed == (expected if saw_ack else ["ack", *expected])
    again.assert_seqs_follow(1 if saw_ack else 0)
    session.transcript.assert_complete()
    end = session.transcript.end("m1", "assistant")
    assert end is not None and end["full_response"] == "one two three"
    assert await again.barrier() == []  # nothing more comes


async def test_replay_buffer_overflow_recovers_nothing_then_history(
    start_server: StartServer, clients: Clients
) -> None:
    server = await serve(start_server, {"replay_buffer": 5}, {"assistant": {"use": "echo", "delay": 0.01}})
    session, conn = await started(clients, server)
    text = words(20)
    await conn.send({"id": "m1", "message": text})
    await chunks_seen(conn, 1)
    assert session.transcript.last_seq == 3  # ack, stream_start, one chunk
    conn.drop()
    await wait_turns(server.http, "assistant", 1)  # 23 frames logged; only the last 5 are kept

    again = await session.resume(3)
    assert again.connected["resumed"] is True
    assert again.connected["recovered"] is False
    assert again.connected["session_id"] == session.session_id
    assert again.connected["last_seq"] == 23
    await again.send({"type": "history"})
    got = await again.until_type("history")
    assert [f for f in got if "seq" in f] == []  # no logged frame at all, not even the kept tail
    history = got[-1]
    assert "seq" not in history
    assert history["last_seq"] == 23
    assert history["entries"] == [
        {"role": "user", "text": text, "id": "m1", "message_number": 1, "agent": None},
        {"role": "agent", "text": text, "id": "m1", "message_number": 1, "agent": "assistant"},
    ]
    # Live frames go on from where the session is.
    await again.send({"id": "m2", "message": "after"})
    await again.until_ended({"m2": ["assistant"]})
    again.assert_seqs_follow(23)
    assert session.transcript.of("m2")[0] == {"type": "ack", "id": "m2", "message_number": 2, "seq": 24}


async def test_replay_buffer_keeps_exactly_the_last_frames(start_server: StartServer, clients: Clients) -> None:
    server = await serve(start_server, {"replay_buffer": 5})
    session, conn = await started(clients, server)
    await conn.send({"id": "m1", "message": words(20)})
    await conn.until_ended({"m1": ["assistant"]})
    assert session.transcript.last_seq == 23
    conn.drop()

    session.transcript.keep_up_to(18)  # the log holds 19..23: the client can still be given them all
    again = await session.resume(18)
    assert again.connected["resumed"] is True and again.connected["recovered"] is True
    assert await again.barrier() != []
    assert again.seqs == [19, 20, 21, 22, 23]
    session.transcript.assert_complete()
    again.drop()

    session.transcript.keep_up_to(17)  # 18 is gone from the log: nothing may be replayed
    third = await session.resume(17)
    assert third.connected["resumed"] is True and third.connected["recovered"] is False
    assert await third.barrier() == []
    assert third.seqs == []


async def test_resume_window_expires_into_fresh_session(start_server: StartServer, clients: Clients) -> None:
    server = await serve(start_server, {"resume_window": 1.0})
    session, conn = await started(clients, server)
    await conn.send({"id": "m1", "message": "hello"})
    await conn.until_ended({"m1": ["assistant"]})
    conn.drop()
    again = await session.resume()  # well inside the window
    assert again.connected["resumed"] is True
    again.drop()
    await asyncio.sleep(3.0)  # the window (1 s) runs out: nothing to await, the session is simply gone
    late = await session.resume()
    assert late.connected["resumed"] is False
    assert late.connected["session_id"] != session.session_id
    assert late.connected["resume_token"] != session.resume_token
    await late.send({"id": "n1", "message": "fresh"})
    await late.until_ended({"n1": ["assistant"]})
    assert late.frames[1] == {"type": "ack", "id": "n1", "message_number": 1, "seq": 1}


async def test_resume_window_waits_for_a_running_reply(start_server: StartServer, clients: Clients) -> None:
    agents = {"assistant": {"use": "echo", "delay": 0.1}}
    server = await serve(start_server, {"resume_window": 0.5}, agents)
    session, conn = await started(clients, server)
    text = words(30)  # about 3 s of streaming
    await conn.send({"id": "m1", "message": text})
    await chunks_seen(conn, 1)
    conn.drop()
    await asyncio.sleep(1.5)  # past the window, while the reply still runs: the window has not started
    again = await session.resume()
    assert again.connected["resumed"] is True and again.connected["recovered"] is True
    await again.until_ended({"m1": ["assistant"]})
    session.transcript.assert_complete()
    end = session.transcript.end("m1", "assistant")
    assert end is not None and end["full_response"] == text == "".join(session.transcript.chunks("m1", "assistant"))


# --- failed resumes and authentication ------------------------------------------------


async def test_wrong_token_or_unknown_session_gets_fresh_session_and_locks_nothing(
    start_server: StartServer, clients: Clients
) -> None:
    server = await serve(start_server)
    session, conn = await started(clients, server)
    await conn.send({"id": "m1", "message": "keep me"})
    await conn.until_ended({"m1": ["assistant"]})
    conn.drop()
    overrides: list[dict[str, Any]] = [{"resume_token": "x" + session.resume_token}, {"session_id": "no-such-session"}]
    for override in overrides:
        attempt = await clients.open(server.url())
        frame = session.resume_frame(secret=SECRET)
        frame.update(override)
        await attempt.send(frame)
        connected = await session.read_connected(attempt)
        assert connected["resumed"] is False
        assert connected["session_id"] != session.session_id
        assert connected["resume_token"] != session.resume_token
        await attempt.send({"id": "f1", "message": "fresh"})
        await attempt.until_ended({"f1": ["assistant"]})
        assert attempt.frames[1]["message_number"] == 1 and attempt.frames[1]["seq"] == 1
    again = await session.resume()
    assert again.connected["resumed"] is True and again.connected["session_id"] == session.session_id
    await again.send({"id": "m2", "message": "still mine"})
    await again.until_ended({"m2": ["assistant"]})
    assert session.transcript.of("m2")[0]["message_number"] == 2


@pytest.mark.parametrize("secret", ["wrong", None])
async def test_resume_with_wrong_or_missing_secret_is_4001(
    start_server: StartServer, clients: Clients, secret: str | None
) -> None:
    server = await serve(start_server)
    session, conn = await started(clients, server)
    await conn.send({"id": "m1", "message": "hi"})
    await conn.until_ended({"m1": ["assistant"]})
    conn.drop()
    attempt = await clients.open(server.url())
    frame = session.resume_frame()
    if secret is not None:
        frame["secret"] = secret
    await attempt.send(frame)
    code, frames = await attempt.closed()
    assert [(f["type"], f["code"]) for f in frames] == [("error", "unauthorized")]
    assert code == 4001
    again = await session.resume()  # the failed attempt did not end the session
    assert again.connected["resumed"] is True


@pytest.mark.parametrize("where", ["header", "query"])
async def test_resume_with_secret_at_handshake(start_server: StartServer, clients: Clients, where: str) -> None:
    server = await serve(start_server, agents={"assistant": {"use": "echo", "delay": 0.02}})
    session, conn = await started(clients, server)
    text = words(10)
    await conn.send({"id": "m1", "message": text})
    await chunks_seen(conn, 2)
    last = session.transcript.last_seq
    conn.drop()
    if where == "header":
        again = await session.resume(with_secret=False, additional_headers={"X-Connic-Secret": SECRET})
    else:
        again = await session.resume(with_secret=False, url=server.url(f"/ws?secret={SECRET}"))
    assert again.connected["resumed"] is True and again.connected["session_id"] == session.session_id
    await again.until_ended({"m1": ["assistant"]})
    again.assert_seqs_follow(last)
    session.transcript.assert_complete()
    assert "".join(session.transcript.chunks("m1", "assistant")) == text


async def test_resume_with_auth_off(start_server: StartServer, clients: Clients) -> None:
    agents = {"assistant": {"use": "echo", "delay": 0.02}}
    server = await serve(start_server, {"require_auth": False}, agents)
    session = ResumeSession(clients, server.url(), secret=None)
    conn = await session.start()  # connected comes as soon as the socket opens
    text = words(10)
    await conn.send({"id": "m1", "message": text})
    await chunks_seen(conn, 2)
    last = session.transcript.last_seq
    conn.drop()
    again = await clients.open(server.url())
    await again.send(session.resume_frame(last))  # no secret: auth is off
    connected = await session.read_connected(again)
    if connected.get("resumed") is not True:
        # With auth off a fresh session's ``connected`` may already be on its way when the
        # resume frame arrives; the resumed session's ``connected`` must follow it.
        connected = await session.read_connected(again)
    assert connected["resumed"] is True and connected["recovered"] is True
    assert connected["session_id"] == session.session_id
    await again.until_ended({"m1": ["assistant"]})
    again.assert_seqs_follow(last)
    session.transcript.assert_complete()
    assert "".join(session.transcript.chunks("m1", "assistant")) == text


@pytest.mark.parametrize(
    "override",
    [
        {"last_seq": -1},
        {"last_seq": "3"},
        {"last_seq": 1.5},
        {"last_seq": None},
        {"session_id": 123},
        {"resume_token": None},
        {"resume_token": ["a"]},
    ],
)
async def test_resume_frame_with_bad_fields(
    start_server: StartServer, clients: Clients, override: dict[str, Any]
) -> None:
    server = await serve(start_server)
    session, conn = await started(clients, server)
    await conn.send({"id": "m1", "message": "hi"})
    await conn.until_ended({"m1": ["assistant"]})
    conn.drop()
    attempt = await clients.open(server.url())
    frame = session.resume_frame(secret=SECRET)
    frame.update(override)
    await attempt.send(frame)
    error = await attempt.recv()
    assert error["type"] == "error" and error["code"] == "invalid_resume" and error["id"] is None, error
    assert "seq" not in error
    connected = await session.read_connected(attempt)
    assert connected["resumed"] is False and connected["session_id"] != session.session_id
    await attempt.send({"id": "f1", "message": "fresh"})  # the connection stays open, on a fresh session
    await attempt.until_ended({"f1": ["assistant"]})
    assert attempt.frames[2] == {"type": "ack", "id": "f1", "message_number": 1, "seq": 1}


async def test_resume_after_connected_is_invalid_resume(start_server: StartServer, clients: Clients) -> None:
    server = await serve(start_server)
    session, conn = await started(clients, server)
    await conn.send({"id": "m1", "message": "hi"})
    await conn.until_ended({"m1": ["assistant"]})
    await conn.send(session.resume_frame(secret=SECRET))
    error = await conn.recv()
    assert error["type"] == "error" and error["code"] == "invalid_resume" and error["id"] is None, error
    assert "seq" not in error
    await conn.send({"id": "m2", "message": "still here"})
    await conn.until_ended({"m2": ["assistant"]})
    conn.assert_seqs_follow(0)
    assert session.transcript.of("m2")[0] == {"type": "ack", "id": "m2", "message_number": 2, "seq": 5}


# --- one connection per session; how a connection ends ------------------------------------


async def test_takeover_closes_the_old_socket_4011(start_server: StartServer, clients: Clients) -> None:
    server = await serve(start_server)
    session, old = await started(clients, server)
    await old.send({"id": "m1", "message": "hi"})
    await old.until_ended({"m1": ["assistant"]})
    new = await session.resume()  # the old socket is still open
    assert new.connected["resumed"] is True and new.connected["recovered"] is True
    assert new.connected["session_id"] == session.session_id
    code, frames = await old.closed()
    assert [(f["type"], f["code"], f["id"]) for f in frames] == [("error", "session_taken_over", None)]
    assert "seq" not in frames[0]
    assert code == 4011
    assert await new.barrier() == []  # nothing to replay
    await new.send({"id": "m2", "message": "on the new socket"})
    await new.until_ended({"m2": ["assistant"]})
    new.assert_seqs_follow(4)
    session.transcript.assert_complete()
    assert session.transcript.of("m2")[0]["message_number"] == 2


async def test_takeover_mid_stream(start_server: StartServer, clients: Clients) -> None:
    server = await serve(start_server, agents={"assistant": {"use": "echo", "delay": 0.03}})
    session, old = await started(clients, server)
    text = words(20)
    await old.send({"id": "m1", "message": text})
    await chunks_seen(old, 3)
    last = session.transcript.last_seq
    new = await session.resume(last)  # the old socket still open, and still being written to
    old.transcript = Transcript()  # what the old socket got meanwhile is not the client's any more
    assert new.connected["resumed"] is True and new.connected["recovered"] is True
    await new.until_ended({"m1": ["assistant"]})
    new.assert_seqs_follow(last)
    session.transcript.assert_complete()
    assert "".join(session.transcript.chunks("m1", "assistant")) == text
    code, frames = await old.closed()
    assert code == 4011
    assert frames[-1]["type"] == "error" and frames[-1]["code"] == "session_taken_over"


@pytest.mark.parametrize(("code", "resumable"), [(1000, False), (1001, True)])
async def test_client_close_code_ends_or_detaches(
    start_server: StartServer, clients: Clients, code: int, resumable: bool
) -> None:
    server = await serve(start_server)
    session, conn = await started(clients, server)
    await conn.send({"id": "m1", "message": "hi"})
    await conn.until_ended({"m1": ["assistant"]})
    await conn.ws.close(code)  # returns once the server answered the close
    again = await session.resume()
    assert again.connected["resumed"] is resumable
    assert (again.connected["session_id"] == session.session_id) is resumable
    await again.send({"id": "m2", "message": "again"})
    await again.until(lambda f: f["type"] == "stream_end")
    ack = next(f for f in again.frames if f["type"] == "ack")
    assert ack["message_number"] == (2 if resumable else 1)
    assert ack["seq"] == (5 if resumable else 1)


async def test_server_started_close_detaches(start_server: StartServer, clients: Clients) -> None:
    server = await serve(start_server, {"max_frame_bytes": 1000})
    session, conn = await started(clients, server)
    await conn.send({"id": "m1", "message": "hi"})
    await conn.until_ended({"m1": ["assistant"]})
    await conn.send({"id": "big", "message": "x" * 2000})
    code, frames = await conn.closed()  # the client answers the server's close: not a close it started
    assert code == 1009
    assert [(f["type"], f["code"], f["id"]) for f in frames] == [("error", "message_too_large", None)]
    again = await session.resume()
    assert again.connected["resumed"] is True and again.connected["session_id"] == session.session_id
    await again.send({"id": "m2", "message": "after"})
    await again.until_ended({"m2": ["assistant"]})
    again.assert_seqs_follow(4)
    assert session.transcript.of("m2")[0]["message_number"] == 2


# --- replies while detached ------------------------------------------------------------


async def test_on_disconnect_cancel_ends_the_reply_cancelled(start_server: StartServer, clients: Clients) -> None:
    agents = {"assistant": {"use": "echo", "delay": 0.05}}
    server = await serve(start_server, {"on_disconnect": "cancel"}, agents)
    session, conn = await started(clients, server)
    text = words(40)  # about 2 s of streaming: cancelled long before its end
    await conn.send({"id": "m1", "message": text})
    await chunks_seen(conn, 2)
    last = session.transcript.last_seq
    conn.drop()
    await wait_turns(server.http, "assistant", 1, reason="cancelled")
    again = await session.resume()
    assert again.connected["resumed"] is True and again.connected["recovered"] is True
    await again.until_ended({"m1": ["assistant"]})
    again.assert_seqs_follow(last)
    session.transcript.assert_complete()
    end = session.transcript.end("m1", "assistant")
    assert end is not None and end["type"] == "stream_end" and end["finish_reason"] == "cancelled"
    produced = "".join(session.transcript.chunks("m1", "assistant"))
    assert end["full_response"] == produced
    assert text.startswith(produced) and len(produced) < len(text)
    await again.send({"id": "m2", "message": "next one"})
    await again.until_ended({"m2": ["assistant"]})
    end2 = session.transcript.end("m2", "assistant")
    assert end2 is not None and end2["finish_reason"] == "stop" and end2["full_response"] == "next one"
    assert session.transcript.of("m2")[0]["message_number"] == 2


async def test_on_disconnect_continue_answers_queued_messages_while_detached(
    start_server: StartServer, clients: Clients
) -> None:
    agents = {"assistant": {"use": "echo", "delay": 0.03}}
    server = await serve(start_server, {"on_disconnect": "continue"}, agents)
    session, conn = await started(clients, server)
    first, second = words(10, "a"), words(5, "b")
    await conn.send({"id": "m1", "message": first})
    await conn.send({"id": "m2", "message": second})
    await conn.until(lambda f: f["type"] == "ack" and f["id"] == "m2")  # the server has both messages
    await chunks_seen(conn, 1)
    last = session.transcript.last_seq
    conn.drop()
    await wait_turns(server.http, "assistant", 2)  # both answered with no client attached
    again = await session.resume()
    assert again.connected["resumed"] is True and again.connected["recovered"] is True
    total = 2 + (2 + 10) + (2 + 5)
    assert again.connected["last_seq"] == total
    await again.until_ended({"m1": ["assistant"], "m2": ["assistant"]})
    again.assert_seqs_follow(last)
    session.transcript.assert_complete()
    assert session.transcript.last_seq == total
    replies = [f for f in session.transcript.ordered() if f["type"] != "ack"]
    assert [f["id"] for f in replies] == ["m1"] * 12 + ["m2"] * 7  # answered in order, not interleaved
    for message_id, text in (("m1", first), ("m2", second)):
        end = session.transcript.end(message_id, "assistant")
        assert end is not None and end["finish_reason"] == "stop"
        assert end["full_response"] == text == "".join(session.transcript.chunks(message_id, "assistant"))
    acks = [f for f in session.transcript.ordered() if f["type"] == "ack"]
    assert [(a["id"], a["message_number"]) for a in acks] == [("m1", 1), ("m2", 2)]


async def test_two_agents_interleave_across_resumes(start_server: StartServer, clients: Clients) -> None:
    agents = {"fast": {"use": "echo", "delay": 0.01}, "slow": {"use": "echo", "delay": 0.04}}
    server = await serve(start_server, agents=agents)
    session, conn = await started(clients, server)
    texts = {"m1": words(12, "x"), "m2": words(8, "y")}
    await conn.send({"id": "m1", "message": texts["m1"]})
    await chunks_seen(conn, 4)
    last = session.transcript.last_seq
    conn.drop()
    again = await session.resume()
    assert again.connected["resumed"] is True and again.connected["recovered"] is True
    await again.until_ended({"m1": ["fast", "slow"]})
    again.assert_seqs_follow(last)
    await again.send({"id": "m2", "message": texts["m2"]})
    await chunks_seen(again, sum(f["type"] == "stream_chunk" for f in again.frames) + 3)
    last = session.transcript.last_seq
    again.drop()
    third = await session.resume()
    assert third.connected["resumed"] is True and third.connected["recovered"] is True
    await third.until_ended({"m2": ["fast", "slow"]})
    third.assert_seqs_follow(last)

    session.transcript.assert_complete()
    for message_id, text in texts.items():
        for agent in ("fast", "slow"):
            end = session.transcript.end(message_id, agent)
            assert end is not None and end["type"] == "stream_end" and end["finish_reason"] == "stop"
            assert "".join(session.transcript.chunks(message_id, agent)) == end["full_response"] == text
    assert [f["message_number"] for f in session.transcript.ordered() if f["type"] == "ack"] == [1, 2]


async def test_limits_history_and_state_continue_across_resumes(start_server: StartServer, clients: Clients) -> None:
    server = await serve(start_server, {"max_messages": 3}, {"inspect": {"use": "inspect"}})
    session, conn = await started(clients, server)

    async def ask(on: Conn, message_id: str, text: str) -> dict[str, Any]:
        await on.send({"id": message_id, "message": text})
        await on.until_ended({message_id: ["inspect"]})
        end = session.transcript.end(message_id, "inspect")
        assert end is not None and end["type"] == "stream_end", end
        seen: dict[str, Any] = json.loads(end["full_response"])
        return seen

    seen1 = await ask(conn, "m1", "first")
    assert seen1["number"] == 1 and seen1["history"] == [] and seen1["state"] == {"turns": 1}
    reply1 = session.transcript.end("m1", "inspect")["full_response"]  # type: ignore[index]
    conn.drop()

    again = await session.resume()
    assert again.connected["resumed"] is True
    assert again.connected["max_messages"] == 3
    seen2 = await ask(again, "m2", "second")
    assert session.transcript.of("m2")[0]["message_number"] == 2
    assert seen2["number"] == 2
    assert seen2["session_id"] == session.session_id
    assert seen2["history"] == [
        {"role": "user", "text": "first", "agent": None, "id": "m1", "message_number": 1},
        {"role": "agent", "text": reply1, "agent": "inspect", "id": "m1", "message_number": 1},
    ]
    assert seen2["state"] == {"turns": 2}  # the agent's per-session state survived the resume
    await again.ws.close(1001)  # a browser leaving the page: detached, not ended

    third = await session.resume()
    assert third.connected["resumed"] is True
    seen3 = await ask(third, "m3", "third")
    assert seen3["number"] == 3 and seen3["state"] == {"turns": 3} and len(seen3["history"]) == 4
    await third.send({"id": "m4", "message": "over the limit"})  # max_messages counted across resumes
    code, frames = await third.closed()
    assert [(f["type"], f.get("code"), f["id"]) for f in frames] == [("error", "message_limit_reached", "m4")]
    assert "seq" in frames[0]
    assert code == 4009
    session.transcript.assert_complete()
    after = await session.resume()  # 4009 ended the session for good
    assert after.connected["resumed"] is False and after.connected["session_id"] != session.session_id


async def test_cancel_messages_accepted_before_the_resume(start_server: StartServer, clients: Clients) -> None:
    agents = {"slow": {"use": "slow", "seconds": 30}, "echo": {"use": "echo"}}
    server = await serve(start_server, agents=agents)
    session, conn = await started(clients, server)
    await conn.send({"type": "message", "id": "m1", "payload": {"message": "long", "agent": "slow"}})
    await conn.send({"type": "message", "id": "m2", "payload": {"message": "queued", "agent": "slow"}})
    # The ack of m2 and m1's first chunk may come in either order.
    while not (
        any(f["type"] == "stream_chunk" for f in conn.frames)
        and any(f["type"] == "ack" and f["id"] == "m2" for f in conn.frames)
    ):
        await conn.recv()
    last = session.transcript.last_seq
    conn.drop()

    again = await session.resume()
    assert again.connected["resumed"] is True
    await again.send({"type": "cancel", "id": "m2"})  # queued, accepted by the dropped connection
    await again.send({"type": "cancel", "id": "m1"})  # in flight, accepted by the dropped connection
    await again.until_ended({"m1": ["slow"]})
    end = session.transcript.end("m1", "slow")
    assert end is not None and end["finish_reason"] == "cancelled" and end["full_response"] == "started "
    await again.send({"type": "cancel", "id": "m2"})  # already dropped from the queue
    error = (await again.until_type("error"))[-1]
    assert error["code"] == "not_found" and error["id"] == "m2" and "seq" in error
    await again.send({"type": "message", "id": "m3", "payload": {"message": "quick", "agent": "echo"}})
    await again.until_ended({"m3": ["echo"]})
    again.assert_seqs_follow(last)
    session.transcript.assert_complete()
    assert [f["type"] for f in session.transcript.of("m2")] == ["ack", "error"]  # never answered
    ack3 = session.transcript.of("m3")[0]
    assert ack3["type"] == "ack" and ack3["message_number"] == 3


# --- seed clients ----------------------------------------------------------------------------


async def test_seed_client_sees_only_extra_fields(server: Server, connect: Connect) -> None:
    client = await connect(server.url(), keep_seq=True)
    connected = client.connected  # type: ignore[attr-defined]
    assert {"type", "session_id", "agents"} <= set(connected)
    assert connected["agents"] == ["assistant"]
    frames = await client.reply({"message": "Hello there!"})
    assert [{k: v for k, v in f.items() if k != "seq"} for f in frames] == [
        {"type": "ack", "id": "auto-1", "message_number": 1},
        {"type": "stream_start", "id": "auto-1", "agent": "assistant"},
        {"type": "stream_chunk", "id": "auto-1", "agent": "assistant", "chunk": "Hello "},
        {"type": "stream_chunk", "id": "auto-1", "agent": "assistant", "chunk": "there!"},
        {
            "type": "stream_end",
            "id": "auto-1",
            "agent": "assistant",
            "full_response": "Hello there!",
            "token_usage": {"prompt_tokens": 2, "candidates_tokens": 2},
            "finish_reason": "stop",
        },
    ]
    assert [f["seq"] for f in frames] == [1, 2, 3, 4, 5]


async def test_seed_python_example_unchanged_and_its_close_ends_the_session(
    server: Server, clients: Clients, tmp_path: Path
) -> None:
    script = (DATA / "seed_python_example.txt").read_text()
    script = script.replace("<websocket-url>", server.url()).replace("<your-secret-key>", SECRET)
    path = tmp_path / "chat.py"
    path.write_text(script)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(path), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    lines = out.decode().splitlines()
    assert lines[0].startswith("Connected: {'type': 'connected', 'session_id': ")
    connected = ast.literal_eval(lines[0].removeprefix("Connected: "))
    assert isinstance(connected["resume_token"], str)
    assert lines[1:] == ["Hello!", "Done! Tokens: {'prompt_tokens': 1, 'candidates_tokens': 1}"]
    # The example leaves with ``async with``: a close 1000 the client starts ends the session.
    session = ResumeSession(clients, server.url())
    session.session_id, session.resume_token = connected["session_id"], connected["resume_token"]
    again = await session.resume(0)
    assert again.connected["resumed"] is False and again.connected["session_id"] != session.session_id
