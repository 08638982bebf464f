"""PROTOCOL.md §9: tool and progress events, from what an agent yields to the frames a client sees.

An agent may yield ``connic.ToolCall``, ``connic.ToolResult`` and ``connic.Progress``
besides text and ``Usage``. On a connector with ``progress_events = true`` they become
sequenced ``tool_call``, ``tool_result`` and ``progress`` frames (inside the stream, or
before the ``response``); otherwise they are dropped. They never enter the answer's text
or the history; a bad one is that turn's ``agent_error``; middleware sees them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import attrs
import pytest

import connic
from conftest import SECRET, Connect, StartServer, make_config
from helpers import test_registry


class Tooly(connic.Agent):
    """A progress event and a tool call before any text, a failing tool call between chunks."""

    async def respond(self, turn: connic.Turn) -> AsyncIterator[Any]:
        yield connic.Progress("retrieving", {"query": turn.message})
        yield connic.ToolCall("c1", "search", {"q": turn.message, "limit": 2})
        yield connic.ToolResult("c1", "search", {"hits": ["a", "b"]})
        yield "Hello"
        yield connic.ToolCall("c2", "weather", {})
        yield connic.ToolResult("c2", "weather", "no network", is_error=True)
        yield connic.Progress("thinking")
        yield " world"
        yield connic.Usage(3, 2)


BAD_EVENTS: dict[str, Any] = {
    "call_id not a str": lambda: connic.ToolCall(1, "n", {}),  # type: ignore[arg-type]
    "name not a str": lambda: connic.ToolCall("c", None, {}),  # type: ignore[arg-type]
    "arguments not a mapping": lambda: connic.ToolCall("c", "n", ["a"]),  # type: ignore[arg-type]
    "arguments not JSON": lambda: connic.ToolCall("c", "n", {"when": object()}),
    "result not JSON": lambda: connic.ToolResult("c", "n", {1, 2}),
    "result NaN": lambda: connic.ToolResult("c", "n", float("nan")),
    "is_error not a bool": lambda: connic.ToolResult("c", "n", 1, is_error="yes"),  # type: ignore[arg-type]
    "stage not a str": lambda: connic.Progress(b"thinking"),  # type: ignore[arg-type]
    "detail not JSON": lambda: connic.Progress("x", 1j),
}


class BadEvent(connic.Agent):
    """Streams a chunk, then makes the bad event the message names."""

    async def respond(self, turn: connic.Turn) -> AsyncIterator[Any]:
        yield "partial"
        yield BAD_EVENTS[turn.message]()


SEEN: list[str] = []


async def renames_tools(turn: connic.Turn, emit: connic.Emit, call_next: connic.CallNext) -> None:
    """Records every item's type, and renames tool calls: middleware sees events like chunks."""

    async def seen(item: Any) -> None:
        SEEN.append(type(item).__name__)
        if isinstance(item, connic.ToolCall):
            item = attrs.evolve(item, name=item.name.upper())
        await emit(item)

    await call_next(turn, seen)


def registry() -> Any:
    reg = test_registry()
    reg.register("agents", "tooly", Tooly)
    reg.register("agents", "badevent", BadEvent)
    reg.register("middleware", "renames", renames_tools)
    return reg


AGENTS = {"tooly": {"use": "tooly"}, "bad": {"use": "badevent"}, "inspect": {"use": "inspect"}}

