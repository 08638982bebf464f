"""Control frames (acks, pongs, errors, history) sent while a resume's replay still fills the outbox.

A resume queues every logged frame the client missed at once (up to ``replay_buffer``, 4096 by
default), however small ``send_queue`` is (256 by default). A control frame queued behind
that backlog (the ack of a message the client resends at once, the pong of its ping) found
more than two outboxes' worth queued and closed the client as a slow consumer (4010) at once,
though it reads everything: each case resumes after missing more frames than that, sends
its frame right behind the resume frame, and must get the replay, its answer and no close.
Real ``websockets`` clients against a real in-process server, on each session store.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import resume_helpers
from resume_helpers import Clients, ResumeSession, serve, wait_turns, words

from conftest import SECRET, StartServer

store_url, start_server, clients = resume_helpers.store_url, resume_helpers.start_server, resume_helpers.clients_fixture

SEND_QUEUE = 8
# 200 chunks of 500 characters: more than one write takes (64 KiB), so most of the replay waits in
# the outbox, many times SEND_QUEUE frames.
TEXT = words(200, prefix="w" * 500)

# What the client sends right behind its resume frame, and the frame that answers it.
_RIGHT_BEHIND: dict[str, tuple[dict[str, Any], str]] = {
    "message": ({"type": "message", "id": "m2", "payload": {"message": "again"}}, "stream_end"),
    "ping": ({"type": "ping"}, "pong"),
    "history": ({"type": "history"}, "history"),
}


@pytest.mark.parametrize("sent", _RIGHT_BEHIND)
async def test_a_frame_right_behind_a_long_replay_is_answered_without_a_close(
    start_server: StartServer, clients: Clients, sent: str
) -> None:
    server = await serve(start_server, {"send_queue": SEND_QUEUE}, agents={"assistant": {"use": "echo"}})
    session = ResumeSession(clients, server.url())
    conn = await session.start()
    await conn.send({"type": "message", "id": "m1", "payload": {"message": TEXT}})
    await conn.until(lambda f: f["type"] == "ack")
    session.drop()
    await wait_turns(server.http, "assistant", 1)  # m1 answered into the log, nobody attached

    frame, answer = _RIGHT_BEHIND[sent]
    conn = await clients.open(server.url())
    await conn.send(session.resume_frame(secret=SECRET))
    await conn.send(frame)  # right behind it, as a client resending what was never acked does
    connected = await session.read_connected(conn)
    assert connected["resumed"] is True, connected
    got = await conn.until(lambda f: f["type"] == answer and (answer != "stream_end" or f["id"] == "m2"), timeout=15)
    assert all(f["type"] != "error" for f in got), [f for f in got if f["type"] == "error"]
    await conn.until_ended({"m1": ["assistant"]})
    session.transcript.assert_complete()
    assert "".join(session.transcript.chunks("m1", "assistant")) == TEXT
    await asyncio.sleep(0.3)
    await conn.barrier()  # still open
