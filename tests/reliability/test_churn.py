"""Churn: thousands of connect / auth / message / disconnect cycles, many of them abrupt.

Afterwards nothing of them may remain: no connection, no session, no agent task, no
open socket, and the server's memory back near where it started. Sessions whose
connection dropped stay resumable for ``resume_window``, kept short here, and must
be gone once it has passed.
"""

from __future__ import annotations

import asyncio
import gc
import time
import tracemalloc
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from aiohttp import web

import connic
from conftest import SECRET, StartServer, make_config

from .conftest import Proc, connic_tasks, eventually, kib, report, runtime, scrape
from .rawws import RawWS, close_frame, connect_tcp, open_raw

CONCURRENCY = 25
SLOW = {"type": "message", "payload": {"message": "a b c d e f g h i j k l", "agent": "slow"}}
# Cancelled at its first chunk: long (4 s) so that a loaded machine cannot finish it before the
# cancel lands; being cancelled, it costs no more time than SLOW.
LONG = {"type": "message", "payload": {"message": " ".join(["word"] * 200), "agent": "slow"}}
AGENTS = {"assistant": {"use": "echo"}, "slow": {"use": "echo", "delay": 0.02}}
RESUME_WINDOW = 0.5


async def _auth(ws: RawWS) -> None:
    await ws.send_json({"secret": SECRET})
    assert (await ws.recv())["type"] == "connected"


async def normal(ws: RawWS) -> None:
    await ws.send_json({"message": "hello churn"})
    assert (await ws.until("stream_end"))[-1]["full_response"] == "hello churn"
    await ws.send_raw(close_frame(1000))
    assert (await ws.closed())[0] == 1000
    await ws.aclose()


async def reset_mid_stream(ws: RawWS) -> None:
    await ws.send_json(SLOW)
    await ws.until("stream_chunk")
    ws.reset()


async def reset_before_ack(ws: RawWS) -> None:
    await ws.send_json({"message": "gone before the ack"})
    ws.reset()


async def fin_mid_stream(ws: RawWS) -> None:
    await ws.send_json(SLOW)
    await ws.until("stream_chunk")
    await ws.aclose()  # FIN, no close frame


async def close_frame_mid_stream(ws: RawWS) -> None:
    await ws.send_json(SLOW)
    await ws.until("stream_chunk")
    await ws.send_raw(close_frame(1000))
    code, _, _ = await ws.closed()
    assert code == 1000
    await ws.aclose()


async def cancel_then_reset(ws: RawWS) -> None:
    await ws.send_json({**LONG, "id": "c"})
    await ws.until("stream_chunk")
    await ws.send_json({"type": "cancel", "id": "c"})
    end = (await ws.until("stream_end"))[-1]
    assert end["finish_reason"] == "cancelled"
    ws.reset()


# (name, authenticate first, action)
KINDS: list[tuple[str, bool, Callable[[RawWS], Awaitable[None]]]] = [
    ("normal", True, normal),
    ("reset mid-stream", True, reset_mid_stream),
    ("reset before ack", True, reset_before_ack),
    ("FIN mid-stream", True, fin_mid_stream),
    ("close frame mid-stream", True, close_frame_mid_stream),
    ("cancel then reset", True, cancel_then_reset),
    ("reset before auth", False, lambda ws: _reset(ws)),
]
HANDSHAKE_RESETS = 1  # one more kind: reset in the middle of the HTTP upgrade


async def _reset(ws: RawWS) -> None:
    ws.reset()


