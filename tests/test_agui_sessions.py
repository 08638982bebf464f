"""One session, two protocols: a conversation started over the Connic WebSocket protocol goes on
over AG-UI with threadId = session id, and back; with the memory store and with Redis (two apps
sharing one redis-server stand for two processes). Real clients against real servers."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from redis_server import RedisServer, running_redis, with_store
from test_agui_support import SECRET, agui_config, agui_registry, post_run, run_input, text_of

from conftest import Connect, StartServer

AGENTS = {"look": {"use": "inspect"}}


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    with running_redis(tmp_path) as server:
        yield server


def config() -> dict[str, Any]:
    return agui_config(agents=AGENTS, websocket={})


def seen(events: Any) -> dict[str, Any]:
    """What the inspect agent saw of its turn (it answers with a JSON dump)."""
    assert isinstance(events, list), events
    result: dict[str, Any] = json.loads(text_of(events))
    return result


async def ws_then_agui(start_a: Any, start_b: Any, connect: Connect) -> None:
    """Talk over the WebSocket protocol on server A, continue over AG-UI on B, then resume over WS on B."""
    server_a = await start_a(config(), registry=agui_registry())
    server_b = server_a if start_b is None else await start_b(config(), registry=agui_registry())
    ws = await connect(server_a.url("/ws"), secret=SECRET)
    session_id, token = ws.connected["session_id"], ws.connected["resume_token"]  # type: ignore[attr-defined]
    await ws.reply({"message": "said over the websocket"})
    await ws.ws.close(4000)  # not 1000, which would end the session (PROTOCOL.md §7): it stays resumable

    url = server_b.http + "/agui"
    # Another connector's session: its resume token is the client's claim to it.
    status, text = await post_run(url, run_input(session_id, "no token"))
    assert status == 403 and "X-Connic-Resume-Token" in str(text)
    headers = {"Authorization": f"Bearer {SECRET}", "X-Connic-Resume-Token": token}
    status, events = await post_run(url, run_input(session_id, "said over ag-ui"), headers=headers)
    assert status == 200
    turn = seen(events)
    assert turn["session_id"] == session_id
    assert turn["history"][0]["text"] == "said over the websocket"
    assert turn["number"] == 2  # the session's own count goes on

    # And back: the session resumes over the WebSocket protocol, its history holding both.
    back = await connect(server_b.url("/ws"), secret=None, expect_connected=False)
    await back.send(
        {"type": "resume", "session_id": session_id, "resume_token": token, "last_seq": 0, "secret": SECRET}
    )
    connected = await back.recv()
    assert connected["type"] == "connected" and connected["resumed"] is True, connected
    await back.send({"type": "history"})
    frames = await back.until("history")
    entries = frames[-1]["entries"]
    users = [e["text"] for e in entries if e["role"] == "user"]
    assert users == ["said over the websocket", "said over ag-ui"]


async def test_a_websocket_session_continues_over_agui_memory_store(
    start_server: StartServer, connect: Connect
) -> None:
    await ws_then_agui(start_server, None, connect)


async def test_a_websocket_session_continues_over_agui_redis_across_processes(
    start_server: StartServer, connect: Connect, redis_server: RedisServer
) -> None:
    start = with_store(start_server, redis_server.url)
    await ws_then_agui(start, start, connect)


async def test_an_agui_thread_continues_on_another_process_with_redis(
    start_server: StartServer, redis_server: RedisServer
) -> None:
    start = with_store(start_server, redis_server.url)
    one = await start(agui_config(agents=AGENTS), registry=agui_registry())
    two = await start(agui_config(agents=AGENTS), registry=agui_registry())
    status, _ = await post_run(one.http + "/agui", run_input("thread-r", "on process one"))
    assert status == 200
    status, events = await post_run(two.http + "/agui", run_input("thread-r", "on process two"))
    assert status == 200
    turn = seen(events)
    assert turn["history"][0]["text"] == "on process one"
    assert turn["number"] == 2


async def test_an_attached_websocket_is_taken_over(start_server: StartServer, connect: Connect) -> None:
    server = await start_server(config(), registry=agui_registry())
    ws = await connect(server.url("/ws"), secret=SECRET)
    session_id, token = ws.connected["session_id"], ws.connected["resume_token"]  # type: ignore[attr-defined]
    await ws.reply({"message": "first"})
    headers = {"Authorization": f"Bearer {SECRET}", "X-Connic-Resume-Token": token}
    status, events = await post_run(server.http + "/agui", run_input(session_id, "second"), headers=headers)
    assert status == 200 and seen(events)["number"] == 2
    code, frames = await ws.closed()
    assert code == 4011, frames  # PROTOCOL.md §7: another connection took the session over


async def test_a_websocket_closed_with_another_code_than_1000_detaches(
    start_server: StartServer, connect: Connect
) -> None:
    # PROTOCOL.md §7: only a 1000 close ends the session; any other end detaches it, and its
    # resume window runs. (It stayed attached to the closed connection: never let go to
    # another process, never expiring by resume_window.)
    server = await start_server(agui_config(agents=AGENTS, websocket={"resume_window": 0.3}), registry=agui_registry())
    ws = await connect(server.url("/ws"), secret=SECRET)
    session_id, token = ws.connected["session_id"], ws.connected["resume_token"]  # type: ignore[attr-defined]
    await ws.reply({"message": "hello"})
    await ws.ws.close(4000)
    await asyncio.sleep(1.0)  # well past the resume window
    back = await connect(server.url("/ws"), secret=None, expect_connected=False)
    resume = {"type": "resume", "session_id": session_id, "resume_token": token, "last_seq": 0, "secret": SECRET}
    await back.send(resume)
    connected = await back.recv()
    assert connected["type"] == "connected" and connected["resumed"] is False, connected
