"""The lease renewer goes on renewing while taking a session's cancels hangs (docs/deployment.md).

The owner (process A) takes the cancels passed to its session (the ``CANCELS`` script) one take
at a time, under one lock for the process, so that they are acted on in the order taken. Its
renewer took them too, awaiting that lock: behind every take waiting for it, each up to the
store's ``timeout`` when Redis does not answer it, it renewed nothing meanwhile, and the leases
ran out while their replies still streamed (another process may then claim them). Here a proxy
between A and a real ``redis-server`` stalls every ``CANCELS`` call (a call Redis never answers:
a network that drops its packets), and the client on process B sends four cancels while it
follows A's reply; A's lease must keep being renewed. Real ``python -m connic run`` processes,
a real WebSocket client; the lease's TTL is read with a client of the test's own.
"""

from __future__ import annotations

import asyncio
import hashlib
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
from resume_helpers import Clients, clients_fixture, words  # noqa: F401  (a fixture)
from tcp_proxy import TcpProxy
from test_redis_held import following

from conftest import SECRET, CliServer, start_cli
from connic.stores.redis.scripts import CANCELS

pytest.importorskip("redis.asyncio", reason="redis-py is not installed (pip install 'connic[redis]')")

LEASE = 6  # producer_timeout (s): renewed every 2 s


class _StallingCancels(TcpProxy):
    """Forwards everything but a ``CANCELS`` call (EVALSHA of its script), which never reaches Redis."""

    sha = hashlib.sha1(CANCELS.encode()).hexdigest().encode()  # EVALSHA names it so

    def passes(self, data: bytes) -> bool:
        # The call (not the reply to SCRIPT LOAD, which names the script's sha too).
        return not (b"EVALSHA" in data.upper() and self.sha in data)


@pytest.fixture
def launch(tmp_path: Path) -> Iterator[Any]:
    """Start one ``python -m connic run`` process keeping its sessions in the Redis at ``url``."""
    env = store_plugin_env(tmp_path / "plugins")
    started: list[CliServer] = []

    async def start(url: str) -> CliServer:
        config = tmp_path / f"connic-{len(started)}.toml"
        config.write_text(
            '[agents.assistant]\nuse = "echo"\ndelay = 0.02\n'
            f'[[connectors]]\npath = "/ws"\nsecrets = ["{SECRET}"]\nproducer_timeout = {LEASE}\n'
            f'[store]\nuse = "redis"\nurl = "{url}"\ntimeout = 2\n'
        )
        server = await asyncio.to_thread(start_cli, "--config", str(config), env=env)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop(signal.SIGKILL)


async def test_the_owners_lease_is_renewed_while_taking_its_cancels_hangs(
    launch: Any, clients: Clients, redis_server: RedisServer, redis: Any
) -> None:
    proxy = await _StallingCancels(int(redis_server.url.rsplit(":", 1)[1].split("/")[0])).start()
    try:
        a = await launch(f"redis://127.0.0.1:{proxy.port}")
        b = await launch(redis_server.url)
        session, conn = await following(a, b, clients, words(2000))  # 40 s of reply on A
        for _ in range(4):
            await conn.send({"type": "cancel", "id": "m9"})  # each a take on A that hangs 2 s
        owner = f"connic:{{{session.session_id}}}:owner"
        renewals, last = 0, await redis.pttl(owner)
        deadline = time.monotonic() + 60  # a bound for a hung test only: the lease lapses far sooner
        while renewals < 5:  # 10 s: the four takes, and the renewer's own
            ttl = await redis.pttl(owner)
            assert ttl > 0, f"A's lease lapsed (PTTL {ttl}) after {renewals} renewal(s)"
            renewals += ttl > last
            last = ttl
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
    finally:
        await proxy.close()
