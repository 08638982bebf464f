"""Connector options combined: behaviours one documented option changes when another is set too.

Each test here pairs two options of docs/configuration.md whose interplay is described in
docs/protocol.md, with real ``websockets`` clients against a real in-process server, on each
session store (tests/resume_helpers.py). A drop is a TCP reset with no close frame.
"""

from __future__ import annotations

import resume_helpers
from resume_helpers import Clients, ResumeSession, serve, wait_turns

from conftest import StartServer

store_url, start_server, clients = resume_helpers.store_url, resume_helpers.start_server, resume_helpers.clients_fixture


async def test_replies_past_max_messages_wait_for_a_resume_after_a_drop(
    start_server: StartServer, clients: Clients
) -> None:
    """``max_messages`` with the resume window: the replies a session owed when it reached its
    limit are finished into the replay log while it is detached, and a client that resumes after
    they ended gets them, then the 4009 it missed; the session did not end before it came back."""
    server = await serve(start_server, {"max_messages": 2}, {"assistant": {"use": "echo", "delay": 0.02}})
    session = ResumeSession(clients, server.url())
    conn = await session.start()
    for n in (1, 2, 3):
        await conn.send({"id": f"m{n}", "message": "one two three four"})
    refused = await conn.until(lambda f: f.get("code") == "message_limit_reached")
    assert refused[-1]["id"] == "m3"
    last_seen = session.transcript.last_seq
    session.drop()
    await wait_turns(server.http, "assistant", 2)  # both replies ended with no client attached

    back = await session.resume()
    assert back.connected["resumed"] is True, back.connected
    code, _ = await back.closed()
    assert code == 4009
    ends = [f for f in back.frames if f["type"] == "stream_end"]
    assert [(f["id"], f["full_response"]) for f in ends] == [("m1", "one two three four"), ("m2", "one two three four")]
    assert back.seqs[0] == last_seen + 1
    session.transcript.assert_complete()
    assert not [f for f in back.frames if f["type"] == "error"]  # the close says it: no further error frame
