"""Frame size bounds in headless Chromium with ``compress = false``: the client is told why (1009)."""

from __future__ import annotations

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
