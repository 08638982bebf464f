"""What a resume following another process's reply keeps of the cancels it passes to that process.

A resume on process B that follows A's reply passes each ``cancel`` its client sends to A
(PROTOCOL.md §5), and keeps what a held cancel of the same id needs to be settled at the
takeover (:class:`connic.transports.ws_held.Doubts`): how many of each id went before it. It
used to keep every cancel passed, for as long as the follow lasted, so a client cancelling
the same id again and again grew the follow's memory with each one. Two in-process apps share
one real ``redis-server``; the client is a real ``websockets`` client on loopback, and the
memory is read with :mod:`tracemalloc` (allocations made in ``ws_held.py`` and still alive).
"""

from __future__ import annotations

import tracemalloc
from collections.abc import Iterator

import pytest
from redis_server import (
    RedisServer,
    redis_server_fixture,  # noqa: F401  (a fixture)
    with_store,
)
from resume_helpers import Clients, Conn, ResumeSession, clients_fixture, words  # noqa: F401  (a fixture)

from conftest import StartServer, make_config
from connic.transports import ws_held

pytest.importorskip("redis.asyncio", reason="redis-py is not installed (pip install 'connic[redis]')")


@pytest.fixture
def traced() -> Iterator[None]:
    tracemalloc.start()
    try:
        yield
    finally:
        tracemalloc.stop()


def kept() -> int:
    """Bytes allocated in ``ws_held.py`` and alive now."""
    snapshot = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(True, ws_held.__file__)])
    return sum(stat.size for stat in snapshot.statistics("filename"))


def not_found(conn: Conn) -> int:
    return sum(1 for frame in conn.frames if frame.get("code") == "not_found")


async def cancelled(conn: Conn, count: int) -> None:
    """Send ``count`` cancels of ``m9`` (no message has it) and wait for their ``not_found`` (from A, followed)."""
    answered = not_found(conn) + count
    for _ in range(count):
        await conn.send({"type": "cancel", "id": "m9"})
    await conn.until(lambda _: not_found(conn) >= answered)


async def test_a_follow_keeps_no_more_for_each_cancel_of_an_id_passed_again(
    redis_server: RedisServer, start_server: StartServer, clients: Clients, traced: None
) -> None:
    start = with_store(start_server, redis_server.url)
    connector = {"on_disconnect": "continue", "producer_timeout": 10}
    agents = {"assistant": {"use": "echo", "delay": 0.02}}
    a, b = await start(make_config(connector, agents)), await start(make_config(connector, agents))
    session = ResumeSession(clients, a.url())
    conn = await session.start()
    await conn.send({"type": "message", "id": "m1", "payload": {"message": words(3000)}})  # 60 s long
    await conn.until(lambda f: f["type"] == "stream_chunk")
    session.drop()
    conn = await session.resume(url=b.url())
    assert conn.connected["resumed"] is True
    await conn.until(lambda f: f["type"] == "stream_chunk")  # B follows A's reply

    await cancelled(conn, 20)
    first = kept()
    await cancelled(conn, 200)
    grown = kept() - first
    # It was a list entry per cancel (some 110 bytes each, 22 kB here); now one count per id.
    assert grown < 2_000, grown
    assert session.transcript.end("m1", "assistant") is None, "m1 ended: B no longer followed it"
    await conn.send({"type": "cancel", "id": "m1"})
    await conn.until_ended({"m1": ["assistant"]}, timeout=30)
