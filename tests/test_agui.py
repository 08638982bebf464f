"""The agui transport over HTTP + SSE: real clients (the official HttpAgent in Node, and aiohttp
with every event parsed by ag-ui-protocol) against a real server (docs/agui.md)."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from test_agui_support import (
    AUTH,
    SECRET,
    agui_config,
    agui_registry,
    js_events,
    js_run,
    kinds,
    post_run,
    run_input,
    text_of,
)

from conftest import StartServer
from fake_provider import FakeGemini

pytestmark = [
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]


async def start(start_server: StartServer, connector: Any = None, agents: Any = None, **kwargs: Any) -> Any:
    return await start_server(agui_config(connector, agents, **kwargs), registry=agui_registry())


async def test_http_agent_streams_echo_with_tool_calls_in_order(start_server: StartServer) -> None:
    server = await start(start_server, agents={"assistant": {"use": "echo", "demo_tools": True}})
    thread = str(uuid.uuid4())
    spec = {"url": server.http + "/agui", "headers": AUTH, "threadId": thread, "turns": ["hello big world", "again"]}
    lines = await js_run(spec)
    assert not [line for line in lines if "error" in line], lines
    events = js_events(lines)
    first = events[: events.index(next(e for e in events if e["type"] == "RUN_FINISHED")) + 1]
    assert [e["type"] for e in first] == [
        "RUN_STARTED",
        "STEP_STARTED",
        "TOOL_CALL_START",
        "TOOL_CALL_ARGS",
        "TOOL_CALL_END",
        "TOOL_CALL_RESULT",
        "STEP_FINISHED",
        "TEXT_MESSAGE_START",
        "TEXT_MESSAGE_CONTENT",
        "TEXT_MESSAGE_CONTENT",
        "TEXT_MESSAGE_CONTENT",
        "TEXT_MESSAGE_END",
        "RUN_FINISHED",
    ]
    call = first[2]
    assert call["toolCallName"] == "word_count"
    assert all(e["toolCallId"] == call["toolCallId"] for e in first[2:6])
    assert first[3]["delta"] == '{"text": "hello big world"}'
    assert first[5]["content"] == '{"words": 3}'
    assert first[-1]["threadId"] == thread
    assert first[-1]["usage"] == [{"inputTokens": 3, "outputTokens": 3}]
    done = [line["done"] for line in lines if "done" in line]
    assert len(done) == 2
    # The client's own view of the thread: both exchanges, the answers as assistant messages.
    texts = [(m["role"], m.get("content")) for m in done[1]["messages"] if m["role"] in ("user", "assistant")]
    assert ("assistant", "hello big world") in texts and ("assistant", "again") in texts


async def test_every_event_parses_with_the_python_models(start_server: StartServer) -> None:
    server = await start(start_server, agents={"assistant": {"use": "echo", "demo_tools": True}})
    status, events = await post_run(server.http + "/agui", run_input("t-parse", "one two"))
    assert status == 200
    assert isinstance(events, list)
    assert kinds(events)[0] == "RUN_STARTED" and kinds(events)[-1] == "RUN_FINISHED"
    assert text_of(events) == "one two"
    assert [type(e).__name__ for e in events[2:6]] == [
        "ToolCallStartEvent",
        "ToolCallArgsEvent",
        "ToolCallEndEvent",
        "ToolCallResultEvent",
    ]


async def test_a_thread_remembers_its_history(start_server: StartServer) -> None:
    server = await start(start_server, agents={"look": {"use": "inspect"}})
    url = server.http + "/agui"
    await post_run(url, run_input("t-mem", "first"))
    status, events = await post_run(url, run_input("t-mem", "second"))
    assert status == 200 and isinstance(events, list)
    seen = json.loads(text_of(events))
    assert seen["session_id"] == "t-mem"
    assert [h["text"] for h in seen["history"]] == ["first", seen["history"][1]["text"]]
    assert seen["message"] == "second"
    assert seen["context"]["agui"]["thread_id"] == "t-mem"


async def test_a_new_thread_starts_from_the_clients_messages(start_server: StartServer) -> None:
    server = await start(start_server, agents={"look": {"use": "inspect"}})
    before = [
        {"id": "u0", "role": "user", "content": "earlier question"},
        {"id": "a0", "role": "assistant", "content": "earlier answer"},
    ]
    status, events = await post_run(server.http + "/agui", run_input("t-seed", "now", before=before))
    assert status == 200 and isinstance(events, list)
    history = json.loads(text_of(events))["history"]
    assert [(h["role"], h["text"]) for h in history] == [("user", "earlier question"), ("agent", "earlier answer")]


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"X-Connic-Secret": "wrong"}, {"Authorization": f"Basic {SECRET}"}],
)
async def test_a_wrong_secret_is_401_before_any_stream(start_server: StartServer, headers: dict[str, str]) -> None:
    server = await start(start_server)
    status, text = await post_run(server.http + "/agui", run_input("t-401", "hi"), headers=headers)
    assert status == 401
    assert text == "missing or wrong secret\n"


async def test_x_connic_secret_authenticates(start_server: StartServer) -> None:
    server = await start(start_server)
    status, events = await post_run(server.http + "/agui", run_input("t-x", "hi"), headers={"X-Connic-Secret": SECRET})
    assert status == 200 and isinstance(events, list) and text_of(events) == "hi"


async def test_http_agent_reports_a_wrong_secret(start_server: StartServer) -> None:
    server = await start(start_server)
    spec = {"url": server.http + "/agui", "headers": {"Authorization": "Bearer nope"}, "threadId": "t", "turns": ["x"]}
    lines = await js_run(spec)
    assert not js_events(lines)
    assert "401" in lines[-1]["error"]


async def test_an_agent_in_the_path_answers_alone(start_server: StartServer) -> None:
    agents = {"a": {"use": "echo"}, "b": {"use": "inspect"}}
    server = await start(start_server, agents=agents)
    status, events = await post_run(server.http + "/agui/a", run_input("t-a", "only a"))
    assert status == 200 and isinstance(events, list)
    assert text_of(events) == "only a"
    starts = [e for e in events if kinds([e]) == ["TEXT_MESSAGE_START"]]
    assert [e.name for e in starts] == ["a"]
    status, text = await post_run(server.http + "/agui/zed", run_input("t-a", "x"))
    assert status == 404 and "no agent 'zed'" in str(text)


async def test_several_agents_each_stream_a_message_in_one_run(start_server: StartServer) -> None:
    server = await start(start_server, agents={"a": {"use": "echo"}, "b": {"use": "echo"}})
    status, events = await post_run(server.http + "/agui", run_input("t-ab", "both"))
    assert status == 200 and isinstance(events, list)
    assert sorted(e.name for e in events if kinds([e]) == ["TEXT_MESSAGE_START"]) == ["a", "b"]
    assert kinds(events)[-1] == "RUN_FINISHED"
    assert events[-1].usage[0].input_tokens == 2


async def test_an_agent_failure_is_run_error_with_connics_code(start_server: StartServer) -> None:
    server = await start(start_server, agents={"bad": {"use": "fail"}})
    status, events = await post_run(server.http + "/agui", run_input("t-fail", "x"))
    assert status == 200 and isinstance(events, list)
    assert kinds(events) == [
        "RUN_STARTED",
        "TEXT_MESSAGE_START",
        "TEXT_MESSAGE_CONTENT",
        "TEXT_MESSAGE_END",
        "RUN_ERROR",
    ]
    assert events[-1].code == "agent_error"


async def test_limits_come_from_the_session_core(start_server: StartServer) -> None:
    connector = {"rate_limit": {"messages": 1, "per": 60}, "max_messages": 5}
    server = await start(start_server, connector)
    url = server.http + "/agui"
    status, events = await post_run(url, run_input("t-rl", "one"))
    assert status == 200 and kinds(events)[-1] == "RUN_FINISHED"  # type: ignore[arg-type]
    status, events = await post_run(url, run_input("t-rl", "two"))
    assert isinstance(events, list) and kinds(events) == ["RUN_STARTED", "RUN_ERROR"]
    assert events[-1].code == "rate_limited"


async def test_agent_timeout_is_run_error(start_server: StartServer) -> None:
    server = await start(start_server, {"agent_timeout": 0.2}, agents={"slow": {"use": "slow", "seconds": 30}})
    _, events = await post_run(server.http + "/agui", run_input("t-to", "x"))
    assert isinstance(events, list) and kinds(events)[-1] == "RUN_ERROR"
    assert events[-1].code == "agent_timeout"


@pytest.fixture
async def fake() -> AsyncIterator[FakeGemini]:
    provider = FakeGemini()
    await provider.start()
    yield provider
    await provider.close()


async def test_http_agent_streams_the_gemini_agent(start_server: StartServer, fake: FakeGemini) -> None:
    agent = {"use": "gemini", "sdk": "google-genai", "base_url": fake.base_url, "api_key": "AIza-test-key"}
    server = await start(start_server, agents={"gem": agent})
    spec = {"url": server.http + "/agui", "headers": AUTH, "threadId": "t-gem", "turns": ["Hi", "Again"]}
    lines = await js_run(spec)
    assert not [line for line in lines if "error" in line], lines
    events = js_events(lines)
    deltas = [e["delta"] for e in events if e["type"] == "TEXT_MESSAGE_CONTENT"]
    assert deltas[:3] == ["Hello", " from", " Gemini."]
    finished = [e for e in events if e["type"] == "RUN_FINISHED"]
    assert finished[0]["usage"] == [{"inputTokens": 9, "outputTokens": 4}]
    # The second run's request to the model carries the thread's history, kept by connic.
    contents = fake.requests[1]["contents"]
    assert [c["role"] for c in contents] == ["user", "model", "user"]


def test_every_agui_key_is_documented_with_its_default() -> None:
    import attrs

    from conftest import ROOT
    from connic.transports.agui import AguiTransport

    text = (ROOT / "docs" / "configuration.md").read_text()
    section = text[text.index('### `transport = "agui"`') :]
    section = section[: section.index("\n### ", 1)]
    for field in attrs.fields(AguiTransport.Options):
        rows = [line for line in section.splitlines() if line.startswith(f"| `{field.name}` |")]
        assert rows, f"configuration.md's agui table has no row for `{field.name}`"
        default = field.default
        if isinstance(default, bool):
            written = "true" if default else "false"
        elif isinstance(default, str):
            written = json.dumps(default)
        elif isinstance(default, float):
            written = f"{default:g}"
        elif isinstance(default, int):
            written = str(default)
        else:
            continue
        assert f"`{written}`" in rows[0].split("|")[3], f"`{field.name}` defaults to {written}: {rows[0]}"


def test_setup_cfg_declares_the_entry_point_and_the_extra() -> None:
    from conftest import ROOT

    text = (ROOT / "setup.cfg").read_text()
    assert "agui = connic.transports.agui:AguiTransport" in text
    assert "agui =\n    ag-ui-protocol" in text
