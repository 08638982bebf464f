"""The openai agent's function tools: a real server, a real WebSocket client, the fake Chat Completions API.

The fake asks for tool calls with streamed ``tool_calls`` deltas; the functions in
tests/tool_functions.py run; the fake's next request must carry the assistant message
with its ``tool_calls`` and one ``role: "tool"`` message per call, paired by ``tool_call_id``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import tool_functions
from tool_functions import State

from conftest import CliServer, Connect, Server, StartServer
from fake_provider import FakeOpenAI

KEY = "sk-test-very-secret-key"
TOOLS = [f"tool_functions:{name}" for name in ("get_weather", "word_count", "meet", "explode", "wait_forever")]


@pytest.fixture
async def fake() -> AsyncIterator[FakeOpenAI]:
    tool_functions.reset()
    provider = FakeOpenAI()
    await provider.start()
    yield provider
    await provider.close()


async def start(start_server: StartServer, fake: FakeOpenAI, progress: bool = True, **options: Any) -> Server:
    agent = {"use": "openai", "base_url": fake.base_url, "api_key": KEY, "model": "m", "tools": TOOLS, **options}
    connector = {"secrets": ["s"], "progress_events": progress}
    return await start_server({"agents": {"gpt": agent}, "connectors": [connector]})


def kinds(frames: list[dict[str, Any]]) -> list[str]:
    return [f["type"] for f in frames]


def tool_messages(request: dict[str, Any]) -> list[dict[str, Any]]:
    return [m for m in request["messages"] if m["role"] == "tool"]


async def test_tool_runs_and_its_result_goes_back_as_a_tool_message(
    start_server: StartServer, connect: Connect, fake: FakeOpenAI
) -> None:
    fake.tool_rounds = [[("get_weather", {"city": "Oslo"})]]
    server = await start(start_server, fake)
    client = await connect(server.url(), secret="s")
    frames = await client.reply({"id": "m1", "message": "Weather in Oslo?"})
    assert kinds(frames) == ["ack", "stream_start", "tool_call", "tool_result"] + ["stream_chunk"] * 3 + ["stream_end"]
    call, result = frames[2], frames[3]
    assert call == {
        "type": "tool_call",
        "id": "m1",
        "agent": "gpt",
        "call_id": "call_1_0",
        "name": "get_weather",
        "arguments": {"city": "Oslo"},
    }
    weather = {"city": "Oslo", "temperature": 21, "unit": "C"}
    assert result["call_id"] == "call_1_0" and result["result"] == weather and result["is_error"] is False
    assert State.calls == [("get_weather", {"city": "Oslo", "unit": "C"})]
    assert frames[-1]["full_response"] == "Hello from the fake."
    # What the model was offered: the schema pydantic made from the signature and docstring.
    offered = {t["function"]["name"]: t["function"] for t in fake.requests[0]["tools"]}
    assert set(offered) == {"get_weather", "word_count", "meet", "explode", "wait_forever"}
    weather_tool = offered["get_weather"]
    assert weather_tool["description"] == "The current weather in a city."
    assert weather_tool["parameters"]["required"] == ["city"]
    assert weather_tool["parameters"]["properties"]["city"]["description"] == "The city, e.g. Oslo"
    assert weather_tool["parameters"]["properties"]["unit"]["enum"] == ["C", "F"]
    # The second request: the assistant's tool_calls, then the result paired by tool_call_id.
    second = fake.requests[1]["messages"]
    assert second[-2] == {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "call_1_0", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
        ],
    }
    assert second[-1]["role"] == "tool" and second[-1]["tool_call_id"] == "call_1_0"
    assert json.loads(second[-1]["content"]) == weather
    # Usage is summed over both model calls (the fake reports 11 + 3 on each).
    assert frames[-1]["token_usage"] == {"prompt_tokens": 22, "candidates_tokens": 6}
    # The history keeps the answer's text only.
    await client.reply({"message": "thanks"})
    assert fake.requests[2]["messages"][-2:] == [
        {"role": "assistant", "content": "Hello from the fake."},
        {"role": "user", "content": "thanks"},
    ]


async def test_two_calls_run_in_parallel(start_server: StartServer, connect: Connect, fake: FakeOpenAI) -> None:
    # meet() returns only once both calls are running at the same time.
    fake.tool_rounds = [[("meet", {"who": "ada"}), ("meet", {"who": "bob"})]]
    server = await start(start_server, fake, tool_timeout=10)
    client = await connect(server.url(), secret="s")
    frames = await client.reply({"message": "meet"}, timeout=15)
    assert kinds(frames)[2:6] == ["tool_call", "tool_call", "tool_result", "tool_result"]
    results = {f["call_id"]: f for f in frames if f["type"] == "tool_result"}
    assert results["call_1_0"]["result"] == "ada met bob" and not results["call_1_0"]["is_error"]
    assert results["call_1_1"]["result"] == "bob met ada" and not results["call_1_1"]["is_error"]
    answers = tool_messages(fake.requests[1])
    assert [(m["tool_call_id"], m["content"]) for m in answers] == [
        ("call_1_0", "ada met bob"),
        ("call_1_1", "bob met ada"),
    ]
    assert frames[-1]["type"] == "stream_end"


async def test_a_tool_that_raises_is_an_error_result_and_the_turn_goes_on(
    start_server: StartServer, connect: Connect, fake: FakeOpenAI
) -> None:
    fake.tool_rounds = [[("explode", {"reason": "disk on fire"})]]
    server = await start(start_server, fake)
    client = await connect(server.url(), secret="s")
    frames = await client.reply({"message": "go"})
    result = next(f for f in frames if f["type"] == "tool_result")
    assert result["is_error"] is True and result["result"] == "RuntimeError: disk on fire"
    assert json.loads(tool_messages(fake.requests[1])[0]["content"]) == {"error": "RuntimeError: disk on fire"}
    assert frames[-1]["type"] == "stream_end" and frames[-1]["full_response"] == "Hello from the fake."


@pytest.mark.parametrize(
    ("call", "needle"),
    [
        (("no_such_tool", {}), "unknown tool 'no_such_tool' (the tools are: explode, get_weather, meet, "),
        (("get_weather", {"town": "Oslo"}), "invalid arguments: city: Missing required argument"),
        (("get_weather", '{"city": "Os'), "the arguments are not a JSON object"),
    ],
    ids=["unknown-name", "invalid-arguments", "malformed-json"],
)
async def test_a_bad_call_from_the_model_is_an_error_result(
    start_server: StartServer, connect: Connect, fake: FakeOpenAI, call: tuple[str, Any], needle: str
) -> None:
    fake.tool_rounds = [[call]]
    server = await start(start_server, fake)
    client = await connect(server.url(), secret="s")
    frames = await client.reply({"message": "go"})
    result = next(f for f in frames if f["type"] == "tool_result")
    assert result["is_error"] is True and needle in result["result"]
    assert needle in json.loads(tool_messages(fake.requests[1])[0]["content"])["error"]
    assert State.calls == []
    assert frames[-1]["type"] == "stream_end" and frames[-1]["full_response"] == "Hello from the fake."


async def test_max_tool_rounds_ends_a_runaway_loop(
    start_server: StartServer, connect: Connect, fake: FakeOpenAI
) -> None:
    fake.tool_loop = [("word_count", {"text": "again and again"})]
    server = await start(start_server, fake, max_tool_rounds=3)
    client = await connect(server.url(), secret="s")
    frames = await client.reply({"message": "loop"})
    assert kinds(frames).count("tool_result") == 3
    error = frames[-1]
    assert error["type"] == "error" and error["code"] == "agent_error"
    assert error["message"] == "the model was still calling tools after 3 rounds (max_tool_rounds = 3)"
    assert len(fake.requests) == 4
    # The session goes on.
    fake.tool_loop = None
    frames = await client.reply({"message": "plain"})
    assert frames[-1]["full_response"] == "Hello from the fake."


async def test_cancel_during_a_slow_tool_cancels_it(
    start_server: StartServer, connect: Connect, fake: FakeOpenAI
) -> None:
    fake.tool_rounds = [[("wait_forever", {})]]
    server = await start(start_server, fake)
    client = await connect(server.url(), secret="s")
    await client.send({"id": "c", "message": "slow"})
    await client.until("tool_call")
    await asyncio.wait_for(State.started.wait(), 5)
    await client.send({"type": "cancel", "id": "c"})
    end = (await client.until("stream_end"))[-1]
    assert end["finish_reason"] == "cancelled"
    assert State.cancelled.is_set()  # the turn ended only once the tool had
    assert len(fake.requests) == 1  # the model was not asked again


async def test_a_failing_tools_text_is_logged_at_debug_only(
    start_server: StartServer, connect: Connect, fake: FakeOpenAI, caplog: pytest.LogCaptureFixture
) -> None:
    """An exception's text often quotes the arguments: WARNING names the tool and the type only."""
    caplog.set_level(logging.DEBUG, logger="connic.agents.tools")
    fake.tool_rounds = [[("explode", {"reason": "card 4111-1111-1111-1111"})]]
    server = await start(start_server, fake)
    client = await connect(server.url(), secret="s")
    frames = await client.reply({"message": "go"})
    assert frames[-1]["type"] == "stream_end"
    records = [r for r in caplog.records if r.name == "connic.agents.tools"]
    formatter = logging.Formatter()
    warnings = [formatter.format(r) for r in records if r.levelno >= logging.WARNING]
    assert warnings == ["agent gpt: tool explode failed: RuntimeError"]
    debug = "\n".join(formatter.format(r) for r in records if r.levelno == logging.DEBUG)
    assert "card 4111-1111-1111-1111" in debug and "Traceback" in debug


