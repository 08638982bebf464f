"""connic-weather over a real WebSocket against a real connic server (the plugin must be installed)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import websockets
from aiohttp.test_utils import TestServer
from connic_weather import made_up_weather

import connic

Start = Callable[..., Awaitable[websockets.ClientConnection]]


@pytest.fixture
async def chat() -> AsyncIterator[Start]:
    servers: list[TestServer] = []
    clients: list[websockets.ClientConnection] = []

    async def start(**options: Any) -> websockets.ClientConnection:
        config = {"agents": {"weather": {"use": "weather", **options}}, "connectors": [{"secrets": ["s"]}]}
        server = TestServer(connic.create_app(config), host="127.0.0.1")
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


async def ask(ws: websockets.ClientConnection, message: str, **context: Any) -> tuple[list[str], dict[str, Any]]:
    await ws.send(json.dumps({"type": "message", "payload": {"message": message, "context": context}}))
    chunks = []
    while True:
        frame = json.loads(await ws.recv())
        if frame["type"] == "stream_chunk":
            chunks.append(frame["chunk"])
        elif frame["type"] in ("stream_end", "error"):
            return chunks, frame


async def test_uses_context_template_and_usage(chat: Start) -> None:
    ws = await chat()
    chunks, end = await ask(ws, "How is it today?", location="Lisbon")
    sky, celsius = made_up_weather("Lisbon")
    assert end["full_response"] == "".join(chunks)
    assert end["full_response"].startswith(f"The weather in Lisbon: {sky}, {celsius}°C.")
    assert "question 1 this session" in end["full_response"]
    assert len(chunks) > 3  # streamed, not one block
    assert end["token_usage"]["prompt_tokens"] == 4
    assert end["token_usage"]["candidates_tokens"] == len(end["full_response"].split())


async def test_session_state_remembers_the_place(chat: Start) -> None:
    ws = await chat()
    await ask(ws, "Weather?", location="Oslo")
    _, end = await ask(ws, "And tomorrow?")
    assert end["full_response"].startswith("Still Oslo:")
    assert "question 2 this session" in end["full_response"]


async def test_sessions_are_separate(chat: Start) -> None:
    first = await chat()
    await ask(first, "Weather?", location="Oslo")
    port = first.remote_address[1]
    async with websockets.connect(f"ws://127.0.0.1:{port}/ws") as second:
        await second.send(json.dumps({"secret": "s"}))
        await second.recv()
        _, end = await ask(second, "Weather?")
    assert end["full_response"].startswith("The weather in your area:")
    assert "question 1 this session" in end["full_response"]


async def test_units_option_and_context_override(chat: Start) -> None:
    ws = await chat(units="imperial")
    _, end = await ask(ws, "Weather?", location="Cairo")
    _, celsius = made_up_weather("Cairo")
    assert f"{round(celsius * 9 / 5 + 32)}°F" in end["full_response"]
    _, end = await ask(ws, "In metric?", location="Cairo", units="metric")
    assert f"{celsius}°C" in end["full_response"]


async def test_custom_template(chat: Start) -> None:
    ws = await chat(template="{{ place }} is {{ sky }}")
    _, end = await ask(ws, "x", location="Rome")
    assert end["full_response"] == f"Rome is {made_up_weather('Rome')[0]}"


def test_bad_options_are_config_errors() -> None:
    with pytest.raises(connic.ConfigError, match=r"agents\.weather: units must be 'metric' or 'imperial'"):
        connic.create_app(
            {"agents": {"weather": {"use": "weather", "units": "kelvin"}}, "connectors": [{"secrets": ["s"]}]}
        )
    with pytest.raises(connic.ConfigError, match=r"agents\.weather: template: "):
        connic.create_app(
            {"agents": {"weather": {"use": "weather", "template": "{% if %}"}}, "connectors": [{"secrets": ["s"]}]}
        )