STREAMED = [
    {"type": "stream_start", "id": "m1", "agent": "tooly"},
    {"type": "progress", "id": "m1", "agent": "tooly", "stage": "retrieving", "detail": {"query": "hi there"}},
    {
        "type": "tool_call",
        "id": "m1",
        "agent": "tooly",
        "call_id": "c1",
        "name": "search",
        "arguments": {"q": "hi there", "limit": 2},
    },
    {
        "type": "tool_result",
        "id": "m1",
        "agent": "tooly",
        "call_id": "c1",
        "name": "search",
        "result": {"hits": ["a", "b"]},
        "is_error": False,
    },
    {"type": "stream_chunk", "id": "m1", "agent": "tooly", "chunk": "Hello"},
    {"type": "tool_call", "id": "m1", "agent": "tooly", "call_id": "c2", "name": "weather", "arguments": {}},
    {
        "type": "tool_result",
        "id": "m1",
        "agent": "tooly",
        "call_id": "c2",
        "name": "weather",
        "result": "no network",
        "is_error": True,
    },
    {"type": "progress", "id": "m1", "agent": "tooly", "stage": "thinking", "detail": None},
    {"type": "stream_chunk", "id": "m1", "agent": "tooly", "chunk": " world"},
    {
        "type": "stream_end",
        "id": "m1",
        "agent": "tooly",
        "full_response": "Hello world",
        "token_usage": {"prompt_tokens": 3, "candidates_tokens": 2},
        "finish_reason": "stop",
    },
]


async def history_texts(client: Any) -> list[tuple[str, str]]:
    await client.send({"type": "history"})
    frame = (await client.until("history"))[-1]
    return [(entry["role"], entry["text"]) for entry in frame["entries"]]


async def test_progress_events_on_streams_the_frames_in_order_with_seq(
    start_server: StartServer, connect: Connect
) -> None:
    server = await start_server(make_config({"progress_events": True}, AGENTS), registry=registry())
    client = await connect(server.url(), keep_seq=True)
    frames = await client.reply({"id": "m1", "message": "hi there", "agent": "tooly"})
    seqs = [frame.pop("seq") for frame in frames]
    assert seqs == list(range(seqs[0], seqs[0] + len(frames)))  # every frame numbered, none skipped
    assert frames[0] == {"type": "ack", "id": "m1", "message_number": 1, "agent": "tooly"}  # it named the agent
    assert frames[1:] == STREAMED
    # Neither the answer's text nor the history holds the events.
    assert await history_texts(client) == [("user", "hi there"), ("agent", "Hello world")]
    frames = await client.reply({"message": "next", "agent": "inspect"})
    assert '"text": "Hello world"' in frames[-1]["full_response"]


@pytest.mark.parametrize("connector", [{}, {"progress_events": False}], ids=["default", "off"])
async def test_progress_events_off_sends_none_and_the_agent_runs_the_same(
    start_server: StartServer, connect: Connect, connector: dict[str, Any]
) -> None:
    server = await start_server(make_config(connector, AGENTS), registry=registry())
    client = await connect(server.url())
    frames = await client.reply({"id": "m1", "message": "hi there", "agent": "tooly"})
    expected = [f for f in STREAMED if f["type"] not in ("progress", "tool_call", "tool_result")]
    assert frames[1:] == expected
    assert await history_texts(client) == [("user", "hi there"), ("agent", "Hello world")]


async def test_unstreamed_progress_events_precede_the_response(start_server: StartServer, connect: Connect) -> None:
    config = make_config({"progress_events": True, "streaming": False}, AGENTS)
    server = await start_server(config, registry=registry())
    client = await connect(server.url())
    frames = await client.reply({"id": "m1", "message": "hi there", "agent": "tooly"})
    events = [f for f in STREAMED if f["type"] in ("progress", "tool_call", "tool_result")]
    assert frames[1:-1] == events
    assert frames[-1] == {
        "type": "response",
        "id": "m1",
        "agent": "tooly",
        "response": "Hello world",
        "token_usage": {"prompt_tokens": 3, "candidates_tokens": 2},
        "finish_reason": "stop",
    }


@pytest.mark.parametrize("kind", list(BAD_EVENTS))
async def test_a_bad_event_is_that_turns_agent_error(start_server: StartServer, connect: Connect, kind: str) -> None:
    server = await start_server(make_config({"progress_events": True}, AGENTS), registry=registry())
    client = await connect(server.url())
    frames = await client.reply({"id": 7, "message": kind, "agent": "bad"})
    assert [f["type"] for f in frames] == ["ack", "stream_start", "stream_chunk", "error"], frames
    error = frames[-1]
    assert error["code"] == "agent_error" and error["id"] == 7 and error["agent"] == "bad", error
    assert "TypeError" in error["message"], error
    # The session goes on, and the failed partial answer is not in the history.
    frames = await client.reply({"id": 8, "message": "again", "agent": "tooly"})
    assert frames[-1]["type"] == "stream_end"
    assert await history_texts(client) == [("user", kind), ("user", "again"), ("agent", "Hello world")]


