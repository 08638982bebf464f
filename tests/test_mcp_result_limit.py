"""An MCP tool's result is bounded by ``max_result_bytes``: cut short with a marker, and a warning logged.

Against the real test MCP server (tests/mcp_server.py) over stdio: its ``greet`` tool answers
``hi NAME``, so the size of a text result is the caller's to choose; ``fail`` fails with the
reason it is given; ``add`` answers with structured content. Nothing is mocked.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import AsyncIterator
from typing import Any

import pytest

pytest.importorskip("mcp", reason="the mcp package is not installed (test extra)")

from test_mcp import SERVER, by_name
from test_mcp_agents import AGENTS, KEY, returned

from conftest import Connect, StartServer
from connic.agents.mcp import McpServers, McpToolError
from connic.agents.mcp_config import MAX_RESULT_BYTES
from connic.errors import ConfigError
from fake_provider import FakeGemini, FakeOpenAI

STDIO = {"command": sys.executable, "args": [SERVER]}
LABEL = f"{sys.executable} {SERVER}"


async def tools_of(entry: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
    servers = McpServers.from_config([entry], agent="bot")
    try:
        yield by_name(await servers.start())
    finally:
        await servers.close()


@pytest.fixture
async def tools() -> AsyncIterator[dict[str, Any]]:
    """The test server's tools, under the default bound."""
    async for found in tools_of(STDIO):
        yield found


@pytest.fixture
async def small() -> AsyncIterator[dict[str, Any]]:
    """The test server's tools, with ``max_result_bytes = 13``."""
    async for found in tools_of({**STDIO, "max_result_bytes": 13}):
        yield found


async def test_a_text_result_over_the_default_bound_is_cut_with_a_marker_and_a_warning(
    tools: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    assert MAX_RESULT_BYTES == 1024 * 1024
    caplog.set_level(logging.WARNING, logger="connic.agents.mcp")
    name = "x" * (2 * 1024 * 1024)
    result = await tools["greet"].call({"name": name})
    whole = len(name) + len("hi ")
    assert result == ("hi " + name)[:MAX_RESULT_BYTES] + f"\n[truncated: {MAX_RESULT_BYTES} bytes of {whole}]"
    (record,) = [r for r in caplog.records if r.name == "connic.agents.mcp" and r.levelno == logging.WARNING]
    message = record.getMessage()
    assert f'MCP server "{LABEL}"' in message and "'greet'" in message
    assert f"returned {whole} bytes, over max_result_bytes ({MAX_RESULT_BYTES})" in message
    assert "xxxx" not in message  # the server and the tool, not the content


async def test_a_result_within_the_bound_is_whole_and_logs_nothing(
    small: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="connic.agents.mcp")
    assert await small["greet"].call({"name": "ééééé"}) == "hi ééééé"  # 13 bytes of UTF-8: the bound
    assert await small["add"].call({"a": 2, "b": 3}) == {"result": 5}  # '{"result": 5}': 13 bytes
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize(
    ("tool", "arguments", "expected"),
    [
        # 14 bytes; the 13th is the first of "é"'s two: the character goes whole, 12 are kept.
        ("greet", {"name": "abcdefghié"}, "hi abcdefghi\n[truncated: 12 bytes of 14]"),
        ("greet", {"name": "€€€€"}, "hi €€€\n[truncated: 12 bytes of 15]"),  # a 3-byte character
        ("greet", {"name": "🙂🙂🙂"}, "hi 🙂🙂\n[truncated: 11 bytes of 15]"),  # a 4-byte one
        ("add", {"a": 20, "b": 3}, '{"result": 23\n[truncated: 13 bytes of 14]'),  # structured: cut as its JSON
        ("picture", {}, '[{"type": "te\n[truncated: 13 bytes of '),  # content blocks: likewise
    ],
)
async def test_a_result_over_the_bound_is_cut_between_characters(
    small: dict[str, Any], tool: str, arguments: dict[str, Any], expected: str
) -> None:
    result = await small[tool].call(arguments)
    assert isinstance(result, str) and result.startswith(expected)
    assert len(result.partition("\n")[0].encode()) <= 13


async def test_an_error_text_over_the_bound_is_cut_too(small: dict[str, Any]) -> None:
    with pytest.raises(McpToolError) as caught:
        await small["fail"].call({"reason": "r" * 5000})
    whole = "Error executing tool fail: " + "r" * 5000  # the server's words, and the reason
    assert str(caught.value) == whole[:13] + f"\n[truncated: 13 bytes of {len(whole)}]"
    assert await small["greet"].call({"name": "Bo"}) == "hi Bo"  # the server is still usable


@pytest.mark.parametrize("value", [0, -1, 1.5, "1024", True, None])
def test_max_result_bytes_must_be_a_whole_number_of_bytes(value: object) -> None:
    with pytest.raises(ConfigError) as caught:
        McpServers.from_config([{**STDIO, "max_result_bytes": value}], agent="bot")
    assert str(caught.value) == (
        f"agents.bot.mcp_servers[0].max_result_bytes: expected a whole number of bytes, at least 1, got {value!r}"
    )


def test_max_result_bytes_is_taken_by_both_kinds_of_server() -> None:
    entries = [{**STDIO, "max_result_bytes": 1}, {"url": "http://127.0.0.1:9/mcp", "max_result_bytes": 4096}]
    stdio, http = McpServers.from_config(entries, agent="bot").specs
    assert (stdio.max_result_bytes, http.max_result_bytes) == (1, 4096)
    assert McpServers.from_config([STDIO], agent="bot").specs[0].max_result_bytes == MAX_RESULT_BYTES


@pytest.fixture(params=["openai", "gemini"])
async def fake(request: pytest.FixtureRequest) -> AsyncIterator[tuple[str, FakeOpenAI | FakeGemini]]:
    provider: FakeOpenAI | FakeGemini = FakeOpenAI() if request.param == "openai" else FakeGemini()
    await provider.start()
    yield request.param, provider
    await provider.close()


async def test_the_model_and_the_tool_result_frame_get_the_cut_result(
    start_server: StartServer, connect: Connect, fake: tuple[str, FakeOpenAI | FakeGemini]
) -> None:
    kind, provider = fake
    provider.tool_rounds = [[("greet", {"name": "y" * 5000})]]
    servers = [{**STDIO, "max_result_bytes": 1000}]
    agent = {**AGENTS[kind], "base_url": provider.base_url, "api_key": KEY, "mcp_servers": servers}
    server = await start_server({"agents": {"bot": agent}, "connectors": [{"secrets": ["s"], "progress_events": True}]})
    client = await connect(server.url(), secret="s")
    frames = await client.reply({"id": "m1", "message": "greet y..."})
    (result,) = [f for f in frames if f["type"] == "tool_result"]
    cut = "hi " + "y" * 997 + "\n[truncated: 1000 bytes of 5003]"
    assert result["is_error"] is False and result["result"] == cut
    given = returned(kind, provider.requests[1])
    assert given == (cut if kind == "openai" else {"output": cut})
