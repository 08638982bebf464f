"""Redis killed and restarted from its RDB snapshot under live sessions (real processes, a real redis-server).

Redis's default persistence: killed (a crash, ``kill -9``), it comes back with its data as of
its last snapshot, older than what the sessions wrote since, with nothing marking it as lost.
What a client sees of a session must not change: a snapshot holding everything changes
nothing, and an older one costs no exchange of the history (test_review6.py has the live
session's save; here, the last save of a session let go).
"""

from __future__ import annotations

import asyncio
import json
import socket
from typing import Any

import test_redis_writeback
from redis_server import (
    RedisServer,
    redis_server_fixture,  # noqa: F401  (a fixture)
)
from resume_helpers import (
    Clients,
    Conn,
    ResumeSession,
    clients_fixture,  # noqa: F401  (a fixture)
)
from test_redis_fleet import chat

from conftest import CliServer
from connic.stores.redis.keys import session_keys

connic_run = test_redis_writeback.connic_run  # the fixture: python -m connic run, its echo agent's delay given


async def restarted_from_snapshot(
    connic_run: Any, clients: Clients, redis_server: RedisServer, *, holding_everything: bool = False
) -> tuple[ResumeSession, Conn, CliServer]:
    """A session on a process A that answered ``one`` (m1) and ``two`` (m2), both saved, then Redis
    killed (``kill -9``: nothing saved on the way out) and started again on its port and directory,
    from its snapshot: taken once ``one`` was saved (``holding_everything``: once ``two`` was).

    Returns the session, its connection to A (never ended) and a second process B sharing Redis.
    """
    a = await connic_run(0.01, 1.0)
    b = await connic_run(0.01, 1.0)
    session = ResumeSession(clients, a.url)
    conn = await session.start()
    await chat(conn, "m1", "one")
    if not holding_everything:
        await until_saved(redis_server.url, session.session_id, 2)
        _snapshot(redis_server)
    await chat(conn, "m2", "two")
    # Killed with a write on its way, the session's connection ended (1011): its reply is in first.
    await until_saved(redis_server.url, session.session_id, 4)
    if holding_everything:
        _snapshot(redis_server)
    assert redis_server.proc is not None
    redis_server.proc.kill()
    redis_server.proc.wait()
    redis_server.proc = None
    redis_server.start()
    return session, conn, b


def _snapshot(redis_server: RedisServer) -> None:
    with socket.create_connection(("127.0.0.1", redis_server.port), timeout=5) as sock:
        sock.sendall(b"SAVE\r\n")
        assert sock.recv(64).startswith(b"+OK")


async def until_saved(url: str, session_id: str, entries: int) -> None:
    """Wait (≤ 10 s) until the session's history list holds ``entries`` and its record says it is idle."""
    import redis.asyncio as aioredis

    _, _, record, _, history = session_keys("connic:", session_id)
    admin = aioredis.Redis.from_url(url)
    try:
        for _ in range(100):
            saved = await admin.get(record)
            if saved is not None and not json.loads(saved)["busy"] and await admin.llen(history) == entries:
                return
            await asyncio.sleep(0.1)
        raise AssertionError(f"the session's history never held {entries} entries")
    finally:
        await admin.aclose()


async def until_exists(url: str, key: str) -> None:
    """Wait (≤ 10 s) until ``key`` is in Redis again: the session's owner renewed its lease there."""
    import redis.asyncio as aioredis

    admin = aioredis.Redis.from_url(url)
    try:
        for _ in range(100):
            try:
                if await admin.exists(key):
                    return
            except (OSError, aioredis.ConnectionError):
                pass
            await asyncio.sleep(0.1)
    finally:
        await admin.aclose()


async def users(again: Any) -> list[str]:
    """The texts of the user's entries in the session's history, asked for on ``again``."""
    await again.send({"type": "history"})
    frames = await again.until_type("history")
    return [entry["text"] for entry in frames[-1]["entries"] if entry["role"] == "user"]


async def test_a_redis_restarted_from_a_snapshot_holding_everything_changes_nothing_a_client_sees(
    connic_run: Any, clients: Clients, redis_server: RedisServer
) -> None:
    session, conn, b = await restarted_from_snapshot(connic_run, clients, redis_server, holding_everything=True)
    await until_exists(redis_server.url, session_keys("connic:", session.session_id)[0])
    end = await chat(conn, "m3", "three")  # the same connection: never ended
    assert end["full_response"] == "three"
    session.drop()
    again = await session.resume(url=b.url)
    assert again.connected["resumed"] is True, again.connected
    assert await users(again) == ["one", "two", "three"]
    assert (await chat(again, "m4", "four"))["full_response"] == "four"
    assert await users(again) == ["one", "two", "three", "four"]


async def test_a_session_let_go_after_redis_restarted_from_an_older_snapshot_keeps_its_whole_history(
    connic_run: Any, clients: Clients, redis_server: RedisServer
) -> None:
    # Its client gone, the session is let go with its last save: the first write of it since
    # Redis came back older. Appended to, the list lost "two"; let go, nobody could write it again.
    session, _, b = await restarted_from_snapshot(connic_run, clients, redis_server)
    owner = session_keys("connic:", session.session_id)[0]
    await until_exists(redis_server.url, owner)
    session.drop()
    await _until_let_go(redis_server.url, owner)  # by A: B's resume takes it, as it is in Redis
    again = await session.resume(url=b.url)
    assert again.connected["resumed"] is True, again.connected
    assert await users(again) == ["one", "two"]


async def test_an_idle_session_whose_history_redis_restored_older_has_it_written_whole(
    connic_run: Any, clients: Clients, redis_server: RedisServer
) -> None:
    # No save comes for an idle session to find its list older: its lease's renewal does, and a
    # resume following it elsewhere (answered from Redis) gets its whole history.
    session, _, b = await restarted_from_snapshot(connic_run, clients, redis_server)
    await until_saved(redis_server.url, session.session_id, 4)  # "two" written again, from A
    again = await session.resume(url=b.url)
    assert again.connected["resumed"] is True, again.connected
    assert await users(again) == ["one", "two"]


async def _until_let_go(url: str, owner: str) -> None:
    """Wait (≤ 10 s) until nobody owns the session (its ownership key ``owner`` is gone)."""
    import redis.asyncio as aioredis

    admin = aioredis.Redis.from_url(url)
    try:
        for _ in range(100):
            if not await admin.exists(owner):
                return
            await asyncio.sleep(0.1)
        raise AssertionError("the session was never let go")
    finally:
        await admin.aclose()