async def test_tool_timeout_is_an_error_result(start_server: StartServer, connect: Connect, fake: FakeOpenAI) -> None:
    fake.tool_rounds = [[("wait_forever", {})]]
    server = await start(start_server, fake, tool_timeout=0.2)
    client = await connect(server.url(), secret="s")
    frames = await client.reply({"message": "slow"})
    result = next(f for f in frames if f["type"] == "tool_result")
    assert result["is_error"] is True and result["result"] == "the tool did not finish within 0.2 s (tool_timeout)"
    assert State.cancelled.is_set()
    assert frames[-1]["full_response"] == "Hello from the fake."


async def test_sync_tool_runs_in_a_worker_thread(start_server: StartServer, connect: Connect, fake: FakeOpenAI) -> None:
    fake.tool_rounds = [[("word_count", {"text": "one two three"})]]
    server = await start(start_server, fake)
    client = await connect(server.url(), secret="s")
    frames = await client.reply({"message": "count"})
    assert next(f for f in frames if f["type"] == "tool_result")["result"] == 3
    assert State.calls == [("word_count", {"text": "one two three"})]
    assert State.threads and State.threads[0] != threading.main_thread().name


async def test_progress_events_off_shows_no_tool_frames(
    start_server: StartServer, connect: Connect, fake: FakeOpenAI
) -> None:
    fake.tool_rounds = [[("get_weather", {"city": "Lima"}), ("word_count", {"text": "a b"})]]
    server = await start(start_server, fake, progress=False)
    client = await connect(server.url(), secret="s")
    frames = await client.reply({"message": "both"})
    assert kinds(frames) == ["ack", "stream_start"] + ["stream_chunk"] * 3 + ["stream_end"]
    assert len(State.calls) == 2  # the agent ran the same
    assert len(tool_messages(fake.requests[1])) == 2


