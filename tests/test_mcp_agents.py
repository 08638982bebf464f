"""MCP tools through the built-in agents: a real MCP server over stdio, the provider fakes, a real client.

The fake model asks for the MCP server's ``add`` tool; the call goes to the server as an MCP
``tools/call``; its result comes back to the model in the provider's own format and to the
client as a ``tool_result`` frame. The server's process starts with connic and stops with it.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("mcp", reason="the MCP SDK is not installed (test extra)")

from test_mcp import SERVER, children, eventually, gone

from conftest import Connect, StartServer
from fake_provider import FakeGemini, FakeOpenAI

KEY = "sk-test-very-secret-key"
AGENTS: dict[str, dict[str, Any]] = {
    "openai": {"use": "openai", "model": "m"},
    "gemini": {"use": "gemini", "sdk": "google-genai"},
}


@pytest.fixture(params=["openai", "gemini"])
async def fake(request: pytest.FixtureRequest) -> AsyncIterator[tuple[str, FakeOpenAI | FakeGemini]]:
    provider: FakeOpenAI | FakeGemini = FakeOpenAI() if request.param == "openai" else FakeGemini()
    await provider.start()
    yield request.param, provider
    await provider.close()


def returned(kind: str, request: dict[str, Any]) -> Any:
    """What the model was given as the tool's result, in the provider's own format."""
    if kind == "openai":
        (message,) = [m for m in request["messages"] if m["role"] == "tool"]
        return message["content"]
    parts = [p for c in request["contents"] for p in c["parts"] if "functionResponse" in p]
    (part,) = parts
    return part["functionResponse"]["response"]


async def test_the_model_calls_an_mcp_tool_and_the_server_stops_with_connic(
    start_server: StartServer, connect: Connect, fake: tuple[str, FakeOpenAI | FakeGemini]
) -> None:
    kind, provider = fake
    before = children()
    provider.tool_rounds = [[("add", {"a": 2, "b": 3})]]
    servers = [{"command": sys.executable, "args": [SERVER]}]
    agent = {**AGENTS[kind], "base_url": provider.base_url, "api_key": KEY, "mcp_servers": servers}
    server = await start_server({"agents": {"bot": agent}, "connectors": [{"secrets": ["s"], "progress_events": True}]})
    (mcp_process,) = children() - before
    client = await connect(server.url(), secret="s")
    frames = await client.reply({"id": "m1", "message": "2 + 3?"})
    kinds = [f["type"] for f in frames]
    assert kinds[:4] == ["ack", "stream_start", "tool_call", "tool_result"] and kinds[-1] == "stream_end"
    assert (frames[2]["name"], frames[2]["arguments"]) == ("add", {"a": 2, "b": 3})
    assert frames[3]["is_error"] is False and frames[3]["result"] == {"result": 5}
    # Offered to the model with the schema the MCP server declared.
    if kind == "openai":
        offered = {t["function"]["name"]: t["function"]["parameters"] for t in provider.requests[0]["tools"]}
    else:
        declarations = provider.requests[0]["tools"][0]["functionDeclarations"]
        offered = {d["name"]: d.get("parametersJsonSchema") or d.get("parameters_json_schema") for d in declarations}
    assert offered["add"]["required"] == ["a", "b"]
    result = returned(kind, provider.requests[1])
    assert result == ('{"result": 5}' if kind == "openai" else {"output": {"result": 5}})
    await server.server.close()
    await eventually(lambda: gone(mcp_process))


def test_an_mcp_server_that_cannot_start_stops_connic_run_with_one_line(tmp_path: Path) -> None:
    config = tmp_path / "connic.toml"
    config.write_text(
        '[agents.bot]\nuse = "openai"\napi_key = "k"\n'
        'mcp_servers = [{ command = "/nonexistent/mcp-server" }]\n'
        '[[connectors]]\nsecrets = ["s"]\n'
    )
    done = subprocess.run(
        [sys.executable, "-m", "connic", "run", "--port", "0", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert 'MCP server "/nonexistent/mcp-server"' in lines[0] and "command not found" in lines[0]


@pytest.mark.parametrize("kind", ["openai", "gemini"])
async def test_a_failed_start_stops_the_mcp_servers_it_started(
    start_server: StartServer, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """The app closes only the agents whose start succeeded: a start failing after the tools
    started must stop their MCP server itself, or its process outlives connic."""
    # The one fault injected: the provider client cannot be created (no real condition makes
    # google-genai's or aiohttp's constructor fail on demand).
    if kind == "gemini":
        import google.genai

        monkeypatch.setattr(google.genai, "Client", cannot_create)
    else:
        import aiohttp

        monkeypatch.setattr(aiohttp, "ClientSession", cannot_create)
    before = children()
    agent = {**AGENTS[kind], "base_url": "http://127.0.0.1:9", "api_key": KEY}
    agent["mcp_servers"] = [{"command": sys.executable, "args": [SERVER]}]
    with pytest.raises(ValueError, match="cannot be created"):
        await start_server({"agents": {"bot": agent}, "connectors": [{"secrets": ["s"]}]})
    assert children() == before


def cannot_create(*args: Any, **kwargs: Any) -> Any:
    raise ValueError("the client cannot be created")
