"""Operations under attack, Redis side: Redis paused, holding writes back, or emptied under live sessions.

Real ``python -m connic run`` processes on a private ``redis-server`` (tests/redis_server.py),
real ``websockets`` clients on loopback. Redis is paused with SIGSTOP (a hung server, or a
network that drops packets: connections stay open and nothing answers), holds writes back with
``CLIENT PAUSE WRITE`` (as its FAILOVER does), and is emptied with FLUSHALL (a restart that lost
its data). The supervisor's side is tests/test_ops_attack_workers.py. Every wait is bounded;
nothing is timed.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
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
    words,
)
from test_redis_fleet import chat, status_within

from conftest import SECRET, CliServer, start_cli

PRODUCER_TIMEOUT = 1.0
"""The lease of a session's owner in these tests (renewed every third of it)."""


# --- Redis paused or emptied under an idle live session ------------------------------------


@pytest.fixture
def served(tmp_path: Path, redis_server: RedisServer) -> Iterator[Any]:
    """``served(connector)``: a ``python -m connic run`` on ``redis_server`` (echo agent; ``connector``: more
    keys of its connector, in TOML); killed at the end.

    Redis is let run again (SIGCONT) first, whatever the test left it as.
    """
    pytest.importorskip("redis.asyncio", reason="redis-py is not installed (pip install 'connic[redis]')")
    env = store_plugin_env(tmp_path / "plugins")
    started: list[CliServer] = []

    async def start(connector: str = "") -> CliServer:
        config = tmp_path / "connic.toml"
        config.write_text(
            '[agents.assistant]\nuse = "echo"\ndelay = 0.01\n'
            f'[[connectors]]\npath = "/ws"\nsecrets = ["{SECRET}"]\nproducer_timeout = {PRODUCER_TIMEOUT}\n'
            f'{connector}[store]\nuse = "redis"\nurl = "{redis_server.url}"\ntimeout = 0.5\n'
        )
        server = await asyncio.to_thread(start_cli, "--config", str(config), env=env)
        started.append(server)
        # Read what it prints, or a full pipe would stop the server at its next log line.
        threading.Thread(target=server.proc.communicate, daemon=True).start()
        return server

    yield start
    if redis_server.proc is not None:
        os.kill(redis_server.proc.pid, signal.SIGCONT)
    for server in started:
        if server.proc.poll() is None:
            server.proc.kill()


