"""Review 6: the redis store's write-back, lease renewal and limits against real processes.

Real ``python -m connic run`` processes on a private ``redis-server`` (tests/redis_server.py),
some through a TCP proxy that holds one write on its way (a slow Redis, a congested link);
real ``websockets`` clients. Every wait is bounded; no assertion is on a duration.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import signal
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import test_redis_limits
import test_redis_writeback
from redis_server import (
    RedisServer,
    flush,
    redis_client_fixture,  # noqa: F401  (a fixture)
    redis_server_fixture,  # noqa: F401  (a fixture)
    store_plugin_env,
    with_store,
)
from resume_helpers import (
    Clients,
    ResumeSession,
    clients_fixture,  # noqa: F401  (a fixture)
    words,
)
from tcp_proxy import TcpProxy
from test_agui_support import agui_config, agui_registry, kinds, post_run, run_input
from test_redis_fleet import chat
from test_redis_limits import open_ws, refused_status, refused_within
from test_redis_snapshot import restarted_from_snapshot, until_exists, users
from websockets.exceptions import ConnectionClosed

from conftest import SECRET, CliServer, StartServer, start_cli
from connic.stores.redis import limit_scripts, scripts
from connic.stores.redis.keys import address_key, session_keys

fleet = test_redis_limits.fleet  # the fixture: python -m connic run with extra TOML lines
connic_run = test_redis_writeback.connic_run  # the fixture: python -m connic run, its echo agent's delay given

APPEND_SHA = hashlib.sha1(scripts.APPEND.encode()).hexdigest().encode()  # what an EVALSHA of APPEND carries
IP_ENTER_SHA = hashlib.sha1(limit_scripts.IP_ENTER.encode()).hexdigest().encode()


class HoldingOnce(TcpProxy):
    """A proxy to Redis that, once :attr:`hold` is set, holds the next write carrying script ``sha`` that long.

    Only that one write, on its one connection: the process's other calls go through meanwhile,
    as they do when one of its pooled connections is slow. :attr:`held` is set once it holds it.
    """

    def __init__(self, target_port: int, sha: bytes = APPEND_SHA) -> None:
        super().__init__(target_port)
        self.sha = sha
        self.hold = 0.0
        self.held = asyncio.Event()
        self.passed = asyncio.Event()  # set once the write it held is passed on

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                hold = 0.0
                if self.hold and self.sha in data:
                    hold, self.hold = self.hold, 0.0
                    self.held.set()
                    await asyncio.sleep(hold)
                writer.write(data)
                await writer.drain()
                if hold:
                    self.passed.set()
            if writer.can_write_eof():
                writer.write_eof()
        except (ConnectionError, OSError):
            writer.transport.abort()


async def test_a_write_sent_before_redis_lost_its_data_and_run_after_the_write_back_takes_nothing_over(
    connic_run: Any, clients: Clients, redis_server: RedisServer
) -> None:
    # A batch of the session's frames (APPEND, under the fencing token A held) is on its way, slow,
    # when Redis loses its data. Meanwhile A's renewal finds the session gone and writes it back:
    # a new fencing token. The slow APPEND then runs and is refused for the old token: A took that
    # for another process owning the session and closed the connection with session_taken_over
    # (4011, final for clients) although nobody took it over: A itself holds it.
    proxy = HoldingOnce(redis_server.port)
    await proxy.start()
    try:
        a = await connic_run(0.02, 1.0, url=f"redis://127.0.0.1:{proxy.port}/0", timeout=5.0)
        session = ResumeSession(clients, a.url)
        conn = await session.start()
        text = words(200)  # 200 chunks 20 ms apart
        await conn.send({"type": "message", "id": "m1", "payload": {"message": text}})
        await conn.until(lambda f: f.get("type") == "stream_chunk")
        proxy.hold = 2.0
        await asyncio.wait_for(proxy.held.wait(), 10)  # an APPEND is on its way, not yet run
        flush(redis_server.url)
        await conn.until_ended({"m1": ["assistant"]}, timeout=30)
        end = session.transcript.end("m1", "assistant")
        assert end is not None and end["full_response"] == text
        await conn.send({"type": "message", "id": "m2", "payload": {"message": "next"}})
        await conn.until_ended({"m2": ["assistant"]}, timeout=10)
    finally:
        await proxy.close()


async def test_a_rolling_restart_frees_the_connections_of_the_process_it_stopped(fleet: Any) -> None:
    # max_connections_per_ip across the fleet: a process stopped (SIGTERM) closes its connections
    # (1001); their clients reconnect to another process at once, as a rolling restart has them.
    options = {"server": "max_connections_per_ip = 1", "store": "connection_lease = 60"}
    a = await fleet(**options)
    b = await fleet(**options)
    ws = await open_ws(a.url)
    a.proc.send_signal(signal.SIGTERM)
    await asyncio.to_thread(a.proc.wait, 20)
    with contextlib.suppress(ConnectionClosed):
        await asyncio.wait_for(ws.recv(), 10)
    assert await refused_status(b.url) is None, "the stopped process's connection still counts"


async def test_two_agui_runs_at_once_on_one_thread_keep_max_messages_with_a_rate_limit_in_redis(
    start_server: StartServer, redis_server: RedisServer
) -> None:
    # Two runs posted at once on one thread, max_messages = 1, and a rate_limit (its bucket in Redis:
    # a round trip). Each was checked against max_messages before taking its token, and counted
    # after: both passed the check while the other waited for Redis, and both were answered.
    start = with_store(start_server, redis_server.url)
    connector = {"max_messages": 2, "rate_limit": {"messages": 10, "per": 60}}
    server = await start(agui_config(connector), registry=agui_registry())
    url = server.http + "/agui"
    thread = str(uuid.uuid4())
    status, events = await post_run(url, run_input(thread, "first"))  # the thread exists from here
    assert status == 200 and isinstance(events, list) and kinds(events)[-1] == "RUN_FINISHED", events
    runs = await asyncio.gather(post_run(url, run_input(thread, "second")), post_run(url, run_input(thread, "third")))
    endings = sorted(
        (events[-1].code if kinds(events)[-1] == "RUN_ERROR" else "answered")
        for status, events in runs
        if status == 200 and isinstance(events, list)
    )
    assert endings == ["answered", "message_limit_reached"], runs


@pytest.fixture
def run_on(tmp_path: Path) -> Iterator[Any]:
    """``run_on(url, server=..., store=...)``: a ``python -m connic run`` on the Redis at ``url``; killed at the end."""
    env = store_plugin_env(tmp_path / "plugins")
    started: list[CliServer] = []

    async def start(url: str, *, server: str = "", store: str = "") -> CliServer:
        config = tmp_path / f"connic-run-{len(started)}.toml"
        config.write_text(
            f"[server]\n{server}\n"
            '[agents.assistant]\nuse = "echo"\n'
            f'[[connectors]]\npath = "/ws"\nsecrets = ["{SECRET}"]\n'
            f'[store]\nuse = "redis"\nurl = "{url}"\n{store}\n'
        )
        process = await asyncio.to_thread(start_cli, "--config", str(config), env=env)
        started.append(process)
        threading.Thread(target=process.proc.communicate, daemon=True).start()  # a full pipe would stop it
        return process

    yield start
    for process in started:
        if process.proc.poll() is None:
            process.proc.kill()


async def test_a_handshake_whose_count_in_timed_out_is_not_counted_when_it_runs_late(
    run_on: Any, redis_server: RedisServer
) -> None:
    # A slow Redis: a handshake's count-in (IP_ENTER) takes longer than the store's timeout, and the
    # client gets 503. The script still runs, late: it counted in a connection that never opened,
    # nobody renewed or removed it, and the address got 429 (too many connections) for a whole
    # connection_lease with nothing open.
    proxy = HoldingOnce(redis_server.port, IP_ENTER_SHA)
    await proxy.start()
    try:
        a = await run_on(
            f"redis://127.0.0.1:{proxy.port}/0",
            server="max_connections_per_ip = 1",
            store="timeout = 0.5\nconnection_lease = 60",
        )
        proxy.hold = 1.5
        assert await refused_status(a.url) == 503  # no answer from Redis within its timeout
        await asyncio.wait_for(proxy.passed.wait(), 10)  # the count-in reaches Redis now
        await asyncio.sleep(0.2)  # and has run
        assert await refused_status(a.url) is None, "a handshake that was refused still counts"
    finally:
        await proxy.close()


async def test_the_connections_open_while_redis_was_full_count_again_once_it_has_room(
    run_on: Any, redis_server: RedisServer, redis: Any
) -> None:
    # Redis full (maxmemory, noeviction) for longer than connection_lease: it refused the renewals
    # of the connections' entries (a ZADD needs room), so they lapsed. Once it had room, the
    # renewals renewed only the entries still there: the connections open all along counted no
    # more, for as long as they stayed open, and the address got as many more as the limit again.
    lease = 1.5
    options = {"server": "max_connections_per_ip = 2", "store": f"connection_lease = {lease}"}
    a = await run_on(redis_server.url, **options)
    b = await run_on(redis_server.url, **options)
    held = [await open_ws(a.url), await open_ws(a.url)]
    try:
        assert await refused_status(b.url) == 429  # A's two count on B
        await redis.config_set("maxmemory", 1)
        key = address_key("connic:", "127.0.0.1")
        for _ in range(200):  # their entries lapse: renewing them is refused
            if not await redis.exists(key):
                break
            await asyncio.sleep(0.1)
        assert not await redis.exists(key), "the renewals of the entries went through"
        await redis.config_set("maxmemory", 0)
        assert await refused_within(b.url, lease * 5), "the connections open while Redis was full no longer count"
    finally:
        await redis.config_set("maxmemory", 0)
        for ws in held:
            await ws.close()


async def test_a_redis_restarted_from_an_older_snapshot_keeps_the_whole_history_of_a_live_session(
    connic_run: Any, clients: Clients, redis_server: RedisServer
) -> None:
    # Redis with RDB snapshots (its default) killed and restarted: it comes back with its data as of
    # the last snapshot, the epoch included, so nothing reads as lost. The session goes on on A, but
    # each save appends only the entries added since the last one, to a list that lost the ones
    # written after the snapshot: a resume on B gets a history with a hole (here, "two").
    session, conn, b = await restarted_from_snapshot(connic_run, clients, redis_server)
    await until_exists(redis_server.url, session_keys("connic:", session.session_id)[0])
    await chat(conn, "m3", "three")
    session.drop()
    again = await session.resume(url=b.url)
    assert again.connected["resumed"] is True, again.connected
    assert await users(again) == ["one", "two", "three"]
