"""Limits that hold across the fleet: two ``python -m connic run`` processes sharing one ``redis-server``.

``max_messages`` and ``rate_limit`` follow a session that hops from A to B (even when A
is killed), and ``max_connections_per_ip`` counts the connections of both processes;
those of a killed process stop counting once their lease runs out. Real ``websockets``
clients on loopback.
"""

from __future__ import annotations

import asyncio
import itertools
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import websockets
from redis_server import (
    RedisServer,
    flush,
    redis_server_fixture,  # noqa: F401  (a fixture)
    store_plugin_env,
)
from resume_helpers import (
    Clients,
    Conn,
    ResumeSession,
    clients_fixture,  # noqa: F401  (a fixture)
    words,
)

from conftest import SECRET, CliServer, start_cli


@pytest.fixture
def fleet(tmp_path: Path, redis_server: RedisServer) -> Iterator[Any]:
    """``fleet(connector=..., server=..., store=...)``: a process with those extra TOML lines; killed at the end."""
    env = store_plugin_env(tmp_path / "plugins")
    started: list[CliServer] = []

    async def start(*args: str, connector: str = "", server: str = "", store: str = "") -> CliServer:
        config = tmp_path / f"connic-{len(started)}.toml"
        config.write_text(
            f"[server]\n{server}\n"
            '[agents.assistant]\nuse = "echo"\ndelay = 0.02\n'
            f'[[connectors]]\npath = "/ws"\nsecrets = ["{SECRET}"]\nproducer_timeout = 3\n{connector}\n'
            f'[store]\nuse = "redis"\nurl = "{redis_server.url}"\n{store}\n'
        )
        process = await asyncio.to_thread(start_cli, "--config", str(config), *args, env=env)
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop(signal.SIGKILL if process.proc.poll() is None else signal.SIGTERM)


async def send(conn: Conn, message_id: str, text: str = "hi") -> None:
    await conn.send({"type": "message", "id": message_id, "payload": {"message": text}})


async def answer_to(conn: Conn, message_id: str, timeout: float = 10.0) -> dict[str, Any]:
    """The ack or the error that answers ``message_id`` first."""
    frames = await conn.until(lambda f: f.get("id") == message_id and f["type"] in ("ack", "error"), timeout)
    return frames[-1]


async def chat(conn: Conn, message_id: str, text: str = "hi") -> None:
    await send(conn, message_id, text)
    await conn.until_ended({message_id: ["assistant"]})


async def test_max_messages_holds_for_a_session_that_hops_to_the_other_process(fleet: Any, clients: Clients) -> None:
    a = await fleet(connector="max_messages = 3")
    b = await fleet(connector="max_messages = 3")
    session = ResumeSession(clients, a.url)
    conn = await session.start()
    await chat(conn, "m1")
    await chat(conn, "m2")
    session.drop()
    conn = await session.resume(url=b.url)
    assert conn.connected["resumed"] is True
    await chat(conn, "m3")
    await send(conn, "m4")
    refused = await answer_to(conn, "m4")
    assert refused["type"] == "error" and refused["code"] == "message_limit_reached", refused


async def test_max_messages_counts_the_messages_a_killed_process_had_queued(fleet: Any, clients: Clients) -> None:
    a = await fleet(connector="max_messages = 4")
    b = await fleet(connector="max_messages = 4")
    session = ResumeSession(clients, a.url)
    conn = await session.start()
    await send(conn, "m1", words(500))  # about 10 s: m2 and m3 wait behind it
    await send(conn, "m2")
    await send(conn, "m3")
    assert (await answer_to(conn, "m3"))["message_number"] == 3
    await conn.until(lambda f: f["type"] == "stream_chunk")
    await asyncio.sleep(0.2)  # the batch writer's next round has run
    a.proc.kill()  # kill -9 with two accepted messages waiting
    a.proc.wait(10)
    session.drop()
    conn = await session.resume(url=b.url)
    assert conn.connected["resumed"] is True
    # B takes the session over once A's lease (producer_timeout = 3 s) ran out; m4 is the 4th message.
    await send(conn, "m4")
    ack = await answer_to(conn, "m4", timeout=15)
    assert ack["type"] == "ack" and ack["message_number"] == 4, ack
    await send(conn, "m5")
    refused = await answer_to(conn, "m5", timeout=15)
    assert refused["type"] == "error" and refused["code"] == "message_limit_reached", refused


