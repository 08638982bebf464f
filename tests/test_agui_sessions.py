"""One session, two protocols: a conversation started over the Connic WebSocket protocol goes on
over AG-UI with threadId = session id, and back; with the memory store and with Redis (two apps
sharing one redis-server stand for two processes). Real clients against real servers."""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path
from typing import Any

import pytest
from redis_server import (
    RedisServer,
    redis_server_fixture,  # noqa: F401  (a fixture)
    running_redis,
    with_store,
)
from test_agui_support import SECRET, agui_config, agui_registry, post_run, run_input, text_of

from conftest import Connect, StartServer

AGENTS = {"look": {"use": "inspect"}}


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


async def test_an_agui_thread_whose_record_does_not_decode_is_refused_with_503_until_repaired(
    start_server: StartServer, redis_server: RedisServer
) -> None:
    # A record the store cannot read is the store failing for that thread: 503 and Retry-After,
    # never a 500, and the record stays as it is, so the thread goes on once it is repaired.
    import redis.asyncio as aioredis

    start = with_store(start_server, redis_server.url)
    one = await start(agui_config(agents=AGENTS), registry=agui_registry())
    two = await start(agui_config(agents=AGENTS), registry=agui_registry())
    status, _ = await post_run(one.http + "/agui", run_input("thread-bad", "on process one"))
    assert status == 200
    client = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        key = "connic:{thread-bad}:record"
        kept = await client.get(key)
        await client.set(key, "not json", keepttl=True)
        status, text = await post_run(two.http + "/agui", run_input("thread-bad", "on process two"))
        assert status == 503 and "cannot be read" in str(text), (status, text)
        await client.set(key, kept, keepttl=True)
    finally:
        await client.aclose()
    status, events = await post_run(two.http + "/agui", run_input("thread-bad", "on process two"))
    assert status == 200, events
    turn = seen(events)
    assert turn["history"][0]["text"] == "on process one"


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


async def test_a_wrong_resume_token_counts_as_a_failed_authentication(
    start_server: StartServer, connect: Connect
) -> None:
    # PROTOCOL.md §7: a failed resume counts as a failed authentication, so a thread's token
    # cannot be guessed faster than a secret.
    cfg = agui_config(connector={"max_auth_failures": 2}, agents=AGENTS, websocket={})
    server = await start_server(cfg, registry=agui_registry())
    ws = await connect(server.url("/ws"), secret=SECRET)
    session_id, token = ws.connected["session_id"], ws.connected["resume_token"]  # type: ignore[attr-defined]
    await ws.reply({"message": "hello"})
    url = server.http + "/agui"
    wrong = {"Authorization": f"Bearer {SECRET}", "X-Connic-Resume-Token": "guess"}
    for _ in range(2):
        status, text = await post_run(url, run_input(session_id, "guessing"), headers=wrong)
        assert status == 403, text
    right = {"Authorization": f"Bearer {SECRET}", "X-Connic-Resume-Token": token}
    status, text = await post_run(url, run_input(session_id, "with the token"), headers=right)
    assert status == 429 and "too many failed authentications" in str(text)  # braked, even the right one


@pytest.mark.parametrize("store", ["memory", "redis"])
async def test_concurrent_runs_of_a_known_thread_take_turns(
    start_server: StartServer, tmp_path: Path, store: str
) -> None:
    # With redis, looking a thread up awaits the store: the runs queue on the thread's lock,
    # and one arriving just as it is handed on must still wait its turn.
    agents = {"assistant": {"use": "echo"}, "look": {"use": "inspect"}}
    cfg = agui_config({"max_queued": 50}, agents)
    with contextlib.ExitStack() as stack:
        start = start_server
        if store == "redis":
            start = with_store(start_server, stack.enter_context(running_redis(tmp_path)).url)
        server = await start(cfg, registry=agui_registry())
        await take_turns(server.http + "/agui")


async def take_turns(url: str) -> None:
    """Rounds of runs of one thread, all at once; each run answered, never taken over, in one session."""
    status, _ = await post_run(url + "/assistant", run_input("t-turns", "first"))
    assert status == 200
    for _ in range(3):  # the runs arrive together: some while another looks the thread up
        texts = [f"run {n}" for n in range(12)]
        results = await asyncio.gather(*(post_run(url + "/assistant", run_input("t-turns", t)) for t in texts))
        for (status, events), text in zip(results, texts, strict=True):
            assert status == 200, events  # never 409 (taken over meanwhile)
            assert isinstance(events, list) and events[-1].type.value == "RUN_FINISHED", events[-1]
            assert text_of(events) == text
    status, events = await post_run(url + "/look", run_input("t-turns", "how many?"))
    assert status == 200
    assert json.loads(text_of(events))["number"] == 1 + 3 * 12 + 1  # one session answered every run


async def test_a_run_arriving_as_the_thread_lock_is_handed_on_waits_its_turn() -> None:
    # The moment the black-box test above can only hit by chance, made certain: run A leaves the
    # lookup while B waits for it, and C, already on its way, comes in before B wakes up.
    import connic
    from connic.app import RUNTIME

    transport = connic.create_app(agui_config(), registry=agui_registry())[RUNTIME].transports[0]
    threads = transport.threads  # type: ignore[attr-defined]
    inside: list[str] = []
    most = 0
    later: list[asyncio.Task[None]] = []
    a_may_leave = asyncio.Event()

    async def run(name: str) -> None:
        nonlocal most
        async with threads._one_at_a_time("t-lock"):
            inside.append(name)
            most = max(most, len(inside))
            if name == "A":
                await a_may_leave.wait()
            await asyncio.sleep(0.01)  # a lookup that awaits the store
            inside.remove(name)
            if name == "A":
                later.append(asyncio.create_task(run("C")))  # runs before B, woken by A's release

    a = asyncio.create_task(run("A"))
    await asyncio.sleep(0)
    b = asyncio.create_task(run("B"))
    await asyncio.sleep(0)  # B waits for A's lock
    a_may_leave.set()
    await asyncio.wait_for(asyncio.gather(a, b), 5)
    await asyncio.wait_for(asyncio.gather(*later), 5)
    assert most == 1, "two runs looked the thread up at once"
    assert not threads._finding  # and the lock went with the last of them


async def test_a_websocket_resume_past_a_taken_threads_seq_lets_the_thread_go(
    start_server: StartServer, redis_server: RedisServer
) -> None:
    # Process two takes the thread over from the store to check the resume, then refuses it
    # (lastSeq is past the thread's seq): it must let the thread go, not own it for ever.
    import websockets
    from test_agui_support import AUTH
    from test_redis_store import wait_until_let_go

    start = with_store(start_server, redis_server.url)
    one = await start(agui_config(agents=AGENTS), registry=agui_registry())
    two = await start(agui_config(agents=AGENTS), registry=agui_registry())
    status, _ = await post_run(one.http + "/agui", run_input("thread-far", "on process one"))
    assert status == 200
    await wait_until_let_go(redis_server.url, "thread-far")
    async with websockets.connect(two.base + "/agui/ws", additional_headers=AUTH) as ws:
        await ws.send(json.dumps({"type": "resume", "threadId": "thread-far", "lastSeq": 10**6}))
        error = json.loads(await ws.recv())
        assert error["type"] == "RUN_ERROR" and error["code"] == "invalid_resume", error
    await wait_until_let_go(redis_server.url, "thread-far")
    status, events = await post_run(one.http + "/agui", run_input("thread-far", "on process one again"))
    assert status == 200, events
    assert seen(events)["history"][0]["text"] == "on process one"
