"""Review of the redis store's write-back and limits work: what an attack on it found.

Real ``python -m connic run`` processes on a private ``redis-server`` (tests/redis_server.py),
behind a proxy that holds some commands back; real ``websockets`` clients; every wait bounded.
"""

from __future__ import annotations

import asyncio
import hashlib
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from redis_server import (
    RedisServer,
    flush,
    redis_server_fixture,  # noqa: F401  (a fixture)
    store_plugin_env,
)
from resume_helpers import (
    Clients,
    ResumeSession,
    clients_fixture,  # noqa: F401  (a fixture)
)
from tcp_proxy import TcpProxy
from test_redis_fleet import chat
from test_redis_limits import accepted_within, open_ws, refused_status

from conftest import SECRET, CliServer, start_cli
from connic.stores.redis import limit_scripts

IP_RENEW_SHA = hashlib.sha1(limit_scripts.IP_RENEW.encode()).hexdigest().encode()


@pytest.fixture
def connic_run(tmp_path: Path) -> Iterator[Any]:
    """``connic_run(url, server=..., store=...)``: a ``python -m connic run`` on Redis at ``url``, with those
    extra TOML lines in ``[server]`` and ``[store]``; killed at the end.
    """
    pytest.importorskip("redis.asyncio", reason="redis-py is not installed (pip install 'connic[redis]')")
    env = store_plugin_env(tmp_path / "plugins")
    started: list[CliServer] = []

    async def start(url: str, server: str = "", store: str = "") -> CliServer:
        config = tmp_path / f"connic-{len(started)}.toml"
        config.write_text(
            f"[server]\n{server}\n"
            '[agents.assistant]\nuse = "echo"\ndelay = 0.01\n'
            f'[[connectors]]\npath = "/ws"\nsecrets = ["{SECRET}"]\nproducer_timeout = 60\n'
            f'[store]\nuse = "redis"\nurl = "{url}"\n{store}\n'
        )
        process = await asyncio.to_thread(start_cli, "--config", str(config), env=env)
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop(signal.SIGKILL if process.proc.poll() is None else signal.SIGTERM)


class HoldingRenewals(TcpProxy):
    """A proxy to Redis that, while :attr:`delay` is set, holds what carries an IP_RENEW that long, then passes it on.

    :attr:`held` is set once it holds one, :attr:`passed` once it passed a held one on to Redis.
    """

    def __init__(self, target_port: int) -> None:
        super().__init__(target_port)
        self.delay = 0.0
        self.held = asyncio.Event()
        self.passed = asyncio.Event()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                holding = bool(self.delay) and IP_RENEW_SHA in data
                if holding:
                    self.held.set()
                    await asyncio.sleep(self.delay)
                writer.write(data)
                await writer.drain()
                if holding:
                    self.passed.set()
            if writer.can_write_eof():
                writer.write_eof()
        except (ConnectionError, OSError):
            writer.transport.abort()


@pytest.mark.parametrize("held", [0.2, 2.0])
async def test_a_connection_closed_while_its_count_is_added_again_stops_counting(
    connic_run: Any, clients: Clients, redis_server: RedisServer, held: float
) -> None:
    # Redis lost its data: the process adds the connections it holds open again (IP_RENEW '1'), and
    # one connection closes meanwhile. When that call timed out (held longer than [store] timeout,
    # Redis slow to answer), the closed connection was counted out (ZREM), and then Redis ran the
    # late re-add: it counted again, for a whole connection_lease (60 s here), and its address was
    # refused connections it was allowed. (Held less, the call answers and all is well.)
    proxy = HoldingRenewals(redis_server.port)
    await proxy.start()
    try:
        a = await connic_run(
            f"redis://127.0.0.1:{proxy.port}/0",
            server="max_connections_per_ip = 2",
            store="timeout = 0.5\nconnection_lease = 60",
        )
        session = ResumeSession(clients, a.url)
        first = await session.start()
        await chat(first, "m1", "before")
        second = await open_ws(a.url)
        assert await refused_status(a.url) == 429
        proxy.delay = held
        flush(redis_server.url)
        # The message's save finds its session gone: the epoch read then finds the loss, and the
        # connections open here are added again.
        await first.send({"type": "message", "id": "m2", "payload": {"message": "after"}})
        await asyncio.wait_for(proxy.held.wait(), 10)
        await second.close()
        await asyncio.wait_for(proxy.passed.wait(), 10)  # the re-add has reached Redis
        proxy.delay = 0.0
        assert await accepted_within(a.url, 10), "the closed connection still counts"
    finally:
        await proxy.close()
