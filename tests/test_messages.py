"""PROTOCOL.md sections 2 and 3: sending messages and the replies."""

from __future__ import annotations

import asyncio
import base64
import json

import pytest

from conftest import Connect, StartServer, make_config
from helpers import NotAGenerator, test_registry


async def inspect_server(start_server: StartServer, connector: dict | None = None):  # type: ignore[no-untyped-def]
    agents = {"inspect": {"use": "inspect"}}
    return await start_server(make_config(connector, agents), registry=test_registry())


async def test_canonical_message_streams_echo(server, connect: Connect) -> None:
    client = await connect(server.url())
    frames = await client.reply(
        {"type": "message", "id": "msg-001", "payload": {"message": "The weather in New York is sunny."}}
    )
    assert frames[0] == {"type": "ack", "id": "msg-001", "message_number": 1}
    assert frames[1] == {"type": "stream_start", "id": "msg-001", "agent": "assistant"}
    chunks = [f for f in frames if f["type"] == "stream_chunk"]
    assert [c["chunk"] for c in chunks] == ["The ", "weather ", "in ", "New ", "York ", "is ", "sunny."]
    assert all(c["id"] == "msg-001" and c["agent"] == "assistant" for c in chunks)
    end = frames[-1]
    assert end == {
        "type": "stream_end",
        "id": "msg-001",
        "agent": "assistant",
        "full_response": "The weather in New York is sunny.",
        "token_usage": {"prompt_tokens": 7, "candidates_tokens": 7},
        "finish_reason": "stop",
    }


@pytest.mark.parametrize(
    ("frame", "text"),
    [
        ({"message": "Hello!"}, "Hello!"),
        ({"content": "Hi there"}, "Hi there"),
        ({"type": "message", "message": "top level"}, "top level"),
    ],
)
async def test_shorthands(server, connect: Connect, frame: dict, text: str) -> None:
    client = await connect(server.url())
    frames = await client.reply(frame)
    assert frames[-1]["full_response"] == text


async def test_context_files_and_id_reach_the_agent(start_server: StartServer, connect: Connect) -> None:
    server = await inspect_server(start_server)
    client = await connect(server.url())
    data = base64.b64encode(b"\x00\x01hello").decode()
    frames = await client.reply(
        {
            "content": "look",
            "id": 7,
            "context": {"location": "New York", "n": [1, 2]},
            "files": [{"name": "a.bin", "mime_type": "application/octet-stream", "data": data}],
        }
    )
    assert frames[0] == {"type": "ack", "id": 7, "message_number": 1}
    seen = json.loads(frames[-1]["full_response"])
    assert seen["id"] == 7 and seen["number"] == 1 and seen["message"] == "look"
    assert seen["context"] == {"location": "New York", "n": [1, 2]}
    assert seen["files"] == [{"name": "a.bin", "mime_type": "application/octet-stream", "data": "\x00\x01hello"}]
    assert seen["session_id"] == client.connected["session_id"]
    assert seen["agent"] == "inspect"
    assert seen["streaming"] is True


async def test_agent_sees_streaming_off(start_server: StartServer, connect: Connect) -> None:
    server = await inspect_server(start_server, {"streaming": False})
    client = await connect(server.url())
    frames = await client.reply({"message": "look"})
    assert json.loads(frames[-1]["response"])["streaming"] is False


@pytest.mark.parametrize("streaming", [True, False])
@pytest.mark.parametrize("text", ["", "one", "  two words  ", "a\nb\tc  d"])
async def test_echo_text_is_the_message_streamed_or_not(
    start_server: StartServer, connect: Connect, streaming: bool, text: str
) -> None:
    server = await start_server(make_config({"streaming": streaming}))
    client = await connect(server.url())
    frames = await client.reply({"message": text})
    words = len(text.split())
    end = frames[-1]
    assert end["full_response" if streaming else "response"] == text
    assert end["token_usage"] == {"prompt_tokens": words, "candidates_tokens": words}
    if streaming:
        assert "".join(f["chunk"] for f in frames if f["type"] == "stream_chunk") == text