@pytest.mark.parametrize("progress_events", [True, False])
async def test_middleware_sees_the_events_like_chunks(
    start_server: StartServer, connect: Connect, progress_events: bool
) -> None:
    SEEN.clear()
    config = make_config({"progress_events": progress_events, "middleware": [{"use": "renames"}]}, AGENTS)
    server = await start_server(config, registry=registry())
    client = await connect(server.url())
    frames = await client.reply({"id": "m1", "message": "hi there", "agent": "tooly"})
    assert SEEN == [
        "Progress",
        "ToolCall",
        "ToolResult",
        "str",
        "ToolCall",
        "ToolResult",
        "Progress",
        "str",
        "Usage",
    ]
    names = [f["name"] for f in frames if f["type"] == "tool_call"]
    assert names == (["SEARCH", "WEATHER"] if progress_events else [])


@pytest.mark.parametrize("streaming", [True, False])
async def test_echo_demo_tools(start_server: StartServer, connect: Connect, streaming: bool) -> None:
    config = make_config(
        {"progress_events": True, "streaming": streaming}, {"echo": {"use": "echo", "demo_tools": True}}
    )
    server = await start_server(config)
    client = await connect(server.url())
    frames = await client.reply({"id": "m1", "message": "one two three"})
    head = ["ack", "stream_start"] if streaming else ["ack"]
    assert [f["type"] for f in frames[: len(head) + 3]] == [*head, "progress", "tool_call", "tool_result"]
    progress, call, result = frames[len(head) : len(head) + 3]
    assert progress["stage"] == "thinking"
    assert call["name"] == "word_count" and call["arguments"] == {"text": "one two three"}
    assert result["call_id"] == call["call_id"] and result["result"] == {"words": 3} and result["is_error"] is False
    assert frames[-1][("full_response" if streaming else "response")] == "one two three"


async def test_echo_without_demo_tools_yields_no_events(start_server: StartServer, connect: Connect) -> None:
    server = await start_server(make_config({"progress_events": True}))
    client = await connect(server.url())
    frames = await client.reply({"message": "one two"})
    assert [f["type"] for f in frames] == ["ack", "stream_start", "stream_chunk", "stream_chunk", "stream_end"]


async def test_progress_frames_are_replayed_on_resume(start_server: StartServer, connect: Connect) -> None:
    agents = {"echo": {"use": "echo", "demo_tools": True, "delay": 0.1}}
    server = await start_server(make_config({"progress_events": True}, agents))
    first = await connect(server.url(), keep_seq=True)
    connected = first.connected  # type: ignore[attr-defined]
    await first.send({"id": "m1", "message": "one two three"})
    seen = await first.until("tool_call")
    assert [(f["type"], f["seq"]) for f in seen] == [("ack", 1), ("stream_start", 2), ("progress", 3), ("tool_call", 4)]
    first.ws.transport.abort()  # a drop, no close frame: the session detaches

    again = await connect(server.url(), secret=None, expect_connected=False, keep_seq=True)
    resume = {"type": "resume", "session_id": connected["session_id"], "last_seq": 2, "secret": SECRET}
    await again.send({**resume, "resume_token": connected["resume_token"]})
    assert (await again.recv())["resumed"] is True
    frames = await again.until("stream_end")
    assert [f["type"] for f in frames[:3]] == ["progress", "tool_call", "tool_result"]
    assert frames[0]["seq"] == 3 and frames[0]["stage"] == "thinking"
    assert frames[2]["result"] == {"words": 3}
    assert frames[-1]["full_response"] == "one two three"
