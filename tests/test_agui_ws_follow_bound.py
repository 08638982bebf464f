"""What AG-UI's WebSocket binding holds while a resume follows another process (``redis`` store).

Frames the client sends meanwhile are held, to be handled once the thread is taken over: a
client that floods frames during a long run elsewhere must not grow this process's memory
without limit. As on the Connic protocol (connic/transports/ws_bound.py), at most twice
``max_queued`` and a few are held; past that each frame is answered at once with a ``RUN_ERROR``
``queue_full`` (no ``seq``, no ``runId``: only the process serving the thread numbers its frames).
"""

from __future__ import annotations

import asyncio
import json

import websockets
from redis_server import (
    RedisServer,
    redis_server_fixture,  # noqa: F401  (a fixture)
)
from test_agui_support import AUTH, run_input
from test_agui_ws_follow import dropped_mid_run, two_processes, until_run_ends

from conftest import StartServer
from connic.transports.ws_bound import SLACK

MAX_QUEUED = 2
FLOOD = 60


async def test_a_flood_while_following_is_held_to_the_bound_and_the_rest_refused_at_once(
    redis_server: RedisServer, start_server: StartServer
) -> None:
    one, two = await two_processes(redis_server, start_server, max_queued=MAX_QUEUED)
    seen = await dropped_mid_run(one, "t-flood")
    async with websockets.connect(two.base + "/agui/ws", additional_headers=AUTH) as again:
        await again.send(json.dumps({"type": "resume", "threadId": "t-flood", "lastSeq": seen[-1]["seq"]}))
        assert json.loads(await asyncio.wait_for(again.recv(), 10))["type"] == "TEXT_MESSAGE_CONTENT"
        for n in range(FLOOD):
            await again.send(json.dumps(run_input("t-flood", "x" * 1000, run_id=f"f{n}")))
        first = await until_refused_or_run_ends(again, "r1")
    refused = [e for e in first if e["type"] == "RUN_ERROR" and e.get("code") == "queue_full"]
    # Before the run in flight ends elsewhere (the thread still followed), all but the bound were refused.
    assert first[-1]["type"] == "RUN_FINISHED" and first[-1]["runId"] == "r1", first[-1]
    assert len(refused) == FLOOD - (2 * MAX_QUEUED + SLACK), len(refused)
    assert all("seq" not in e and "runId" not in e for e in refused), refused[:2]


async def until_refused_or_run_ends(ws: object, run_id: str) -> list[dict[str, object]]:
    """The events up to the ``RUN_FINISHED`` of ``run_id``, refusals included."""
    events: list[dict[str, object]] = []
    while True:
        events += await until_run_ends(ws, run_id)
        if events[-1]["type"] == "RUN_FINISHED" and events[-1].get("runId") == run_id:
            return events
