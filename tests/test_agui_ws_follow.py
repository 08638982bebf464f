"""AG-UI's WebSocket binding resuming on another process while a run streams on the first (``redis`` store).

docs/agui.md, "Resuming on the WebSocket binding": the resume follows the run in flight,
as the Connic protocol's does. Two connic apps share one ``redis-server`` (as in
tests/test_redis_continuity.py); the clients are real ``websockets`` clients.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
import websockets
from redis_server import (
    RedisServer,
    redis_server_fixture,  # noqa: F401  (a fixture)
    with_store,
)
from test_agui_support import AUTH, agui_config, agui_registry, run_input

from conftest import Server, StartServer

pytest.importorskip("redis.asyncio", reason="redis-py is not installed (pip install 'connic[redis]')")

WORDS = " ".join(f"w{n}" for n in range(100))  # 100 chunks 50 ms apart: 5 s


async def two_processes(
    redis_server: RedisServer, start_server: StartServer, **connector: Any
) -> tuple[Server, Server]:
    """Two apps sharing ``redis_server``, an echo agent streaming a chunk every 50 ms; ``producer_timeout`` 2 s."""
    start = with_store(start_server, redis_server.url)
    options = {"on_disconnect": "continue", "producer_timeout": 2, **connector}
    agents = {"assistant": {"use": "echo", "delay": 0.05}}
    one = await start(agui_config(options, agents), registry=agui_registry())
    two = await start(agui_config(options, agents), registry=agui_registry())
    return one, two


async def dropped_mid_run(server: Server, thread_id: str, count: int = 5) -> list[dict[str, Any]]:
    """Start a run of :data:`WORDS` on ``server``, read ``count`` events, then drop the link (no close frame)."""
    ws = await websockets.connect(server.base + "/agui/ws", additional_headers=AUTH)
    await ws.send(json.dumps(run_input(thread_id, WORDS, run_id="r1")))
    seen = [json.loads(await asyncio.wait_for(ws.recv(), 10)) for _ in range(count)]
    ws.transport.abort()
    return seen


async def until_run_ends(ws: Any, run_id: str) -> list[dict[str, Any]]:
    """The events up to the ``RUN_FINISHED`` or ``RUN_ERROR`` of ``run_id`` (bounded)."""
    events: list[dict[str, Any]] = []
    while not events or events[-1]["type"] not in ("RUN_FINISHED", "RUN_ERROR") or events[-1].get("runId") != run_id:
        events.append(json.loads(await asyncio.wait_for(ws.recv(), 10)))
        if events[-1]["type"] == "RUN_ERROR" and "runId" not in events[-1]:
            break  # not a run's end: the binding refusing something
    return events


def text(events: list[dict[str, Any]]) -> str:
    return "".join(e.get("delta", "") for e in events if e["type"] == "TEXT_MESSAGE_CONTENT")


async def test_a_cancel_sent_while_following_cancels_the_run_on_the_process_answering_it(
    redis_server: RedisServer, start_server: StartServer
) -> None:
    # On one process a cancel of the run in flight ends it at once, RUN_FINISHED with the
    # cancelled outcome. Following another process, the run answered there is cancelled there.
    one, two = await two_processes(redis_server, start_server)
    seen = await dropped_mid_run(one, "t-cancel")
    async with websockets.connect(two.base + "/agui/ws", additional_headers=AUTH) as again:
        await again.send(json.dumps({"type": "resume", "threadId": "t-cancel", "lastSeq": seen[-1]["seq"]}))
        first = json.loads(await asyncio.wait_for(again.recv(), 10))  # following: the run's next chunk
        assert first["type"] == "TEXT_MESSAGE_CONTENT" and first["seq"] == seen[-1]["seq"] + 1, first
        await again.send(json.dumps({"type": "cancel", "runId": "r1"}))
        rest = await until_run_ends(again, "r1")
    assert rest[-1]["type"] == "RUN_FINISHED" and rest[-1]["outcome"] == {"type": "cancelled"}, rest[-1]
    assert [e["type"] for e in rest[-2:]] == ["TEXT_MESSAGE_END", "RUN_FINISHED"]
    assert len(text([*seen, first, *rest]).split()) < 100  # cut short: not the whole reply


async def test_a_run_sent_while_following_runs_after_the_run_in_flight(
    redis_server: RedisServer, start_server: StartServer
) -> None:
    # A run the client sends while the resume follows waits for the thread to come here, then
    # runs, after the run in flight ended: as a run queued behind it on one process.
    one, two = await two_processes(redis_server, start_server)
    seen = await dropped_mid_run(one, "t-next")
    async with websockets.connect(two.base + "/agui/ws", additional_headers=AUTH) as again:
        await again.send(json.dumps({"type": "resume", "threadId": "t-next", "lastSeq": seen[-1]["seq"]}))
        assert json.loads(await asyncio.wait_for(again.recv(), 10))["type"] == "TEXT_MESSAGE_CONTENT"
        await again.send(json.dumps(run_input("t-next", "then this", run_id="r2")))
        first = await until_run_ends(again, "r1")
        second = await until_run_ends(again, "r2")
    assert first[-1]["type"] == "RUN_FINISHED", first[-1]
    assert [e["type"] for e in second][:1] == ["RUN_STARTED"] and second[-1]["type"] == "RUN_FINISHED", second
    assert text(second) == "then this"
    assert second[0]["seq"] > first[-1]["seq"]


async def test_a_client_gone_while_following_leaves_the_thread_to_resume_again(
    redis_server: RedisServer, start_server: StartServer
) -> None:
    # The client leaves while its resume follows: following stops, the run goes on where it
    # streams (on_disconnect = "continue"), and a later resume gets the rest, no gap.
    one, two = await two_processes(redis_server, start_server)
    seen = await dropped_mid_run(one, "t-gone")
    async with websockets.connect(two.base + "/agui/ws", additional_headers=AUTH) as again:
        await again.send(json.dumps({"type": "resume", "threadId": "t-gone", "lastSeq": seen[-1]["seq"]}))
        seen += [json.loads(await asyncio.wait_for(again.recv(), 10)) for _ in range(3)]
    async with websockets.connect(two.base + "/agui/ws", additional_headers=AUTH) as third:
        await third.send(json.dumps({"type": "resume", "threadId": "t-gone", "lastSeq": seen[-1]["seq"]}))
        rest = await until_run_ends(third, "r1")
    assert rest[0]["seq"] == seen[-1]["seq"] + 1, rest[0]
    events = seen + rest
    assert text(events) == WORDS
    assert [e["type"] for e in events].count("TEXT_MESSAGE_START") == 1
    assert events[-1]["type"] == "RUN_FINISHED"


async def test_a_resume_that_cannot_rebuild_the_run_fails_with_a_reason_after_producer_timeout(
    redis_server: RedisServer, start_server: StartServer
) -> None:
    # Following needs the thread's log from its first frame, to rebuild the run's events: with
    # replay_buffer 8 it is gone. The resume waits for the other process to let the thread go,
    # as before following, and fails with invalid_resume past producer_timeout (the run lasts 5 s).
    one, two = await two_processes(redis_server, start_server, replay_buffer=8)
    seen = await dropped_mid_run(one, "t-trimmed", count=20)  # the log holds the last 8 frames
    async with websockets.connect(two.base + "/agui/ws", additional_headers=AUTH) as again:
        await again.send(json.dumps({"type": "resume", "threadId": "t-trimmed", "lastSeq": seen[-1]["seq"]}))
        error = json.loads(await asyncio.wait_for(again.recv(), 10))
    assert error["type"] == "RUN_ERROR" and error["code"] == "invalid_resume", error
    assert "no longer holds the thread's first event" in error["message"], error
