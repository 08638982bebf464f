"""PROTOCOL.md sections 4 and 5: session limits, keepalive and cancel."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp

from conftest import SECRET, Connect, StartServer, make_config
from helpers import test_registry


async def test_message_limit_finishes_in_flight_then_closes_4009(start_server: StartServer, connect: Connect) -> None:
    server = await start_server(make_config({"max_messages": 2}, {"e": {"use": "echo", "delay": 0.02}}))
    client = await connect(server.url())
    assert client.connected["max_messages"] == 2
    await client.send({"id": "m1", "message": "a b c"})
    await client.send({"id": "m2", "message": "d e f"})
    await client.send({"id": "m3", "message": "over"})
    code, frames = await client.closed()
    kinds = [(f["type"], f["id"]) for f in frames]
    assert ("error", "m3") in kinds
    error = next(f for f in frames if f["type"] == "error")
    assert error["code"] == "message_limit_reached"
    ends = [f for f in frames if f["type"] == "stream_end"]
    assert [e["full_response"] for e in ends] == ["a b c", "d e f"]
    assert code == 4009
    assert client.ws.close_reason == "message_limit_reached"


async def test_session_expires_after_idle_timeout(start_server: StartServer, connect: Connect) -> None:
    server = await start_server(make_config({"session_timeout": 0.5}))
    client = await connect(server.url())
    assert client.connected["session_timeout"] == 0.5
    started = time.monotonic()
    await client.send({"type": "ping"})  # app-level pings are not activity
    assert (await client.recv()) == {"type": "pong"}
    code, frames = await client.closed()
    assert [f["code"] for f in frames] == ["session_expired"]
    assert code == 4008
    assert time.monotonic() - started < 3


async def test_messages_keep_the_session_alive(start_server: StartServer, connect: Connect) -> None:
    server = await start_server(make_config({"session_timeout": 0.4}))
    client = await connect(server.url())
    for _ in range(4):
        await asyncio.sleep(0.2)
        frames = await client.reply({"message": "still here"})
        assert frames[-1]["type"] == "stream_end"
    code, frames = await client.closed()
    assert code == 4008


async def test_reply_in_flight_is_not_idle(start_server: StartServer, connect: Connect) -> None:
    server = await start_server(make_config({"session_timeout": 0.3}, {"e": {"use": "echo", "delay": 0.15}}))
    client = await connect(server.url())
    frames = await client.reply({"message": "one two three four five six"})  # about 0.9 s of streaming
    assert frames[-1]["full_response"] == "one two three four five six"
    code, _ = await client.closed()
    assert code == 4008


async def test_server_pings_and_client_pongs_keep_connection(start_server: StartServer, connect: Connect) -> None:
    server = await start_server(make_config({"heartbeat": 0.1}))
    client = await connect(server.url())
    await asyncio.sleep(0.6)
    frames = await client.reply({"message": "alive"})
    assert frames[-1]["full_response"] == "alive"


async def test_client_that_does_not_pong_is_closed(start_server: StartServer) -> None:
    server = await start_server(make_config({"heartbeat": 0.2}))
    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(server.url(), autoping=False)
        await ws.send_json({"secret": SECRET})
        started = time.monotonic()
        got_ping = False
        while True:
            msg = await asyncio.wait_for(ws.receive(), 5)
            if msg.type is aiohttp.WSMsgType.PING:
                got_ping = True  # and deliberately no pong
            elif msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING):
                break
        assert got_ping
        assert time.monotonic() - started < 2


async def test_cancel_in_flight_streaming(start_server: StartServer, connect: Connect) -> None:
    server = await start_server(make_config(agents={"e": {"use": "echo", "delay": 0.05}}))
    client = await connect(server.url())
    await client.send({"id": "long", "message": " ".join(["word"] * 100)})
    await client.until("stream_chunk")
    await client.send({"type": "cancel", "id": "long"})
    frames = await client.until("stream_end")
    end = frames[-1]
    assert end["finish_reason"] == "cancelled"
    assert end["full_response"].startswith("word ")
    assert len(end["full_response"].split()) < 100
    assert end["token_usage"] == {"prompt_tokens": 0, "candidates_tokens": 0}
    frames = await client.reply({"message": "next"})
    assert frames[-1]["full_response"] == "next"


async def test_cancel_in_flight_non_streaming(start_server: StartServer, connect: Connect) -> None:
    server = await start_server(
        make_config({"streaming": False}, {"s": {"use": "slow", "seconds": 30}}), registry=test_registry()
    )
    client = await connect(server.url())
    await client.send({"id": 5, "message": "x"})
    assert (await client.recv())["type"] == "ack"
    await asyncio.sleep(0.1)
    await client.send({"type": "cancel", "id": 5})
    frame = await client.recv()
    assert frame["type"] == "response" and frame["finish_reason"] == "cancelled"
    assert frame["response"] == "started "


async def test_cancel_queued_drops_it(start_server: StartServer, connect: Connect) -> None:
    server = await start_server(make_config(agents={"e": {"use": "echo", "delay": 0.05}}))
    client = await connect(server.url())
    await client.send({"id": "a", "message": "one two three"})
    await client.send({"id": "b", "message": "dropped"})
    await client.send({"id": "c", "message": "kept"})
    await client.send({"type": "cancel", "id": "b"})
    ends: list[dict] = []
    seen_ids = set()
    while len(ends) < 2:
        frame = await client.recv()
        seen_ids.add((frame["type"], frame["id"]))
        if frame["type"] == "stream_end":
            ends.append(frame)
    assert [e["id"] for e in ends] == ["a", "c"]
    assert all(e["finish_reason"] == "stop" for e in ends)
    assert ("ack", "b") in seen_ids and ("stream_start", "b") not in seen_ids


async def test_cancel_drops_every_queued_message_with_its_id(start_server: StartServer, connect: Connect) -> None:
    # Client ids need not be unique (docs/protocol.md, "Cancelling"): with no message of that id
    # in flight, a cancel drops every queued one that has it, not only the first.
    server = await start_server(make_config(agents={"e": {"use": "echo", "delay": 0.05}}))
    client = await connect(server.url())
    await client.send({"id": "a", "message": "one two three"})
    await client.send({"id": "x", "message": "dropped"})
    await client.send({"id": "c", "message": "kept"})
    await client.send({"id": "x", "message": "dropped too"})
    await client.send({"type": "cancel", "id": "x"})
    await client.send({"id": "d", "message": "last"})
    frames: list[dict] = []
    while not (frames and frames[-1]["type"] == "stream_end" and frames[-1]["id"] == "d"):
        frames.append(await client.recv())
    ends = [f["id"] for f in frames if f["type"] == "stream_end"]
    assert ends == ["a", "c", "d"], ends
    assert [f["type"] for f in frames if f["id"] == "x"] == ["ack", "ack"]


async def test_cancel_unknown_or_finished_is_not_found(server, connect: Connect) -> None:
    client = await connect(server.url())
    await client.reply({"id": "done", "message": "x"})
    for message_id in ("done", "never", 12):
        await client.send({"type": "cancel", "id": message_id})
        frame = await client.recv()
        assert frame["type"] == "error" and frame["code"] == "not_found" and frame["id"] == message_id


async def test_agent_timeout(start_server: StartServer, connect: Connect) -> None:
    server = await start_server(
        make_config({"agent_timeout": 0.2}, {"s": {"use": "slow", "seconds": 30}}), registry=test_registry()
    )
    client = await connect(server.url())
    frames = await client.reply({"id": "t", "message": "x"})
    assert frames[-1]["type"] == "error"
    assert frames[-1]["code"] == "agent_timeout" and frames[-1]["id"] == "t" and frames[-1]["agent"] == "s"
    frames = await client.reply({"message": "again"})
    assert frames[-1]["code"] == "agent_timeout"  # the session goes on


async def test_close_ends_session_and_cancels_agents(start_server: StartServer, connect: Connect) -> None:
    server = await start_server(make_config(agents={"s": {"use": "slow", "seconds": 30}}), registry=test_registry())
    client = await connect(server.url())
    await client.send({"message": "x"})
    await client.until("stream_chunk")
    from connic import RUNTIME

    transport = server.server.app[RUNTIME].transports[0]
    assert len(transport.connections) == 1  # type: ignore[attr-defined]
    await client.ws.close()
    for _ in range(50):
        if not transport.connections:  # type: ignore[attr-defined]
            break
        await asyncio.sleep(0.02)
    assert not transport.connections  # type: ignore[attr-defined]
    leftover = [t for t in asyncio.all_tasks() if "Slow.respond" in repr(t.get_coro())]
    assert leftover == []


async def test_reading_goes_on_while_an_agent_waits_and_after(start_server: StartServer, connect: Connect) -> None:
    """Quick answers are given as they are read; a waiting agent gets a reader beside it, then not."""
    agents = {"e": {"use": "echo"}, "s": {"use": "slow", "seconds": 0.3}}
    server = await start_server(make_config(agents=agents), registry=test_registry())
    client = await connect(server.url())
    for round_ in range(3):
        # A waiting agent, then frames behind it: a ping is answered and a quick message
        # acked while the agent still waits; the quick message is answered after it.
        await client.send({"id": f"slow-{round_}", "message": "x", "agent": "s"})
        await client.send({"type": "ping"})
        await client.send({"id": f"quick-{round_}", "message": "a b", "agent": "e"})
        await client.send({"id": f"gone-{round_}", "message": "never", "agent": "e"})
        await client.send({"type": "cancel", "id": f"gone-{round_}"})
        seen: list[tuple[str, Any]] = []
        while ("stream_end", f"quick-{round_}") not in seen:
            frame = await client.recv()
            seen.append((frame["type"], frame.get("id")))
        assert seen.index(("pong", None)) < seen.index(("stream_end", f"slow-{round_}"))
        assert seen.index(("ack", f"quick-{round_}")) < seen.index(("stream_end", f"slow-{round_}"))
        assert seen.index(("stream_end", f"slow-{round_}")) < seen.index(("stream_start", f"quick-{round_}"))
        assert ("ack", f"gone-{round_}") in seen and ("stream_start", f"gone-{round_}") not in seen
        # Back to quick answers, pipelined: all in order, none lost.
        for i in range(20):
            await client.send({"id": f"{round_}-{i}", "message": f"m{i}", "agent": "e"})
        ends = []
        while len(ends) < 20:
            frame = await client.recv()
            if frame["type"] == "stream_end":
                ends.append(frame)
        assert [e["full_response"] for e in ends] == [f"m{i}" for i in range(20)]


async def test_agent_timeouts_of_staggered_turns(start_server: StartServer, connect: Connect) -> None:
    """All turns share one timer: each still times out agent_timeout after its own start, no sooner."""
    agents = {"s": {"use": "slow", "seconds": 30}, "e": {"use": "echo"}}
    server = await start_server(make_config({"agent_timeout": 0.4}, agents), registry=test_registry())
    clients = [await connect(server.url()) for _ in range(3)]

    async def timed(index: int) -> float:
        await asyncio.sleep(0.15 * index)
        client = clients[index]
        await client.reply({"message": "quick", "agent": "e"})  # turns that end in time leave no trace
        sent = time.monotonic()
        frames = await client.reply({"id": index, "message": "x", "agent": "s"})
        assert frames[-1]["type"] == "error" and frames[-1]["code"] == "agent_timeout", frames
        return time.monotonic() - sent

    elapsed = await asyncio.gather(*(timed(i) for i in range(3)))
    assert all(0.38 <= e < 2.0 for e in elapsed), elapsed