async def store_calls(http: str, operation: str) -> float:
    """``connic_store_seconds_count`` for ``operation``, scraped from ``http``/metrics."""
    async with aiohttp.ClientSession() as session, session.get(http + "/metrics") as response:
        assert response.status == 200
        text = await response.text()
    found = re.search(rf'^connic_store_seconds_count\{{operation="{operation}"\}} (\S+)$', text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


async def _idle_session(clients: Clients, url: str) -> tuple[ResumeSession, Any]:
    """A new session with nothing left to write (its creation is in Redis before ``connected``)."""
    session = ResumeSession(clients, url)
    conn = await session.start()
    assert await conn.barrier() == []
    return session, conn


async def test_redis_refusing_writes_for_a_while_gets_new_handshakes_503_then_serves_again(
    served: Any, clients: Clients, redis_server: RedisServer
) -> None:
    # CLIENT PAUSE WRITE (what Redis's own FAILOVER does): reads, PING included, are answered, every
    # write waits. Whether Redis was back was asked with a PING, which it answered: every new
    # session was accepted, then closed 1011 a store timeout later, never refused with the 503
    # (Retry-After) that keeps clients from hammering a store that cannot take sessions.
    import redis.asyncio as aioredis

    server = await served()
    http = f"http://127.0.0.1:{server.port}"
    added = await store_calls(http, "add")
    admin = aioredis.Redis.from_url(redis_server.url)
    try:
        await admin.execute_command("CLIENT", "PAUSE", 20_000, "WRITE")
        # The first session finds it out: its creation gets no answer.
        first = ResumeSession(clients, server.url)
        conn = await first.clients.open(server.url, first.transcript)
        await conn.send({"secret": SECRET})
        code, frames = await conn.closed(timeout=10)
        assert code == 1011 and [f["code"] for f in frames if f["type"] == "error"] == ["store_unavailable"]
        # The store latency histogram counts the creation that timed out (it counted successes only).
        assert await store_calls(http, "add") == added + 1
        assert await status_within(server.url, 503, 5), "new handshakes still accepted while Redis takes no write"
    finally:
        await admin.execute_command("CLIENT", "UNPAUSE")
        await admin.aclose()
    assert await status_within(server.url, None, 10)
    session = ResumeSession(clients, server.url)
    assert (await chat(await session.start(), "m1", "back"))["full_response"] == "back"


async def test_an_idle_session_outliving_a_redis_pause_longer_than_its_lease_is_not_told_it_was_taken_over(
    served: Any, clients: Clients, redis_server: RedisServer
) -> None:
    # Redis hung (or the network to it dropped everything) for longer than producer_timeout: the
    # owner could not renew its lease, which lapsed in Redis. No other connection resumed the
    # session. Its next renewal used to find the owner key gone and call that a takeover:
    # `session_taken_over` and 4011, a close that clients treat as final (another tab has the
    # session: connic's own playground stops reconnecting), for a session nobody took.
    server = await served()
    session, conn = await _idle_session(clients, server.url)
    assert redis_server.proc is not None
    os.kill(redis_server.proc.pid, signal.SIGSTOP)
    await asyncio.sleep(PRODUCER_TIMEOUT * 2.5)  # the lease lapses while nothing answers
    os.kill(redis_server.proc.pid, signal.SIGCONT)
    await _not_taken_over(session, conn)


async def test_an_idle_session_whose_keys_redis_lost_is_not_told_it_was_taken_over(
    served: Any, clients: Clients, redis_server: RedisServer
) -> None:
    # Redis restarted without its data (or FLUSHALL): the process serving a session lost nothing,
    # but Redis no longer knows the session. It was not taken over: the protocol's store failure
    # (store_unavailable, 1011, resumable) or carrying on is right, 4011 is not.
    server = await served()
    session, conn = await _idle_session(clients, server.url)
    flush(redis_server.url)
    await _not_taken_over(session, conn, lost=True)


async def test_a_message_to_a_rate_limited_session_whose_keys_redis_lost_is_not_told_it_was_taken_over(
    served: Any, clients: Clients, redis_server: RedisServer
) -> None:
    # The same, with a rate_limit: the message's first store call is the bucket's, whose script
    # took "no owner" for "another owner" too, before any renewal or write could tell the two apart.
    server = await served("rate_limit = { messages = 100, per = 60 }\n")
    session, conn = await _idle_session(clients, server.url)
    flush(redis_server.url)
    await conn.send({"type": "message", "id": "m1", "payload": {"message": "hello"}})
    await _not_taken_over(session, conn, lost=True)


async def test_a_streaming_session_whose_keys_redis_lost_is_not_told_it_was_taken_over(
    served: Any, clients: Clients, redis_server: RedisServer
) -> None:
    # The same, with a reply streaming: its next write to the replay log finds no owner. The
    # process writes the session back (tests/test_redis_writeback.py): the reply goes on.
    server = await served()
    session, conn = await _idle_session(clients, server.url)
    text = words(400)
    await conn.send({"type": "message", "id": "m1", "payload": {"message": text}})
    await conn.until(lambda f: f.get("type") == "stream_chunk")
    flush(redis_server.url)
    await conn.until_ended({"m1": ["assistant"]}, timeout=30)  # the reply takes about 4 s
    end = session.transcript.end("m1", "assistant")
    assert end is not None and end["full_response"] == text


async def _not_taken_over(session: ResumeSession, conn: Any, *, lost: bool = False) -> None:
    """Within a few lease renewals: the session's connection carries on, or it ends as a store failure.

    Then the session is resumed (or, when Redis lost it, a resume gets a fresh session).
    """
    try:
        code, frames = await conn.closed(timeout=PRODUCER_TIMEOUT * 4)
    except TimeoutError:
        code, frames = None, []
    if code is None:  # still open: it goes on as it was
        assert await conn.barrier() == []
        return
    errors = [f for f in frames if f.get("type") == "error"]
    assert code == 1011 and [e["code"] for e in errors] == ["store_unavailable"], (code, frames)
    again = await session.resume()
    assert again.connected["resumed"] is not lost, again.connected


# --- Redis closing idle connections ---------------------------------------------------------


async def test_a_resume_following_another_process_after_an_idle_while_gets_the_reply_with_redis_timeout_set(
    served: Any, clients: Clients, redis_server: RedisServer
) -> None:
    # Redis's own `timeout` (close a client idle that many seconds; managed Redis often sets one).
    # The connection a process reads the followed logs on was kept while it followed none: Redis
    # closed it, and the next resume following a reply on another process failed at its first
    # read (store_unavailable, 1011: "Connection closed by server"), every time after a quiet spell.
    import redis.asyncio as aioredis

    admin = aioredis.Redis.from_url(redis_server.url)
    try:
        await admin.config_set("timeout", 1)
    finally:
        await admin.aclose()
    a, b = await served(), await served()
    for text in (words(150, prefix="first"), words(150, prefix="second")):
        session = ResumeSession(clients, a.url)
        conn = await session.start()
        await conn.send({"type": "message", "id": "m1", "payload": {"message": text}})
        while len(session.transcript.chunks("m1", "assistant")) < 3:
            await conn.recv()
        session.drop()
        conn = await session.resume(url=b.url)  # follows A's reply while A answers it
        assert conn.connected["resumed"] is True, conn.connected
        await conn.until_ended({"m1": ["assistant"]}, timeout=20)
        end = session.transcript.end("m1", "assistant")
        assert end is not None and end["full_response"] == text
        await asyncio.sleep(3)  # B follows nothing, longer than Redis's timeout
