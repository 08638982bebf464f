"""Connector options combined: behaviours one documented option changes when another is set too.

Each test here pairs two options of docs/configuration.md whose interplay is described in
docs/protocol.md, with real ``websockets`` clients against a real in-process server, on each
session store (tests/resume_helpers.py). A drop is a TCP reset with no close frame.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aiohttp
import resume_helpers
from resume_helpers import Clients, ResumeSession, serve, wait_turns, words

from conftest import SECRET, StartServer, make_config

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


async def _run_events(http: aiohttp.ClientSession, url: str, run_id: str, text: str) -> list[dict[str, Any]]:
    run = {
        "threadId": "t1",
        "runId": run_id,
        "messages": [{"id": f"u-{run_id}", "role": "user", "content": text}],
        "tools": [],
        "context": [],
        "state": {},
        "forwardedProps": {},
    }
    async with http.post(url, json=run, headers={"Authorization": f"Bearer {SECRET}"}) as response:
        body = await asyncio.wait_for(response.text(), 10)
    return [json.loads(line[6:]) for line in body.splitlines() if line.startswith("data: ")]


async def test_agui_run_after_a_thread_over_max_messages_lost_its_client_starts_the_thread_again(
    start_server: StartServer,
) -> None:
    """``max_messages`` with an SSE run whose client went away: the thread is over, and the next
    run starts it again (a new conversation), as when its last run streams to the end; it is not
    refused as over the limit."""
    config = make_config(agents={"assistant": {"use": "echo", "delay": 0.02}})
    config["connectors"] = [{"transport": "agui", "path": "/agui", "secrets": [SECRET], "max_messages": 1}]
    server = await start_server(config)
    url = server.http + "/agui"
    async with aiohttp.ClientSession() as http:
        first = {"threadId": "t1", "runId": "r1", "messages": [{"id": "u1", "role": "user", "content": words(30)}]}
        first |= {"tools": [], "context": [], "state": {}, "forwardedProps": {}}
        streaming = await http.post(url, json=first, headers={"Authorization": f"Bearer {SECRET}"})
        await streaming.content.readline()  # RUN_STARTED: the run is accepted
        refused = await _run_events(http, url, "r2", "over the limit")
        assert refused[-1]["type"] == "RUN_ERROR" and refused[-1]["code"] == "message_limit_reached"
        streaming.close()  # the client goes away mid-run (on_disconnect = "cancel")
        await wait_turns(server.http, "assistant", 1, "cancelled")
        again = await _run_events(http, url, "r3", "hello again")
    assert again[-1]["type"] == "RUN_FINISHED", again
    text = "".join(e["delta"] for e in again if e["type"] == "TEXT_MESSAGE_CONTENT")
    assert text == "hello again"


# --- several agents on one connector, with a small send_queue ------------------------------

AGENTS = {f"a{n}": {"use": "echo"} for n in range(3)}
SEND_TIMEOUT = 1.0


async def test_several_agents_behind_a_small_send_queue_stream_to_a_reading_client(
    start_server: StartServer, clients: Clients
) -> None:
    """Three agents stream into a ``send_queue`` of one frame, to a client that reads all the
    time: each agent's frame waits for room while the others take it, and the client, never
    quiet for ``send_timeout``, gets every reply. One agent beaten to the room by the others
    for ``send_timeout`` in all was once taken for a slow consumer (4010)."""
    server = await serve(start_server, {"send_queue": 1, "send_timeout": SEND_TIMEOUT}, AGENTS)
    conn = await ResumeSession(clients, server.url()).start()
    text = words(4000)
    await conn.send({"id": "m1", "message": text})
    ends: dict[str, str] = {}
    longest = 0.0
    last = time.monotonic()
    while len(ends) < len(AGENTS):
        # Read bare (no transcript): at the client's full speed, as a client that keeps up.
        frame = json.loads(await asyncio.wait_for(conn.ws.recv(), 5.0))  # ConnectionClosed: 4010
        now = time.monotonic()
        longest, last = max(longest, now - last), now
        if frame["type"] == "stream_end":
            ends[frame["agent"]] = frame["full_response"]
    assert longest < SEND_TIMEOUT  # the client was never quiet for send_timeout
    assert ends == dict.fromkeys(AGENTS, text)


async def test_several_agents_behind_a_small_send_queue_stream_to_a_reading_agui_client(
    start_server: StartServer,
) -> None:
    """As above, for an AG-UI run over SSE: every agent's text comes, and the run finishes."""
    config = make_config(agents=AGENTS)
    connector = {"transport": "agui", "path": "/agui", "secrets": [SECRET], "send_queue": 1}
    config["connectors"] = [connector | {"send_timeout": SEND_TIMEOUT}]
    server = await start_server(config)
    text = words(4000)
    async with aiohttp.ClientSession() as http:
        events = await _run_events(http, server.http + "/agui", "r1", text)
    assert events[-1]["type"] == "RUN_FINISHED", events[-1]
    texts: dict[str, str] = {}
    for event in events:
        if event["type"] == "TEXT_MESSAGE_CONTENT":
            texts[event["messageId"]] = texts.get(event["messageId"], "") + event["delta"]
    assert sorted(texts.values()) == [text] * len(AGENTS)
