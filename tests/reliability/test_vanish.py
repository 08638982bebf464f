"""A client that vanishes (TCP reset, no close frame) is logged and counted as 1006, never as a normal close."""

from __future__ import annotations

import logging
import re

import pytest

from conftest import SECRET, StartServer, make_config

from .conftest import assert_no_traceback, eventually, scrape
from .rawws import RawWS, open_raw

AGENTS = {"slow": {"use": "echo", "delay": 0.05}}
SLOW = {"message": "one two three four five six seven eight nine ten"}


async def _connected(port: int) -> RawWS:
    ws = await open_raw(port)
    await ws.send_json({"secret": SECRET})
    assert (await ws.recv())["type"] == "connected"
    return ws


def _closes(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        m.group(1)
        for r in caplog.records
        if r.name == "connic.websocket" and (m := re.match(r"close session=.* code=(\S+) ", r.getMessage()))
    ]


@pytest.mark.parametrize("when", ["mid-stream", "idle", "FIN mid-stream"])
async def test_a_client_that_vanishes_is_logged_as_1006(
    start_server: StartServer, caplog: pytest.LogCaptureFixture, when: str
) -> None:
    caplog.set_level(logging.INFO, logger="connic.websocket")
    server = await start_server(make_config(agents=AGENTS))
    ws = await _connected(int(server.server.port))
    if when != "idle":
        await ws.send_json(SLOW)
        await ws.until("stream_chunk")
    if when.startswith("FIN"):
        await ws.aclose()  # a TCP close without a close frame: abnormal too
    else:
        ws.reset()
    assert await eventually(lambda: len(_closes(caplog)) == 1)
    assert _closes(caplog) == ["1006"]
    metrics = await scrape(server.http)
    assert metrics.get('connic_closes_total{code="1006",connector="/ws"}') == 1, metrics
    assert_no_traceback(caplog)
