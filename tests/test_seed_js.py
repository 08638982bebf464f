"""The seed page's JavaScript examples, verbatim but for the URL and secret, in headless Chromium.

The server is ``python -m connic run`` with nothing configured (the echo agent,
a generated secret), as a user following the seed page would run it.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from conftest import ROOT, CliServer

sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed (test extra)")

SEED_FILE = ROOT.parent / "shared" / "seed" / "websocket-connector.txt"

# Copied exactly from the seed page, section "Connecting".
SEED_JS_CONNECTING = """\
// Connect to WebSocket
const ws = new WebSocket('<websocket-url>');

// Authenticate (required by default)
ws.onopen = () => {
  ws.send(JSON.stringify({ secret: '<your-secret-key>' }));
};

// Handle connection confirmation
ws.onmessage = (event) => {
  const data = JSON.parse(event.data);
  if (data.type === 'connected') {
    console.log('Session ID:', data.session_id);
    console.log('Agents:', data.agents);
  }
};
"""

# Copied exactly from the seed page, section "Sending Messages".
SEED_JS_SENDING = """\
// Send a message
ws.send(JSON.stringify({
  type: 'message',
  id: 'msg-001',
  payload: {
    message: 'What is the weather like today?',
    context: { location: 'New York' }
  }
}));
"""

UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"


def wait_for(condition: Callable[[], bool], page: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        page.wait_for_timeout(25)


def test_seed_javascript_example_logs_session_and_agents(
    browser: Any, cli: Callable[..., CliServer], capsys: pytest.CaptureFixture[str]
) -> None:
    server = cli()
    assert server.secret, server.banner
    script = SEED_JS_CONNECTING.replace("<websocket-url>", server.url).replace("<your-secret-key>", server.secret)
    context = browser.new_context()
    page = context.new_page()
    logged: list[tuple[str, list[Any]]] = []
    received: list[dict[str, Any]] = []
    errors: list[str] = []
    page.on("console", lambda msg: logged.append((msg.text, [arg.json_value() for arg in msg.args])))
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("websocket", lambda ws: ws.on("framereceived", lambda payload: received.append(json.loads(payload))))
    try:
        page.set_content("<!doctype html><title>seed</title>")
        page.add_script_tag(content=script)
        wait_for(lambda: len(logged) >= 2, page)
        (session_text, session_args), (agents_text, agents_args) = logged[:2]
        with capsys.disabled():
            print(f"\nconsole.log: {session_text!r}, {agents_text!r}")
        assert re.fullmatch(f"Session ID: {UUID}", session_text), session_text
        assert session_args == ["Session ID:", received[0]["session_id"]]
        assert agents_text.startswith("Agents: ")
        assert agents_args == ["Agents:", ["echo"]]

        # The seed's "Sending Messages" example on the same socket, verbatim.
        page.add_script_tag(content=SEED_JS_SENDING)
        wait_for(lambda: received[-1]["type"] == "stream_end", page)
        kinds = [frame["type"] for frame in received]
        assert kinds[:3] == ["connected", "ack", "stream_start"]
        # The seed's client ignores the fields it does not know, such as seq (PROTOCOL.md §7).
        assert received[1] == {"type": "ack", "id": "msg-001", "message_number": 1, "seq": 1}
        end = received[-1]
        assert end["id"] == "msg-001" and end["agent"] == "echo"
        assert end["full_response"] == "What is the weather like today?"
        assert end["token_usage"] == {"prompt_tokens": 6, "candidates_tokens": 6}
        assert not errors, errors
    finally:
        context.close()
    code, out = server.stop()
    assert code == 0, out


def _seed_block(text: str, heading: str, after: str) -> str:
    start = text.index(f"{heading}\n\njavascript\n") + len(f"{heading}\n\njavascript\n")
    return text[start : text.index(after, start)].rstrip("\n") + "\n"


@pytest.mark.skipif(not SEED_FILE.exists(), reason=f"{SEED_FILE} is not here (it lives beside the repository)")
def test_snippets_are_the_seed_text() -> None:
    text = Path(SEED_FILE).read_text(encoding="utf-8")
    assert _seed_block(text, "Connecting", "The session_id returned") == SEED_JS_CONNECTING
    assert _seed_block(text, "Sending Messages", "The id field is optional") == SEED_JS_SENDING
