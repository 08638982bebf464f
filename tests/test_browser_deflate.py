"""Frame size bounds and large frames in headless Chromium with ``compress = true``.

Chromium always offers permessage-deflate and deflates what it sends once the server takes
the offer, so every bound here is checked on a compressed frame: the size that counts is the
message's, not the few hundred bytes of its deflated repetitive text on the wire.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from test_playground import ThreadServer

import connic
from conftest import SECRET, make_config

pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed (test extra)")

FRAME_BYTES = 65536
AUTH_BYTES = 4096

# One connection: send each frame in turn (a number: wait that many ms first; {reply: id}: wait for
# the response to message id) and collect what comes back until the socket closes or `waitFor`
# (a frame type) arrives.
CONVERSE = """async ([url, frames, waitFor]) => {
  const ws = new WebSocket(url);
  const got = [];
  const end = new Promise((resolve) => {
    ws.onmessage = (e) => {
      const frame = JSON.parse(e.data);
      got.push(frame);
      if (frame.type === waitFor) resolve(null);
    };
    ws.onclose = (e) => resolve([e.code, e.reason]);
  });
  await new Promise((resolve) => { ws.onopen = resolve; });
  for (const frame of frames) {
    if (typeof frame === 'number') await new Promise((resolve) => setTimeout(resolve, frame));
    else if (typeof frame === 'object') {
      while (!got.some((f) => f.type === 'response' && f.id === frame.reply)) {
        await new Promise((resolve) => setTimeout(resolve, 20));
      }
    }
    else ws.send(frame);
  }
  const closed = await Promise.race([end, new Promise((resolve) => setTimeout(() => resolve('timeout'), 60000))]);
  if (!closed) ws.close(1000);
  return {got, closed, extensions: ws.extensions};
}"""


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(30_000)
    page.set_content("<!doctype html><title>deflate</title>")
    yield page
    context.close()


@pytest.fixture
def served() -> Iterator[ThreadServer]:
    connector = {"compress": True, "max_frame_bytes": FRAME_BYTES, "max_auth_frame_bytes": AUTH_BYTES}
    server = ThreadServer(connic.create_app(make_config(connector | {"max_messages": 1000}))).start()
    yield server
    server.stop()


def message(n: int, size: int) -> str:
    """A message frame of exactly ``size`` bytes (ASCII): deflated to a few hundred."""
    empty = json.dumps({"type": "message", "id": f"m{n}", "content": ""})
    return json.dumps({"type": "message", "id": f"m{n}", "content": "b" * (size - len(empty))})


def auth(size: int) -> str:
    empty = json.dumps({"secret": SECRET, "pad": ""})
    return json.dumps({"secret": SECRET, "pad": "a" * (size - len(empty))})


def converse(page: Any, server: ThreadServer, frames: list[Any], wait_for: str = "") -> dict[str, Any]:
    result: dict[str, Any] = page.evaluate(CONVERSE, [f"ws://127.0.0.1:{server.port}/ws", frames, wait_for])
    assert result["extensions"] == "permessage-deflate", result["extensions"]
    return result


def test_bounds_count_the_inflated_size(page: Any, served: ThreadServer) -> None:
    # The auth frame: max_auth_frame_bytes passes, one byte more is refused.
    ok = converse(page, served, [auth(AUTH_BYTES)], "connected")
    assert ok["closed"] is None and ok["got"][0]["type"] == "connected"
    refused = converse(page, served, [auth(AUTH_BYTES + 1)])
    assert refused["closed"] == [1009, "message_too_large"], refused
    assert [frame.get("code") for frame in refused["got"]] == ["message_too_large"]

    # After it: max_frame_bytes passes, one byte more is refused. Sent right behind the auth
    # frame, the message often shares its TCP segment; a few tries make that near certain.
    for _ in range(4):
        ok = converse(page, served, [auth(100), message(1, FRAME_BYTES)], "stream_end")
        assert ok["got"][-1]["type"] == "stream_end", ok["got"][-1]
        assert len(ok["got"][-1]["full_response"]) > FRAME_BYTES - 100
    refused = converse(page, served, [auth(100), 300, message(1, FRAME_BYTES + 1)])
    assert refused["closed"] == [1009, "message_too_large"], refused
    assert [frame["type"] for frame in refused["got"]] == ["connected", "error"]
    assert refused["got"][1]["code"] == "message_too_large"


def test_large_frames_reach_the_browser(page: Any) -> None:
    # Whole replies (no streaming): each answer is one large deflated frame to the browser.
    connector = {"compress": True, "streaming": False, "max_messages": 1000}
    server = ThreadServer(connic.create_app(make_config(connector))).start()
    try:
        # Distinct texts, so the history frame stays large once inflated: 2 x 200 x 5 KB.
        texts = [f"entry{n:03} " + " ".join(f"{n}x{k}" for k in range(800))[:5000] for n in range(200)]
        frames: list[Any] = [auth(100)]
        frames += [json.dumps({"type": "message", "id": f"m{n}", "content": text}) for n, text in enumerate(texts)]
        long = " ".join(f"w{n}" for n in range(120_000))  # some 850 KB
        frames += [json.dumps({"type": "message", "id": "long", "content": long})]
        frames += [{"reply": "long"}, json.dumps({"type": "history"})]  # history waits for no reply
        result = converse(page, server, frames, "history")
    finally:
        server.stop()
    got = result["got"]
    assert result["closed"] is None, result["closed"]
    replies = {frame["id"]: frame["response"] for frame in got if frame["type"] == "response"}
    assert replies["long"] == long
    assert all(replies[f"m{n}"] == text for n, text in enumerate(texts))
    (history,) = [frame for frame in got if frame["type"] == "history"]
    assert [entry["text"] for entry in history["entries"]] == [t for text in [*texts, long] for t in (text, text)]
