"""PROTOCOL.md section 6: one test per row of the error table (the rest live beside their features)."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from conftest import Connect, StartServer, make_config
from helpers import test_registry

ONE_MESSAGE = ["ack", "stream_start", "stream_chunk", "stream_end"]


async def assert_still_open(client) -> None:  # type: ignore[no-untyped-def]
    frames = await client.reply({"message": "ok"})
    assert [f["type"] for f in frames] == ONE_MESSAGE


@pytest.mark.parametrize("text", ["not json", "{", "[1, 2]", '"a string"', "42", "null", "\u00e9"])
async def test_invalid_json(server, connect: Connect, text: str) -> None:
    client = await connect(server.url())
    await client.send(text)
    frame = await client.recv()
    assert frame["type"] == "error" and frame["code"] == "invalid_json" and frame["id"] is None
    assert frame["message"]
    await assert_still_open(client)


@pytest.mark.parametrize(
    ("frame", "echoed_id"),
    [
        ({"type": "message", "id": "m", "payload": {"message": 5}}, "m"),
        ({"type": "message", "id": "m", "payload": {}}, "m"),
        ({"type": "message", "payload": "text"}, None),
        ({"type": "message"}, None),
        ({"message": None}, None),
        ({"message": "x", "id": 1.5}, None),
        ({"message": "x", "id": True}, None),
        ({"message": "x", "id": ["a"]}, None),
        ({"message": "x", "id": "i" * 300}, None),
        ({"message": "x", "id": "c", "context": "nope"}, "c"),
        ({"message": "x", "id": "f", "files": "nope"}, "f"),
        ({"message": "x", "id": "f", "files": [{"name": "a", "mime_type": "text/plain", "data": "%%%"}]}, "f"),
        ({"message": "x", "id": "f", "files": [{"name": "a", "data": "aGk="}]}, "f"),
        ({"message": "x", "agent": 3}, None),
        ({"type": "cancel"}, None),
        ({"type": "cancel", "id": None}, None),
        ({}, None),
    ],
)
async def test_invalid_message(server, connect: Connect, frame: dict, echoed_id: str | None) -> None:
    client = await connect(server.url())
    await client.send(frame)
    error = await client.recv()
    assert error["type"] == "error" and error["code"] == "invalid_message", error
    assert error["id"] == echoed_id
    await assert_still_open(client)


@pytest.mark.parametrize("kind", ["nonsense", "", 5, None.__class__.__name__, ["message"]])
async def test_unknown_type(server, connect: Connect, kind: object) -> None:
    client = await connect(server.url())
    await client.send({"type": kind, "message": "x"})
    error = await client.recv()
    assert error["type"] == "error" and error["code"] == "unknown_type"
    await assert_still_open(client)


async def test_unknown_fields_are_ignored(server, connect: Connect) -> None:
    client = await connect(server.url())
    frames = await client.reply({"message": "x", "extra": {"deep": [1]}, "payload_version": 3})
    assert [f["type"] for f in frames] == ONE_MESSAGE


async def test_unsupported_binary_frame(server, connect: Connect) -> None:
    client = await connect(server.url())
    await client.send(b'{"message": "binary"}')
    error = await client.recv()
    assert error["code"] == "unsupported_frame"
    await assert_still_open(client)


async def test_queue_full(start_server: StartServer, connect: Connect) -> None:
    server = await start_server(
        make_config({"max_queued": 2}, {"s": {"use": "slow", "seconds": 30}}), registry=test_registry()
    )
    client = await connect(server.url())
    await client.send({"id": 0, "message": "in flight"})
    await client.until("stream_chunk")
    for i in (1, 2, 3):
        await client.send({"id": i, "message": "queued"})
    frames = [await client.recv() for _ in range(3)]
    assert frames[:2] == [
        {"type": "ack", "id": 1, "message_number": 2},
        {"type": "ack", "id": 2, "message_number": 3},
    ]
    assert frames[2]["type"] == "error" and frames[2]["code"] == "queue_full" and frames[2]["id"] == 3
    await client.send({"type": "ping"})
    assert (await client.recv()) == {"type": "pong"}


async def test_message_too_large_closes_1009(start_server: StartServer, connect: Connect) -> None:
    server = await start_server(make_config({"max_frame_bytes": 1000}))
    client = await connect(server.url())
    await assert_still_open(client)
    await client.send({"message": "x" * 2000})
    code, frames = await client.closed()
    assert [f["code"] for f in frames if f["type"] == "error"] == ["message_too_large"]
    assert code == 1009


async def test_slow_consumer_closes_4010_and_others_carry_on(start_server: StartServer, connect: Connect) -> None:
    server = await start_server(make_config({"send_queue": 8, "send_timeout": 0.5, "max_frame_bytes": 4_000_000}))
    # max_queue=1 and a small read limit: the client stops reading, so TCP backpressure reaches the server.
    slow = await connect(server.url(), max_queue=1)
    other = await connect(server.url())
    await slow.send({"message": "word " * 100_000})
    await asyncio.sleep(0.2)
    frames = await other.reply({"message": "unaffected"})
    assert frames[-1]["full_response"] == "unaffected"
    # The client still does not read; the server gives up on it. What the client sees later
    # depends on whether it reads before the socket is dropped (close frame 4010, or a reset).
    await asyncio.sleep(3)
    code, frames = await slow.closed(timeout=20)
    assert code in (4010, 1006)
    assert len(frames) < 100_000  # closed before the whole reply was sent
    async with aiohttp.ClientSession() as http, http.get(server.http + "/metrics") as response:
        text = await response.text()
    assert 'connic_slow_consumer_closes_total{connector="/ws"} 1' in text
    assert 'connic_closes_total{code="4010",connector="/ws"} 1' in text
