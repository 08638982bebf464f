"""Frame size bounds in headless Chromium: the client is told why (1009), also while it is still
writing the frame (``compress = false`` on the connic WebSocket; AG-UI's binding, deflated)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import pytest
from test_browser_deflate import CONVERSE, auth, message, page
from test_playground import ThreadServer

import connic
from conftest import make_config

pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed (test extra)")

__all__ = ["page"]  # the fixture

FRAME_BYTES = 65536


@pytest.fixture
def served() -> Iterator[ThreadServer]:
    connector = {"compress": False, "max_frame_bytes": FRAME_BYTES, "max_messages": 1000}
    server = ThreadServer(connic.create_app(make_config(connector))).start()
    yield server
    server.stop()


def converse(page: Any, server: ThreadServer, frames: list[Any], wait_for: str = "") -> dict[str, Any]:
    result: dict[str, Any] = page.evaluate(CONVERSE, [f"ws://127.0.0.1:{server.port}/ws", frames, wait_for])
    assert result["extensions"] == "", result["extensions"]
    return result


@pytest.mark.parametrize("size", [FRAME_BYTES + 1, 4 * FRAME_BYTES, 64 * FRAME_BYTES])
def test_a_frame_over_max_frame_bytes_closes_1009(page: Any, served: ThreadServer, size: int) -> None:
    refused = converse(page, served, [auth(100), 300, message(1, size)])
    assert refused["closed"] == [1009, "message_too_large"], refused
    assert [frame["type"] for frame in refused["got"]] == ["connected", "error"]
    assert refused["got"][1]["code"] == "message_too_large"


# One AG-UI WebSocket connection: send one frame, collect the events until the socket closes.
AGUI_SEND = """async ([url, frame]) => {
  const ws = new WebSocket(url);
  const got = [];
  const closed = new Promise((resolve) => {
    ws.onmessage = (e) => got.push(JSON.parse(e.data));
    ws.onclose = (e) => resolve([e.code, e.reason]);
  });
  await new Promise((resolve) => { ws.onopen = resolve; });
  ws.send(frame);
  const end = await Promise.race([closed, new Promise((resolve) => setTimeout(() => resolve('timeout'), 60000))]);
  return {got, closed: end, extensions: ws.extensions};
}"""


@pytest.mark.parametrize("over", ["inflated", "on_the_wire"])
def test_an_agui_frame_over_max_body_bytes_closes_1009_with_a_run_error(page: Any, over: str) -> None:
    from test_agui_support import SECRET, agui_config, agui_registry, run_input

    config = agui_config({"max_body_bytes": FRAME_BYTES})
    server = ThreadServer(connic.create_app(config, registry=agui_registry())).start()
    try:
        # Repetitive text deflates to a few hundred bytes; hex of random bytes stays over the bound.
        content = "b" * FRAME_BYTES if over == "inflated" else os.urandom(4 * FRAME_BYTES).hex()
        frame = json.dumps(run_input("t-big", content))
        url = f"ws://127.0.0.1:{server.port}/agui/ws?secret={SECRET}"
        result: dict[str, Any] = page.evaluate(AGUI_SEND, [url, frame])
    finally:
        server.stop()
    assert result["extensions"] == "permessage-deflate", result["extensions"]
    assert result["closed"] == [1009, "message_too_large"], result
    assert [(e["type"], e["code"]) for e in result["got"]] == [("RUN_ERROR", "message_too_large")], result["got"]