async def reset_during_upgrade(port: int) -> None:
    reader, writer = await connect_tcp("127.0.0.1", port)
    writer.write(b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n")
    await writer.drain()
    RawWS(reader, writer).reset()


async def churn(port: int, cycles: int) -> Counter[str]:
    """Run ``cycles`` cycles, CONCURRENCY at a time, rotating through every kind."""
    done: Counter[str] = Counter()
    slots = asyncio.Semaphore(CONCURRENCY)
    kinds = len(KINDS) + HANDSHAKE_RESETS

    async def cycle(i: int) -> None:
        async with slots, asyncio.timeout(10):
            if i % kinds == len(KINDS):
                await reset_during_upgrade(port)
                done["reset during upgrade"] += 1
                return
            name, auth, action = KINDS[i % kinds]
            ws = await open_raw(port)
            if auth:
                await _auth(ws)
            await action(ws)
            done[name] += 1

    await asyncio.gather(*(cycle(i) for i in range(cycles)))
    return done


IN_PROCESS_CYCLES = 4000


async def test_churn_leaves_nothing_behind(start_server: StartServer) -> None:
    server = await start_server(make_config({"resume_window": RESUME_WINDOW}, agents=AGENTS))
    port = int(server.server.port)
    app = server.server.app
    gc.collect()
    before = _alive()  # what tests run earlier in this process left (pytest-xdist runs several files in one)
    started = time.monotonic()
    done = await churn(port, IN_PROCESS_CYCLES)
    elapsed = time.monotonic() - started
    assert sum(done.values()) == IN_PROCESS_CYCLES
    report("churn (in-process): cycles", f"{IN_PROCESS_CYCLES} in {elapsed:.1f} s, {dict(done)}")

    rt = runtime(app)
    transport = rt.transports[0]
    await eventually(lambda: not (transport.connections or connic_tasks() or rt.gate.total or len(rt.store)))
    settled = time.monotonic() - started - elapsed
    report("churn (in-process): time for the server to settle after the last cycle", f"{settled:.2f} s")
    assert transport.connections == set()
    assert connic_tasks() == []
    assert rt.gate.total == 0 and not rt.gate.per_ip
    assert len(rt.store) == 0
    _assert_none_more(before)  # freed as they ended (test_closed_sessions_are_freed_by_refcounting_alone)
    aiohttp_server = server.server.runner.server  # type: ignore[union-attr]
    assert aiohttp_server is not None and aiohttp_server.connections == []

    metrics = await scrape(server.http)
    assert metrics['connic_connections_open{connector="/ws"}'] == 0
    assert metrics['connic_sessions_open{connector="/ws"}'] == 0
    upgrades = IN_PROCESS_CYCLES - done["reset during upgrade"]
    assert metrics['connic_connections_total{connector="/ws"}'] == upgrades
    assert metrics['connic_sessions_total{connector="/ws"}'] == upgrades - done["reset before auth"]
    closes = sum(v for k, v in metrics.items() if k.startswith("connic_closes_total{"))
    assert closes == upgrades
    # The server still answers.
    ws = await open_raw(port)
    await _auth(ws)
    await normal(ws)


SUBPROCESS_WARMUP = 2000  # the first cycles fill the allocator's free lists and caches
SUBPROCESS_CYCLES = 4000
RSS_GROWTH_BOUND_KIB = 6 * 1024  # over the post-warm-up RSS; measured growth is in docs/reliability.md
SERVER_TOML = """
[agents.assistant]
use = "echo"

[agents.slow]
use = "echo"
delay = 0.02

[[connectors]]
secrets = ["test-secret"]
resume_window = 0.5
"""


async def settle(server: Proc, sockets_idle: int) -> dict[str, float]:
    """Wait (bounded) until the server has closed every churn connection; the last scrape."""
    deadline = time.monotonic() + 10
    while True:
        metrics = await scrape(server.http)
        busy = (
            metrics['connic_connections_open{connector="/ws"}']
            or metrics['connic_sessions_open{connector="/ws"}']
            or server.sockets() > sockets_idle + 1
        )
        if not busy or time.monotonic() > deadline:
            return metrics
        await asyncio.sleep(0.05)


async def test_churn_memory_returns_near_its_start(run_cli: Callable[..., Proc]) -> None:
    server = run_cli(SERVER_TOML, "--log-level", "WARNING")
    sockets_idle = server.sockets()
    fresh = server.rss_kib()
    await churn(server.port, SUBPROCESS_WARMUP)
    await settle(server, sockets_idle)
    before = server.rss_kib()
    started = time.monotonic()
    done = await churn(server.port, SUBPROCESS_CYCLES)
    elapsed = time.monotonic() - started
    assert sum(done.values()) == SUBPROCESS_CYCLES
    metrics = await settle(server, sockets_idle)
    after = server.rss_kib()
    report(
        "churn (subprocess): RSS",
        f"{kib(fresh)} fresh, {kib(before)} after {SUBPROCESS_WARMUP} warm-up cycles, "
        f"{kib(after)} after {SUBPROCESS_CYCLES} more "
        f"({(after - before) / 1024:+.1f} MiB; {elapsed:.1f} s)",
    )
    assert metrics['connic_connections_open{connector="/ws"}'] == 0
    assert metrics['connic_sessions_open{connector="/ws"}'] == 0
    # Only the listening socket(s) and the metrics scrape's own connection remain.
    assert server.sockets() <= sockets_idle + 1
    assert after - before < RSS_GROWTH_BOUND_KIB, (before, after)
    assert "Traceback" not in server.output, server.output[-3000:]


# --- freed by reference counting alone ------------------------------------------------------


def _alive() -> tuple[int, int, int]:
    """Connection, ChatSession and _Message objects in memory, counted without running the cyclic collector."""
    from connic.message import Message as _Message
    from connic.session import ChatSession
    from connic.transports.ws_connection import Connection

    counts = Counter(type(o) for o in gc.get_objects())
    return counts[Connection], counts[ChatSession], counts[_Message]


def _assert_none_more(before: tuple[int, int, int], why: str = "") -> None:
    """No more Connection, ChatSession or _Message objects are in memory than ``before`` (:func:`_alive`).

    Fewer may be: what an earlier test in this process left may go meanwhile.
    """
    now = _alive()
    assert all(n <= b for n, b in zip(now, before, strict=True)), (why, now, before)


BIG = "h" * 200_000  # five turns of it: a session history of 2 MB (user messages and echoes)
FREED_AGENTS = {"assistant": {"use": "echo"}, "other": {"use": "echo"}, "slow": {"use": "echo", "delay": 0.02}}


async def _five_big_turns(ws: RawWS) -> None:
    for i in range(5):
        await ws.send_json({"id": i, "message": BIG, "agent": "assistant"})
        await ws.until("stream_end")


async def _close_normally(ws: RawWS) -> None:
    await ws.send_raw(close_frame(1000))
    await ws.closed()


async def _both_agents_then_close(ws: RawWS) -> None:
    await ws.send_json({"message": "to both agents"})
    ends = 0
    while ends < 3:
        ends += (await ws.recv())["type"] == "stream_end"
    await _close_normally(ws)


async def _cancel_then_close(ws: RawWS) -> None:
    await ws.send_json({**SLOW, "id": "c"})
    await ws.until("stream_chunk")
    await ws.send_json({"type": "cancel", "id": "c"})
    await ws.until("stream_end")
    await _close_normally(ws)


async def _fin_mid_stream(ws: RawWS) -> None:
    await ws.send_json(SLOW)
    await ws.until("stream_chunk")
    await ws.aclose()


async def _over_the_message_limit(ws: RawWS) -> None:
    for _ in range(2):
        await ws.send_json({"message": "one more", "agent": "assistant"})
    assert (await ws.closed())[0] == 4009


async def _reset_while_all_agents_answer(ws: RawWS) -> None:
    await ws.send_json({"message": "a b c d e f g h i j k l"})  # every agent: a task each
    await ws.until("stream_chunk")
    ws.reset()


ENDINGS: dict[str, Callable[[RawWS], Awaitable[None]]] = {
    "close frame": _close_normally,
    "reset mid-stream": reset_mid_stream,
    "reset while all agents answer": _reset_while_all_agents_answer,
    "reset before the ack": reset_before_ack,
    "FIN mid-stream": _fin_mid_stream,
    "all agents, then close": _both_agents_then_close,
    "cancel, then close": _cancel_then_close,
    "message limit (4009)": _over_the_message_limit,
}


@pytest.fixture(params=[False, True], ids=["connic run", "handler_cancellation"])
async def freed_server(request: pytest.FixtureRequest) -> AsyncIterator[tuple[web.Application, int]]:
    """A server as ``connic run`` makes it, or with aiohttp's handler_cancellation on (as aiohttp's TestServer)."""
    # Sessions whose connection dropped stay resumable for resume_window, then end.
    app = connic.create_app(make_config({"max_messages": 6, "resume_window": 0.2}, agents=FREED_AGENTS))
    runner = web.AppRunner(app, handler_cancellation=request.param, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    yield app, runner.addresses[0][1]
    await runner.cleanup()


async def test_closed_sessions_are_freed_by_refcounting_alone(freed_server: tuple[web.Application, int]) -> None:
    """With the cyclic collector off, a session (and its history) is freed as soon as it ends.

    No reference cycle may hold a Connection or a session: not a callback, a task,
    a closure, an exception's traceback or a message. A cycle would keep the
    session's whole history until a full collection.
    """
    app, port = freed_server
    transport = runtime(app).transports[0]
    store = runtime(app).store
    gc.collect()
    gc.disable()
    tracemalloc.start()
    try:
        before = _alive()  # what tests run earlier in this process left (pytest-xdist runs several files in one)
        start = tracemalloc.get_traced_memory()[0]
        for name, ending in ENDINGS.items():
            ws = await open_raw(port)
            await _auth(ws)
            await _five_big_turns(ws)
            await ending(ws)
            await ws.aclose()
            assert await eventually(lambda: not transport.connections and not connic_tasks() and not len(store))
            await asyncio.sleep(0.05)  # the handler's own task ends after the connection's cleanup
            _assert_none_more(before, name)
        # A failed authentication, and a client that goes before authenticating.
        ws = await open_raw(port)
        await ws.send_json({"secret": "wrong"})
        assert (await ws.closed())[0] == 4001
        await ws.aclose()
        ws = await open_raw(port)
        ws.reset()
        assert await eventually(lambda: not transport.connections)
        await asyncio.sleep(0.05)
        _assert_none_more(before)
        grown = tracemalloc.get_traced_memory()[0] - start
    finally:
        tracemalloc.stop()
        gc.enable()
    sessions = len(ENDINGS)
    report(
        "churn: memory kept after closing sessions, cyclic collector off",
        f"{grown / 1024:+.0f} KiB after {sessions} sessions of {2 * 5 * len(BIG) / 1e6:.0f} MB history each",
    )
    assert grown < 2 * 5 * len(BIG) / 2  # less than half of one session's history
    ws = await open_raw(port)
    await _auth(ws)
    await ws.send_json({"message": "still here", "agent": "assistant"})
    assert (await ws.until("stream_end"))[-1]["full_response"] == "still here"
