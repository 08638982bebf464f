"""A resume of AG-UI's WebSocket binding whose log lost the thread's start, while its runs are quiet.

docs/agui.md, "Resuming on the WebSocket binding": when the log no longer holds the thread's
first frame, the runs are taken up from their frames after ``lastSeq``. A run begun before
that has had no frame since (its agent thinking, or queued behind it) is still the client's
to cancel, as on a connection that never dropped: a ``cancel`` stops it, or drops it. It was
``not_found``: the binding knew only the runs the log read named. One process, the built-in
``memory`` store; the client is a real ``websockets`` client.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import websockets
from test_agui_support import AUTH, agui_config, agui_registry, run_input

from conftest import StartServer

# The echo agent's demo tool call comes at once, then it thinks for a minute before answering.
THINKING = {"assistant": {"use": "echo", "delay": 60, "demo_tools": True}}


async def events_until_quiet(ws: Any, count: int) -> list[dict[str, Any]]:
    """The first ``count`` events (bounded)."""
    return [json.loads(await asyncio.wait_for(ws.recv(), 10)) for _ in range(count)]


async def test_a_cancel_after_a_resume_stops_or_drops_a_run_the_log_read_gave_no_frame_of(
    start_server: StartServer,
) -> None:
    # replay_buffer 1: the log holds the newest frame only, which the client already had.
    options = {"on_disconnect": "continue", "replay_buffer": 1}
    server = await start_server(agui_config(options, THINKING), registry=agui_registry())
    ws = await websockets.connect(server.base + "/agui/ws", additional_headers=AUTH)
    await ws.send(json.dumps(run_input("t-quiet", "w0 w1", run_id="r1")))
    await ws.send(json.dumps(run_input("t-quiet", "queued", run_id="r2")))
    # RUN_STARTED r1 and r2, STEP_STARTED, the tool call's START, ARGS and END (r2's ack may come anywhere).
    seen = await events_until_quiet(ws, 6)
    assert sorted((e["type"], e.get("runId")) for e in seen) == [
        ("RUN_STARTED", "r1"),
        ("RUN_STARTED", "r2"),
        ("STEP_STARTED", None),
        ("TOOL_CALL_ARGS", None),
        ("TOOL_CALL_END", None),
        ("TOOL_CALL_START", None),
    ], seen
    last_seq = max(e["seq"] for e in seen)
    ws.transport.abort()
    async with websockets.connect(server.base + "/agui/ws", additional_headers=AUTH) as again:
        await again.send(json.dumps({"type": "resume", "threadId": "t-quiet", "lastSeq": last_seq}))
        await again.send(json.dumps({"type": "cancel", "runId": "r2"}))  # queued: dropped at once
        dropped = json.loads(await asyncio.wait_for(again.recv(), 10))
        await again.send(json.dumps({"type": "cancel", "runId": "r1"}))  # thinking: stopped at once
        stopped = json.loads(await asyncio.wait_for(again.recv(), 10))
        await again.send(json.dumps(run_input("t-quiet", "after", run_id="r3")))
        after = json.loads(await asyncio.wait_for(again.recv(), 10))
        await again.send(json.dumps({"type": "cancel", "runId": "r3"}))  # not a minute's wait at teardown
        while (end := json.loads(await asyncio.wait_for(again.recv(), 10)))["type"] != "RUN_FINISHED":
            pass
    assert (dropped["type"], dropped.get("runId"), dropped.get("outcome")) == (
        "RUN_FINISHED",
        "r2",
        {"type": "cancelled"},
    ), dropped
    assert (stopped["type"], stopped.get("runId"), stopped.get("outcome")) == (
        "RUN_FINISHED",
        "r1",
        {"type": "cancelled"},
    ), stopped
    assert stopped["seq"] > last_seq, stopped  # the end of r1 is a frame of the session: r2 never ran
    assert (after["type"], after.get("runId")) == ("RUN_STARTED", "r3"), after
    assert (end["runId"], end.get("outcome")) == ("r3", {"type": "cancelled"}), end
