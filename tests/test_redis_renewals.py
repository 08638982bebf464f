"""The ``redis`` store's lease renewer keeps up with a lease shorter than those it planned its sleep from.

The renewer renews every lease a process holds every third of the shortest one. It used to
plan that sleep once, from the leases held when it went to sleep: a session made meanwhile
on a connector with a shorter ``producer_timeout`` (or a connection counted in with a
``connection_lease`` shorter than the sessions' leases) waited for the end of that sleep and
its lease ran out first, so another process could claim a session still alive. A real
``python -m connic run`` process and a real ``redis-server``; the test reads each lease's TTL
(PTTL) with its own client, and clients are real ``websockets`` clients on loopback.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from redis_server import (
    RedisServer,
    redis_client_fixture,  # noqa: F401  (a fixture)
    redis_server_fixture,  # noqa: F401  (a fixture)
    store_plugin_env,
)
from resume_helpers import Clients, ResumeSession, clients_fixture, words  # noqa: F401  (a fixture)

from conftest import SECRET, CliServer, start_cli

pytest.importorskip("redis.asyncio", reason="redis-py is not installed (pip install 'connic[redis]')")

LONG = 60.0  # seconds: a lease whose renewer sleeps 20 s between renewals
SHORT = 3.0  # seconds: a lease that runs out long before that sleep ends


@pytest.fixture
def launch(tmp_path: Path, redis_server: RedisServer) -> Iterator[Any]:
    """Start one ``python -m connic run`` process on ``redis_server`` with the given TOML (agent and store added)."""
    env = store_plugin_env(tmp_path / "plugins")
    started: list[CliServer] = []

    async def start(toml: str) -> CliServer:
        config = tmp_path / "connic.toml"
        config.write_text(
            '[agents.assistant]\nuse = "echo"\ndelay = 0.02\n'
            + toml
            + f'[store]\nuse = "redis"\nurl = "{redis_server.url}"\nconnection_lease = {SHORT:g}\n'
        )
        server = await asyncio.to_thread(start_cli, "--config", str(config), env=env)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop(signal.SIGKILL)


def connector(path: str, producer_timeout: float) -> str:
    return f'[[connectors]]\npath = "{path}"\nsecrets = ["{SECRET}"]\nproducer_timeout = {producer_timeout:g}\n'


async def asleep(redis: Any, key: str, lease: float) -> None:
    """Wait until ``key`` (a lease of ``lease`` s) went unrenewed for 2 s: the renewer sleeps a third of it."""
    deadline = time.monotonic() + 30
    while (ttl := await redis.pttl(key)) > (lease - 2) * 1000 or ttl < 0:
        assert ttl != -2, f"{key} is gone"
        assert time.monotonic() < deadline, f"{key} was renewed every second still"
        await asyncio.sleep(0.05)


async def renewed_twice(redis: Any, key: str) -> None:
    """Watch ``key`` until its TTL went up twice (renewed), failing if it lapsed first."""
    renewals = 0
    last = await redis.pttl(key)
    deadline = time.monotonic() + 60  # a bound for a hung test only: the lease lapses far sooner
    while renewals < 2:
        ttl = await redis.pttl(key)
        assert ttl > 0, f"{key} lapsed (PTTL {ttl}) after {renewals} renewal(s): nobody renewed it"
        renewals += ttl > last
        last = ttl
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)


async def test_a_session_with_a_shorter_lease_than_those_held_is_renewed_in_time(
    launch: Any, clients: Clients, redis: Any
) -> None:
    server = await launch(connector("/slow", LONG) + connector("/fast", SHORT))
    slow = ResumeSession(clients, server.url.replace("/ws", "/slow"))
    await slow.start()
    await asleep(redis, f"connic:{{{slow.session_id}}}:owner", LONG)  # the renewer sleeps 20 s now

    fast = ResumeSession(clients, server.url.replace("/ws", "/fast"))
    await fast.start()  # a lease of 3 s, taken while the renewer sleeps 20 s
    await renewed_twice(redis, f"connic:{{{fast.session_id}}}:owner")


async def test_a_connection_counted_in_while_only_longer_leases_are_held_is_renewed_in_time(
    launch: Any, clients: Clients, redis: Any
) -> None:
    server = await launch(f"[server]\nmax_connections_per_ip = 2\n{connector('/ws', LONG)}")
    address = "connic:ip:{127.0.0.1}"
    first = ResumeSession(clients, server.url)
    conn = await first.start()
    await conn.send({"type": "message", "id": "m1", "payload": {"message": words(2000)}})  # 40 s long
    await conn.until_type("stream_chunk")
    first.drop()  # counted out; its session, answering on, keeps its 60 s lease
    deadline = time.monotonic() + 30
    while await redis.zcard(address):
        assert time.monotonic() < deadline, "the dropped connection was never counted out"
        await asyncio.sleep(0.02)
    await asleep(redis, f"connic:{{{first.session_id}}}:owner", LONG)  # the renewer sleeps 20 s now

    second = ResumeSession(clients, server.url)
    await second.start()  # counted in for connection_lease (3 s) while the renewer sleeps 20 s
    await renewed_twice(redis, address)