async def test_non_streaming_tool_frames_precede_the_response(
    start_server: StartServer, connect: Connect, fake: FakeOpenAI
) -> None:
    fake.tool_rounds = [[("word_count", {"text": "a b"})]]
    agent = {"use": "openai", "base_url": fake.base_url, "api_key": KEY, "tools": TOOLS}
    connector = {"secrets": ["s"], "progress_events": True, "streaming": False}
    server = await start_server({"agents": {"gpt": agent}, "connectors": [connector]})
    client = await connect(server.url(), secret="s")
    frames = await client.reply({"message": "count"})
    assert kinds(frames) == ["ack", "tool_call", "tool_result", "response"]
    assert frames[-1]["response"] == "Hello from the fake."


async def test_an_agent_without_tools_sends_no_tools_key(
    start_server: StartServer, connect: Connect, fake: FakeOpenAI
) -> None:
    # Some OpenAI-compatible servers refuse an empty "tools" array.
    server = await start(start_server, fake, tools=[])
    client = await connect(server.url(), secret="s")
    frames = await client.reply({"message": "hi"})
    assert frames[-1]["full_response"] == "Hello from the fake."
    assert "tools" not in fake.requests[0]


async def test_tool_threads_bounds_the_sync_calls_running_at_once(
    start_server: StartServer, connect: Connect, fake: FakeOpenAI, caplog: pytest.LogCaptureFixture
) -> None:
    """tool_threads = 1: a hung call holds the one thread; the next sync call waits, and tool_timeout ends it."""
    caplog.set_level(logging.WARNING, logger="connic.agents.tools")
    fake.tool_rounds = [[("hang", {}), ("word_count", {"text": "a b"})]]
    tools = ["tool_functions:hang", "tool_functions:word_count"]
    server = await start(start_server, fake, tools=tools, tool_threads=1, tool_timeout=0.5)
    client = await connect(server.url(), secret="s")
    try:
        frames = await client.reply({"message": "go"})
        results = [f["result"] for f in frames if f["type"] == "tool_result"]
        assert results == ["the tool did not finish within 0.5 s (tool_timeout)"] * 2
        assert State.calls == []  # word_count never got the thread
        assert "agent gpt: all 1 tool_threads are busy; sync tool calls wait for one" in caplog.text
    finally:
        State.release.set()  # hang() returns: its thread is free again
    fake.tool_rounds = [[("word_count", {"text": "a b c"})]]
    frames = await client.reply({"message": "again"})
    assert [f["result"] for f in frames if f["type"] == "tool_result"] == [3]