async def test_rate_limit_holds_for_a_session_that_hops_to_the_other_process(fleet: Any, clients: Clients) -> None:
    limit = "rate_limit = { messages = 2, per = 600 }"  # refills one token every 5 min: none during the test
    a = await fleet(connector=limit)
    b = await fleet(connector=limit)
    session = ResumeSession(clients, a.url)
    conn = await session.start()
    await chat(conn, "m1")
    await chat(conn, "m2")
    session.drop()
    conn = await session.resume(url=b.url)
    assert conn.connected["resumed"] is True
    await send(conn, "m3")
    refused = await answer_to(conn, "m3")
    assert refused["type"] == "error" and refused["code"] == "rate_limited", refused
    assert 0 < refused["retry_after"] <= 300, refused
    session.drop()  # and back on A: still no token
    conn = await session.resume(url=a.url)
    await send(conn, "m4")
    refused = await answer_to(conn, "m4")
    assert refused["type"] == "error" and refused["code"] == "rate_limited", refused


async def open_ws(url: str) -> Any:
    return await websockets.connect(url, open_timeout=10, proxy=None)


async def refused_status(url: str) -> int | None:
    """The HTTP status that refuses a handshake to ``url``, or None if it is accepted (then closed)."""
    try:
        ws = await open_ws(url)
    except websockets.exceptions.InvalidStatus as exc:
        return exc.response.status_code
    await ws.close()
    return None


async def accepted_within(url: str, seconds: float) -> bool:
    """Whether a handshake to ``url`` is accepted within ``seconds`` (tried every 0.2 s)."""
    deadline = time.monotonic() + seconds
    for _ in itertools.count():
        if await refused_status(url) is None:
            return True
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    return False


async def test_max_connections_per_ip_counts_both_processes_and_frees_a_killed_ones_slots(fleet: Any) -> None:
    lease = 2.0
    options = {"server": "max_connections_per_ip = 3", "store": f"connection_lease = {lease}"}
    a = await fleet(**options)
    b = await fleet(**options)
    held = [await open_ws(a.url), await open_ws(a.url), await open_ws(b.url)]
    try:
        # Three open from 127.0.0.1, two of them on A: B refuses a fourth.
        assert await refused_status(b.url) == 429
        assert await refused_status(a.url) == 429
        await held.pop(0).close()  # one of A's closes: its slot frees (counted out in the background)
        assert await accepted_within(b.url, 10)
        a.proc.kill()  # kill -9: A never counts its last connection out
        a.proc.wait(10)
        killed_at = time.monotonic()
        held.append(await open_ws(b.url))  # 3 now: A's dead one and two on B
        # Once A's lease has run out (it renews no more), its slot frees.
        assert await accepted_within(b.url, killed_at + lease + 5 - time.monotonic()), "still counted after its lease"
    finally:
        for ws in held:
            await ws.close()


async def refused_within(url: str, seconds: float) -> bool:
    """Whether a handshake to ``url`` is refused (429) within ``seconds`` (tried every 0.2 s; accepted: closed)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if await refused_status(url) == 429:
            return True
        await asyncio.sleep(0.2)
    return False


async def test_max_connections_per_ip_counts_the_open_connections_again_after_redis_lost_its_data(
    fleet: Any, redis_server: RedisServer
) -> None:
    # Redis restarted without its data (or a FLUSHALL): the sets counting each address's connections
    # were gone, and the renewals only renewed the entries still there (ZADD XX). The connections
    # open on every process counted no more, for as long as they stayed open: an address got as
    # many more as the limit again.
    lease = 2.0
    options = {"server": "max_connections_per_ip = 3", "store": f"connection_lease = {lease}"}
    a = await fleet(**options)
    b = await fleet(**options)
    held = [await open_ws(a.url), await open_ws(a.url), await open_ws(b.url)]
    try:
        assert await refused_status(b.url) == 429
        flush(redis_server.url)
        # Each process finds the loss at its next renewal (every third of a lease) and counts its own in again.
        assert await refused_within(b.url, lease * 5), "the connections open before the loss no longer count"
        assert await refused_status(a.url) == 429
    finally:
        for ws in held:
            await ws.close()