async def test_frame_larger_than_one_read_is_answered_whole(start_server: StartServer, connect: Connect) -> None:
    # The server reads at most 64 KiB of the socket at a time (docs/performance.md):
    # a 300 KB frame takes several reads and still arrives whole, then the next one too.
    server = await start_server(make_config({"streaming": False}))
    from connic import RUNTIME

    client = await connect(server.url())
    text = "".join(f"w{i} " for i in range(60_000))  # about 400 KB
    frames = await client.reply({"message": text})
    assert frames[-1]["response"] == text
    frames = await client.reply({"message": "after"})
    assert frames[-1]["response"] == "after"
    (conn,) = server.server.app[RUNTIME].transports[0].connections  # type: ignore[attr-defined]
    assert conn.writer.transport.max_size == 64 * 1024


async def test_server_assigns_unique_ids(server, connect: Connect) -> None:
    client = await connect(server.url())
    ids = set()
    for _ in range(3):
        frames = await client.reply({"message": "x"})
        frame_ids = {f["id"] for f in frames}
        assert len(frame_ids) == 1
        ids |= frame_ids
    assert len(ids) == 3


async def test_non_streaming_response(start_server: StartServer, connect: Connect) -> None:
    server = await start_server(make_config({"streaming": False}))
    client = await connect(server.url())
    assert client.connected["streaming"] is False
    frames = await client.reply({"type": "message", "id": "m", "payload": {"message": "whole answer"}})
    assert frames == [
        {"type": "ack", "id": "m", "message_number": 1},
        {
            "type": "response",
            "id": "m",
            "agent": "assistant",
            "response": "whole answer",
            "token_usage": {"prompt_tokens": 2, "candidates_tokens": 2},
            "finish_reason": "stop",
        },
    ]


async def test_agent_without_usage_reports_zeros(start_server: StartServer, connect: Connect) -> None:
    server = await start_server(make_config(agents={"n": {"use": "nousage"}}), registry=test_registry())
    client = await connect(server.url())
    frames = await client.reply({"message": "x"})
    assert frames[-1]["full_response"] == "ab"
    assert frames[-1]["token_usage"] == {"prompt_tokens": 0, "candidates_tokens": 0}


async def test_several_agents_answer_concurrently(start_server: StartServer, connect: Connect) -> None:
    agents = {"a": {"use": "echo", "delay": 0.02}, "b": {"use": "echo", "delay": 0.02}}
    server = await start_server(make_config(agents=agents))
    client = await connect(server.url())
    assert client.connected["agents"] == ["a", "b"]
    await client.send({"id": "m1", "message": "one two three four five"})
    frames = []
    ends = 0
    while ends < 2:
        frame = await client.recv()
        frames.append(frame)
        ends += frame["type"] == "stream_end"
    assert [f["type"] for f in frames].count("ack") == 1
    order = [f["agent"] for f in frames if f["type"] == "stream_chunk"]
    # Interleaved: agent b's first chunk comes before agent a's last one.
    assert order.index("b") < len(order) - 1 - order[::-1].index("a")
    for name in ("a", "b"):
        end = next(f for f in frames if f["type"] == "stream_end" and f["agent"] == name)
        chunks = "".join(f["chunk"] for f in frames if f["type"] == "stream_chunk" and f["agent"] == name)
        assert end["full_response"] == chunks == "one two three four five"


async def test_payload_agent_picks_one(start_server: StartServer, connect: Connect) -> None:
    server = await start_server(make_config(agents={"a": {"use": "echo"}, "b": {"use": "echo"}}))
    client = await connect(server.url())
    frames = await client.reply({"type": "message", "payload": {"message": "x", "agent": "b"}})
    assert {f.get("agent") for f in frames[1:]} == {"b"}
    frames = await client.reply({"type": "message", "id": "z", "payload": {"message": "x", "agent": "c"}})
    assert frames == [frames[0]]
    assert frames[0]["type"] == "error" and frames[0]["code"] == "unknown_agent" and frames[0]["id"] == "z"
    frames = await client.reply({"message": "next"})
    assert frames[0]["message_number"] == 2  # the refused message was not counted


