"""connic-moderation over a real WebSocket against a real connic server (the plugin must be installed)."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import websockets
from aiohttp.test_utils import TestServer
from connic_moderation import Redactor

import connic

Start = Callable[..., Awaitable[websockets.ClientConnection]]


def config(streaming: bool = True, agents: dict[str, Any] | None = None, **moderation: Any) -> dict[str, Any]:
    return {
        "agents": agents or {"echo": {"use": "echo"}},
        "connectors": [{"secrets": ["s"], "streaming": streaming, "middleware": [{"use": "moderation", **moderation}]}],
    }


@pytest.fixture
async def chat() -> AsyncIterator[Start]:
    servers: list[TestServer] = []
    clients: list[websockets.ClientConnection] = []

    async def start(data: dict[str, Any]) -> websockets.ClientConnection:
        server = TestServer(connic.create_app(data), host="127.0.0.1")
        await server.start_server()
        servers.append(server)
        ws = await websockets.connect(f"ws://127.0.0.1:{server.port}/ws")
        clients.append(ws)
        await ws.send(json.dumps({"secret": "s"}))
        assert json.loads(await ws.recv())["type"] == "connected"
        return ws

    yield start
    for ws in clients:
        await ws.close()
    for server in servers:
        await server.close()


async def ask(ws: websockets.ClientConnection, message: str) -> list[dict[str, Any]]:
    await ws.send(json.dumps({"message": message}))
    frames = []
    while True:
        frame = json.loads(await ws.recv())
        frames.append(frame)
        if frame["type"] in ("stream_end", "response", "error"):
            return frames


async def test_blocked_message_gets_an_error_and_the_session_goes_on(chat: Start) -> None:
    ws = await chat(config(block=[r"\bpassword\b"]))
    frames = await ask(ws, "what is the PASSWORD please")
    assert frames[0]["type"] == "ack"
    assert frames[-1]["type"] == "error" and frames[-1]["code"] == "message_rejected"
    assert not any(f["type"] == "stream_start" for f in frames)  # no agent output at all
    frames = await ask(ws, "a harmless question")
    assert frames[-1]["full_response"] == "a harmless question"


async def test_redaction_in_word_sized_chunks(chat: Start) -> None:
    ws = await chat(config(redact=["hunter2"]))
    frames = await ask(ws, "my password is hunter2 ok")
    chunks = "".join(f["chunk"] for f in frames if f["type"] == "stream_chunk")
    end = frames[-1]
    assert end["full_response"] == chunks == "my password is [redacted] ok"


async def test_redaction_of_a_match_spanning_chunks(chat: Start) -> None:
    # echo streams word by word, so "4111 1111" arrives as two chunks.
    ws = await chat(config(redact=[r"\d{4} \d{4}"], replacement="XXXX", max_match=9))
    # "card 4111 1111 end" streams as word chunks; the match spans two of them.
    frames = await ask(ws, "card 4111 1111 end")
    chunks = [f["chunk"] for f in frames if f["type"] == "stream_chunk"]
    assert len(chunks) >= 2
    assert "".join(chunks) == frames[-1]["full_response"] == "card XXXX end"


async def test_redaction_without_streaming(chat: Start) -> None:
    ws = await chat(config(streaming=False, redact=["secret"]))
    frames = await ask(ws, "the secret word")
    assert frames[-1]["type"] == "response" and frames[-1]["response"] == "the [redacted] word"


async def test_usage_passes_through(chat: Start) -> None:
    ws = await chat(config(redact=["x"]))
    frames = await ask(ws, "one two three")
    assert frames[-1]["token_usage"] == {"prompt_tokens": 3, "candidates_tokens": 3}


def test_invalid_pattern_is_a_config_error() -> None:
    with pytest.raises(connic.ConfigError, match=r"connectors\[0\]\.middleware\[0\].*invalid regular expression '\('"):
        connic.create_app(config(block=["("]))


def test_redactor_holds_back_only_what_could_still_match() -> None:
    redactor = Redactor(re.compile("abc"), "*", max_match=3)
    out = [redactor.feed(piece) for piece in ["xx a", "b", "c yy", "ab"]]
    out.append(redactor.flush())
    assert "".join(out) == "xx * yyab"
    assert out[0] == "xx"  # the last max_match - 1 characters wait for the next piece
