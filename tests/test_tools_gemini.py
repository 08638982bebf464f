"""The gemini agent's function tools, through the real google-genai SDK, against the fake Gemini API.

The fake answers with ``functionCall`` parts (carrying a thought signature); the functions in
tests/tool_functions.py run; the fake's next request must carry the model's content as it
came and a user content with one ``functionResponse`` per call.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from typing import Any

import pytest
import tool_functions
from tool_functions import State

import connic
from conftest import Connect, Server, StartServer
from fake_provider import SIGNATURE, FakeGemini

KEY = "AIza-test-very-secret-key"
TOOLS = [f"tool_functions:{name}" for name in ("get_weather", "word_count", "meet", "explode", "wait_forever")]

pytestmark = [
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]


@pytest.fixture
async def fake() -> AsyncIterator[FakeGemini]:
    tool_functions.reset()
    provider = FakeGemini()
    await provider.start()
    yield provider
    await provider.close()


async def start(start_server: StartServer, fake: FakeGemini, progress: bool = True, **options: Any) -> Server:
    agent = {"use": "gemini", "sdk": "google-genai", "base_url": fake.base_url, "api_key": KEY, "tools": TOOLS}
    connector = {"secrets": ["s"], "progress_events": progress}
    return await start_server({"agents": {"gem": {**agent, **options}}, "connectors": [connector]})


def kinds(frames: list[dict[str, Any]]) -> list[str]:
    return [f["type"] for f in frames]


def responses(request: dict[str, Any]) -> list[dict[str, Any]]:
    """The functionResponse parts of a request's last content."""
    last = request["contents"][-1]
    assert last["role"] == "user"
    return [part["functionResponse"] for part in last["parts"]]


async def test_tool_runs_and_its_result_goes_back_as_a_function_response(
    start_server: StartServer, connect: Connect, fake: FakeGemini
) -> None:
    fake.tool_rounds = [[("get_weather", {"city": "Oslo", "unit": "F"})]]
    server = await start(start_server, fake)
    client = await connect(server.url(), secret="s")
    frames = await client.reply({"id": "m1", "message": "Weather in Oslo?"})
    assert kinds(frames) == ["ack", "stream_start", "tool_call", "tool_result"] + ["stream_chunk"] * 3 + ["stream_end"]
    assert frames[2] == {
        "type": "tool_call",
        "id": "m1",
        "agent": "gem",
        "call_id": "call_1_0",
        "name": "get_weather",
        "arguments": {"city": "Oslo", "unit": "F"},
    }
    weather = {"city": "Oslo", "temperature": 21, "unit": "F"}
    assert frames[3]["result"] == weather and frames[3]["is_error"] is False
    assert State.calls == [("get_weather", {"city": "Oslo", "unit": "F"})]
    assert frames[-1]["full_response"] == "Hello from Gemini."
    # Offered as functionDeclarations with the JSON Schema pydantic made from the signature.
    declarations = fake.requests[0]["tools"][0]["functionDeclarations"]
    weather_tool = next(d for d in declarations if d["name"] == "get_weather")
    assert weather_tool["description"] == "The current weather in a city."
    # google-genai sends this field in snake case (Google's JSON parser takes either spelling).
    schema = weather_tool.get("parametersJsonSchema") or weather_tool["parameters_json_schema"]
    assert schema["required"] == ["city"] and schema["properties"]["city"]["description"] == "The city, e.g. Oslo"
    # The second request: the model's functionCall part (signature kept), then the functionResponse.
    contents = fake.requests[1]["contents"]
    assert contents[-2] == {
        "role": "model",
        "parts": [
            {
                "functionCall": {"name": "get_weather", "args": {"city": "Oslo", "unit": "F"}},
                "thoughtSignature": SIGNATURE,
            }
        ],
    }
    assert responses(fake.requests[1]) == [{"name": "get_weather", "response": {"output": weather}}]
    # Usage summed over both model calls (the fake reports 9 + 4 on each).
    assert frames[-1]["token_usage"] == {"prompt_tokens": 18, "candidates_tokens": 8}


async def test_two_calls_run_in_parallel(start_server: StartServer, connect: Connect, fake: FakeGemini) -> None:
    fake.tool_rounds = [[("meet", {"who": "ada"}), ("meet", {"who": "bob"})]]
    server = await start(start_server, fake, tool_timeout=10)
    client = await connect(server.url(), secret="s")
    frames = await client.reply({"message": "meet"}, timeout=15)
    assert kinds(frames)[2:6] == ["tool_call", "tool_call", "tool_result", "tool_result"]
    assert responses(fake.requests[1]) == [
        {"name": "meet", "response": {"output": "ada met bob"}},
        {"name": "meet", "response": {"output": "bob met ada"}},
    ]
    assert frames[-1]["type"] == "stream_end"