HANG_PY = """
import threading


def hang() -> str:
    \"\"\"Stuck in a blocking call for good (a dead socket, say).\"\"\"
    threading.Event().wait()
    return "unreachable"
"""


async def test_hung_sync_tools_do_not_keep_connic_run_from_exiting(
    tmp_path: Path, cli: Callable[..., CliServer], connect: Connect, fake: FakeOpenAI
) -> None:
    """SIGTERM with sync tools that never return: the turn is cancelled, the threads abandoned, exit 0.

    In the event loop's default executor, asyncio.run would wait for them at exit, forever.
    """
    (tmp_path / "hang.py").write_text(HANG_PY)
    fake.tool_rounds = [[("hang", {}), ("hang", {}), ("hang", {})]]
    config = tmp_path / "app.toml"
    config.write_text(
        "[server]\nshutdown_grace = 0.5\n\n"
        f'[agents.bot]\nuse = "openai"\nbase_url = "{fake.base_url}"\napi_key = "k"\ntools = ["hang.py:hang"]\n\n'
        '[[connectors]]\nsecrets = ["s"]\nprogress_events = true\n'
    )
    server = cli("--config", str(config))
    client = await connect(server.url, secret="s")
    await client.send({"id": "m1", "message": "hang"})
    frames = await client.until("tool_call", timeout=10)
    assert frames[-1]["name"] == "hang"
    # The drain gives the turn shutdown_grace (0.5 s) before it cancels it: the calls are in their threads by then.
    server.proc.send_signal(signal.SIGTERM)
    out, _ = await asyncio.to_thread(server.proc.communicate, timeout=30)
    assert server.proc.returncode == 0, out
    assert "agent bot: 3 sync tool call(s) still running abandoned" in out