async def test_agent_error_keeps_session(start_server: StartServer, connect: Connect) -> None:
    agents = {"fail": {"use": "fail"}, "inspect": {"use": "inspect"}}
    server = await start_server(make_config(agents=agents), registry=test_registry())
    client = await connect(server.url())
    await client.send({"id": "m1", "message": "first"})
    frames = []
    while len([f for f in frames if f["type"] in ("stream_end", "error")]) < 2:
        frames.append(await client.recv())
    error = next(f for f in frames if f["type"] == "error")
    assert error["id"] == "m1" and error["agent"] == "fail" and error["code"] == "agent_error"
    assert "boom" in error["message"]
    assert not any(f["type"] == "stream_end" and f["agent"] == "fail" for f in frames)
    frames = await client.reply({"type": "message", "payload": {"message": "second", "agent": "inspect"}})
    seen = json.loads(frames[-1]["full_response"])
    # The failed agent's partial answer is not in the history; the user message and inspect's answer are.
    assert [(h["role"], h["agent"]) for h in seen["history"]] == [("user", None), ("agent", "inspect")]


async def test_agent_yielding_garbage_is_an_agent_error(start_server: StartServer, connect: Connect) -> None:
    server = await start_server(make_config(agents={"bad": {"use": "badyield"}}), registry=test_registry())
    client = await connect(server.url())
    frames = await client.reply({"message": "x"})
    assert frames[-1]["code"] == "agent_error"
    assert "expected str or connic.Usage" in frames[-1]["message"]


@pytest.mark.parametrize("streaming", [True, False])
async def test_respond_not_an_async_generator_is_an_agent_error_called_once(
    start_server: StartServer, connect: Connect, streaming: bool
) -> None:
    NotAGenerator.calls = 0
    config = make_config({"streaming": streaming}, agents={"plain": {"use": "notagenerator"}})
    server = await start_server(config, registry=test_registry())
    client = await connect(server.url())
    frames = await client.reply({"message": "x"})
    assert frames[-1]["code"] == "agent_error"
    assert "NotAGenerator.respond must be an async generator" in frames[-1]["message"]
    assert NotAGenerator.calls == 1  # respond ran once: its side effects are not repeated
    frames = await client.reply({"message": "again"})
    assert frames[-1]["code"] == "agent_error"
    assert NotAGenerator.calls == 2


async def test_messages_answered_in_order_with_history(start_server: StartServer, connect: Connect) -> None:
    agents = {"inspect": {"use": "inspect"}}
    server = await start_server(make_config(agents=agents), registry=test_registry())
    client = await connect(server.url())
    for text in ("one", "two", "three"):
        await client.send({"message": text})
    acks, answers = [], []
    while len(answers) < 3:
        frame = await client.recv()
        if frame["type"] == "ack":
            acks.append(frame["message_number"])
        elif frame["type"] == "stream_end":
            answers.append(json.loads(frame["full_response"]))
    assert acks == [1, 2, 3]
    assert [a["message"] for a in answers] == ["one", "two", "three"]
    third = answers[2]
    assert [h["text"] for h in third["history"] if h["role"] == "user"] == ["one", "two"]
    assert [h["role"] for h in third["history"]] == ["user", "agent", "user", "agent"]
    assert third["state"] == {"turns": 3}


async def test_ack_is_sent_on_arrival(start_server: StartServer, connect: Connect) -> None:
    server = await start_server(make_config(agents={"slow": {"use": "slow", "seconds": 5}}), registry=test_registry())
    client = await connect(server.url())
    await client.send({"id": 1, "message": "a"})
    await client.until("stream_chunk")
    await client.send({"id": 2, "message": "b"})
    frame = await client.recv(timeout=1)
    assert frame == {"type": "ack", "id": 2, "message_number": 2}


async def test_state_is_private_per_agent(start_server: StartServer, connect: Connect) -> None:
    agents = {"x": {"use": "inspect"}, "y": {"use": "inspect"}}
    server = await start_server(make_config(agents=agents), registry=test_registry())
    client = await connect(server.url())
    await client.reply({"type": "message", "payload": {"message": "1", "agent": "x"}})
    await client.reply({"type": "message", "payload": {"message": "2", "agent": "x"}})
    frames = await client.reply({"type": "message", "payload": {"message": "3", "agent": "y"}})
    assert json.loads(frames[-1]["full_response"])["state"] == {"turns": 1}
    await asyncio.sleep(0)
