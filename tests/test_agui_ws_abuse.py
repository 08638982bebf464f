"""A hostile client of AG-UI's WebSocket binding (docs/agui.md): each bad frame is a ``RUN_ERROR``
naming what is wrong, and the connection goes on serving runs. A real ``websockets`` client against a
real server."""

from __future__ import annotations

import asyncio
import json

import pytest
import websockets
from test_agui_support import AUTH, agui_config, agui_registry, run_input
from test_agui_ws import run_events

from conftest import StartServer


@pytest.mark.parametrize(
    ("frame", "problem"),
    [
        ("[" * 200_000 + "]" * 200_000, "the frame nests arrays and objects deeper than 100 levels"),
        # Deep inside a run that would parse: refused as a POSTed run's body is.
        (json.dumps(run_input("t-deep", "x", state=json.loads("[" * 500 + "]" * 500))), "deeper than 100 levels"),
    ],
    ids=["200k-deep", "deep-state"],
)
async def test_a_deeply_nested_frame_is_run_error_and_the_connection_goes_on(
    start_server: StartServer, frame: str, problem: str
) -> None:
    server = await start_server(agui_config(), registry=agui_registry())
    async with websockets.connect(server.base + "/agui/ws", additional_headers=AUTH) as ws:
        await ws.send(frame)
        error = json.loads(await asyncio.wait_for(ws.recv(), 10))
        assert error["type"] == "RUN_ERROR" and error["code"] == "invalid_message"
        assert problem in error["message"]
        await ws.send(json.dumps(run_input("t-after", "still open")))
        assert (await run_events(ws))[-1]["type"] == "RUN_FINISHED"