@pytest.mark.parametrize(
    ("call", "needle"),
    [
        (("explode", {"reason": "disk on fire"}), "RuntimeError: disk on fire"),
        (("no_such_tool", {}), "unknown tool 'no_such_tool'"),
        (("get_weather", {"town": "Oslo"}), "invalid arguments: city: Missing required argument"),
    ],
    ids=["raises", "unknown-name", "invalid-arguments"],
)
async def test_a_failed_call_is_an_error_result_and_the_turn_goes_on(
    start_server: StartServer, connect: Connect, fake: FakeGemini, call: tuple[str, Any], needle: str
) -> None:
    fake.tool_rounds = [[call]]
    server = await start(start_server, fake)
    client = await connect(server.url(), secret="s")
    frames = await client.reply({"message": "go"})
    result = next(f for f in frames if f["type"] == "tool_result")
    assert result["is_error"] is True and needle in result["result"]
    [response] = responses(fake.requests[1])
    assert response["name"] == call[0] and needle in response["response"]["error"]
    assert frames[-1]["type"] == "stream_end" and frames[-1]["full_response"] == "Hello from Gemini."


async def test_max_tool_rounds_ends_a_runaway_loop(
    start_server: StartServer, connect: Connect, fake: FakeGemini
) -> None:
    fake.tool_loop = [("word_count", {"text": "again"})]
    server = await start(start_server, fake, max_tool_rounds=2)
    client = await connect(server.url(), secret="s")
    frames = await client.reply({"message": "loop"})
    assert kinds(frames).count("tool_result") == 2
    assert frames[-1]["code"] == "agent_error"
    assert frames[-1]["message"] == "the model was still calling tools after 2 rounds (max_tool_rounds = 2)"
    assert len(fake.requests) == 3


async def test_cancel_during_a_slow_tool_cancels_it(
    start_server: StartServer, connect: Connect, fake: FakeGemini
) -> None:
    fake.tool_rounds = [[("wait_forever", {})]]
    server = await start(start_server, fake)
    client = await connect(server.url(), secret="s")
    await client.send({"id": "c", "message": "slow"})
    await client.until("tool_call")
    await asyncio.wait_for(State.started.wait(), 5)
    await client.send({"type": "cancel", "id": "c"})
    assert (await client.until("stream_end"))[-1]["finish_reason"] == "cancelled"
    assert State.cancelled.is_set()  # the turn ended only once the tool had
    assert len(fake.requests) == 1


async def test_tool_timeout_is_an_error_response(start_server: StartServer, connect: Connect, fake: FakeGemini) -> None:
    fake.tool_rounds = [[("wait_forever", {})]]
    server = await start(start_server, fake, tool_timeout=0.2)
    client = await connect(server.url(), secret="s")
    frames = await client.reply({"message": "slow"})
    result = next(f for f in frames if f["type"] == "tool_result")
    message = "the tool did not finish within 0.2 s (tool_timeout)"
    assert result["is_error"] is True and result["result"] == message
    assert State.cancelled.is_set()  # the tool's task was cancelled, not left running
    (response,) = responses(fake.requests[1])
    assert response["name"] == "wait_forever" and response["response"] == {"error": message}
    assert frames[-1]["type"] == "stream_end" and frames[-1]["full_response"] == "Hello from Gemini."


async def test_sync_tool_in_a_thread_and_progress_events_off(
    start_server: StartServer, connect: Connect, fake: FakeGemini
) -> None:
    fake.tool_rounds = [[("word_count", {"text": "one two three"})]]
    server = await start(start_server, fake, progress=False)
    client = await connect(server.url(), secret="s")
    frames = await client.reply({"message": "count"})
    assert kinds(frames) == ["ack", "stream_start"] + ["stream_chunk"] * 3 + ["stream_end"]
    assert State.threads and State.threads[0] != threading.main_thread().name
    assert responses(fake.requests[1]) == [{"name": "word_count", "response": {"output": 3}}]


def test_the_legacy_sdk_refuses_tools(monkeypatch: pytest.MonkeyPatch) -> None:
    config = {
        "agents": {"gem": {"use": "gemini", "sdk": "google-generativeai", "api_key": KEY, "tools": TOOLS[:1]}},
        "connectors": [{"secrets": ["s"]}],
    }
    with pytest.raises(connic.ConfigError) as caught:
        connic.create_app(config)
    expected = (
        'agents.gem: tools, mcp_servers: the google-generativeai SDK cannot call tools here: use sdk = "google-genai"'
    )
    assert expected in str(caught.value)


async def test_an_agent_without_tools_sends_no_tools(
    start_server: StartServer, connect: Connect, fake: FakeGemini
) -> None:
    server = await start(start_server, fake, tools=[])
    client = await connect(server.url(), secret="s")
    frames = await client.reply({"message": "hi"})
    assert frames[-1]["full_response"] == "Hello from Gemini."
    assert "tools" not in fake.requests[0] and "toolConfig" not in fake.requests[0]
