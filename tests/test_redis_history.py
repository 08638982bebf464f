"""The ``redis`` store's history: a Redis list per session, saved by the entries an exchange adds.

A real ``redis-server`` (tests/redis_server.py); "processes" are connic apps in this test
process sharing it (as in tests/test_redis_store.py), clients real ``websockets`` clients.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from redis_server import (
    RedisServer,
    redis_client_fixture,  # noqa: F401  (a fixture)
    redis_server_fixture,  # noqa: F401  (a fixture)
)
from resume_helpers import (
    Clients,
    ResumeSession,
    clients_fixture,  # noqa: F401  (a fixture)
)
from test_redis_store import Gated, chat, history, process

from conftest import StartServer

aioredis = pytest.importorskip("redis.asyncio", reason="redis-py is not installed (pip install 'connic[redis]')")


def key(session: ResumeSession, name: str) -> str:
    return f"connic:{{{session.session_id}}}:{name}"


async def listed(redis: Any, session: ResumeSession) -> list[dict[str, Any]]:
    """The session's history list in Redis, as the ``history`` frame shows entries."""
    items = [json.loads(item) for item in await redis.lrange(key(session, "history"), 0, -1)]
    return [
        {"role": r, "text": t, "id": i, "message_number": n, **({"agent": a} if a else {})} for r, t, a, i, n in items
    ]


def shown(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``history`` frame entries with the fields the list keeps (an agent only on agent entries)."""
    keep = ("role", "text", "id", "message_number", "agent")
    return [{k: e[k] for k in keep if e.get(k) is not None} for e in entries]


async def listed_as(redis: Any, session: ResumeSession, entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The session's history list once it shows ``entries`` (saved within a few ms), or as it is after 5 s."""
    for _ in range(250):
        found = await listed(redis, session)
        if found == shown(entries):
            break
        await asyncio.sleep(0.02)
    return found


async def let_go(redis: Any, session: ResumeSession) -> None:
    """Wait (bounded) until no process owns the session: it was saved and let go."""
    for _ in range(500):
        if not await redis.exists(key(session, "owner")):
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the session was never let go")


async def received(redis: Any) -> int:
    """The bytes Redis has read from its clients so far."""
    return int((await redis.info("stats"))["total_net_input_bytes"])


async def test_an_exchange_costs_redis_the_same_late_in_a_long_conversation(
    redis_server: RedisServer, redis: Any, start_server: StartServer, clients: Clients
) -> None:
    # Saving a session once wrote its whole history after every exchange: a long
    # conversation cost O(history) bytes per turn (quadratic over the conversation).
    a = await process(start_server, redis_server.url, connector={"streaming": False})
    session = ResumeSession(clients, a.url())
    conn = await session.start()
    text = "x" * 1000
    spent = []
    for block in range(4):
        before = await received(redis)
        for i in range(10):
            await chat(conn, f"m{block}.{i}", f"{block}.{i} {text}")
        spent.append(await received(redis) - before)
    # Each exchange sends its own frames and entries, some 6 kB: the same for the 31st to
    # the 40th as for the first ten (whole histories would make it 8 times as much).
    assert spent[3] < 1.5 * spent[0], spent
    entries = await history(conn)
    assert len(entries) == 80
    assert await listed_as(redis, session, entries) == shown(entries)


async def test_a_long_conversation_resumes_whole_on_another_process_and_after_a_restart(
    redis_server: RedisServer, redis: Any, start_server: StartServer, clients: Clients
) -> None:
    inspect = {"assistant": {"use": "inspect"}}
    a = await process(start_server, redis_server.url)
    b = await process(start_server, redis_server.url, agents=inspect)
    session = ResumeSession(clients, a.url())
    conn = await session.start()
    for i in range(60):
        await chat(conn, f"m{i}", f"message {i} " + "y" * 200)
    before = await history(conn)
    assert len(before) == 120
    session.drop()
    conn_b = await session.resume(url=b.url())
    assert conn_b.connected["resumed"] is True
    assert await history(conn_b) == before
    await chat(conn_b, "next", "what came before?")
    seen = json.loads(session.transcript.end("next", "assistant")["full_response"])  # type: ignore[index]
    assert [h["text"] for h in seen["history"]] == [e["text"] for e in before]  # the agent sees all of it
    after = await history(conn_b)
    assert len(after) == 122 and await listed_as(redis, session, after) == shown(after)
    # Every process stops (drained: the session is let go), a new one takes it with all of its history.
    for server in (a, b):
        await server.server.close()
    c = await process(start_server, redis_server.url, agents=inspect)
    conn_c = await session.resume(url=c.url())
    assert conn_c.connected["resumed"] is True
    assert await history(conn_c) == after
    await chat(conn_c, "last", "and now?")
    seen = json.loads(session.transcript.end("last", "assistant")["full_response"])  # type: ignore[index]
    assert [h["text"] for h in seen["history"]] == [e["text"] for e in after]


async def test_trimming_by_max_history_bytes_is_mirrored_in_redis(
    redis_server: RedisServer, redis: Any, start_server: StartServer, clients: Clients
) -> None:
    connector = {"max_history_bytes": 1000, "streaming": False, "max_queued": 50}
    a = await process(start_server, redis_server.url, connector=connector)
    b = await process(start_server, redis_server.url, connector=connector)
    session = ResumeSession(clients, a.url())
    conn = await session.start()
    for i in range(12):
        await chat(conn, f"m{i}", f"{i:02} " + "z" * 97)  # 100 bytes: the history keeps the last 5 exchanges
        if i % 4 == 3:
            entries = await history(conn)
            assert len(entries) == min(2 * (i + 1), 10)
            assert await listed_as(redis, session, entries) == shown(entries)
    # Exchanges in a burst (several of them between two writes), then one larger than the bound alone.
    for i in range(12, 24):
        await conn.send({"type": "message", "id": f"m{i}", "payload": {"message": f"{i:02} " + "z" * 97}})
    await conn.until_ended({f"m{i}": ["assistant"] for i in range(12, 24)})
    entries = await history(conn)
    assert [e["text"][:2] for e in entries] == [f"{i:02}" for i in range(19, 24) for _ in range(2)]
    assert await listed_as(redis, session, entries) == shown(entries)
    await chat(conn, "big", "big " + "w" * 1200)
    entries = await history(conn)
    assert [e["id"] for e in entries] == ["big", "big"]
    assert await redis.llen(key(session, "history")) == 2
    assert await listed_as(redis, session, entries) == shown(entries)
    session.drop()
    conn_b = await session.resume(url=b.url())
    assert conn_b.connected["resumed"] is True
    assert await history(conn_b) == entries


async def test_a_failed_write_then_a_successful_one_leaves_no_gap(
    redis_server: RedisServer, redis: Any, start_server: StartServer, clients: Clients
) -> None:
    Gated.gate = asyncio.Event()
    Gated.gate.set()
    gated = {"assistant": {"use": "gated"}}
    a = await process(start_server, redis_server.url, agents=gated)
    b = await process(start_server, redis_server.url, agents=gated)
    session = ResumeSession(clients, a.url())
    conn = await session.start()
    await chat(conn, "m1", "one")
    assert await redis.llen(key(session, "history")) == 2
    Gated.gate.clear()
    # Redis refuses every write (its lease renewals go on): the save with the next user message fails.
    await redis.config_set("maxmemory-policy", "noeviction")
    await redis.config_set("maxmemory", 1)
    try:
        await conn.send({"type": "message", "id": "m2", "payload": {"message": "two"}})
        code, frames = await conn.closed(timeout=15)
        assert code == 1011 and any(f.get("code") == "store_unavailable" for f in frames), (code, frames)
        assert await redis.llen(key(session, "history")) == 2  # nothing of m2 was written
    finally:
        await redis.config_set("maxmemory", 0)
    Gated.gate.set()  # the reply ends on A, which saves the session and then lets it go
    await let_go(redis, session)
    expected = [("user", "one"), ("agent", "before after"), ("user", "two"), ("agent", "before after")]
    assert [(e["role"], e["text"]) for e in await listed(redis, session)] == expected
    conn_b = await session.resume(url=b.url())
    assert conn_b.connected["resumed"] is True
    assert [(e["role"], e["text"]) for e in await history(conn_b)] == expected
    await chat(conn_b, "m3", "three")
    entries = await history(conn_b)
    assert [(e["role"], e["text"]) for e in entries] == [*expected, ("user", "three"), ("agent", "before after")]
    assert await listed_as(redis, session, entries) == shown(entries)


async def test_a_record_with_its_history_inline_loads_and_is_rewritten_with_a_list(
    redis_server: RedisServer, redis: Any, start_server: StartServer, clients: Clients
) -> None:
    # Records written before the history had a list of its own (a rolling upgrade).
    inspect = {"assistant": {"use": "inspect"}}
    a = await process(start_server, redis_server.url)
    b = await process(start_server, redis_server.url, agents=inspect)
    session = ResumeSession(clients, a.url())
    conn = await session.start()
    await chat(conn, "m1", "first")
    await chat(conn, "m2", "second")
    before = await history(conn)
    session.drop()
    await let_go(redis, session)
    # The record as the previous version wrote it: the history inside, no list.
    record = json.loads(await redis.get(key(session, "record")))
    record["history"] = [json.loads(item) for item in await redis.lrange(key(session, "history"), 0, -1)]
    await redis.set(key(session, "record"), json.dumps(record), keepttl=True)
    await redis.delete(key(session, "history"))
    conn_b = await session.resume(url=b.url())
    assert conn_b.connected["resumed"] is True
    assert await history(conn_b) == before
    await chat(conn_b, "m3", "third")
    seen = json.loads(session.transcript.end("m3", "assistant")["full_response"])  # type: ignore[index]
    assert [h["text"] for h in seen["history"]] == [e["text"] for e in before]
    # Saved in the new form: the record without it, the list with all of it.
    assert "history" not in json.loads(await redis.get(key(session, "record")))
    after = await history(conn_b)
    assert len(after) == 6 and await listed_as(redis, session, after) == shown(after)


async def test_a_history_longer_than_lua_can_unpack_at_once_is_written_whole(
    redis_server: RedisServer, redis: Any, start_server: StartServer, clients: Clients
) -> None:
    # Written whole (here: an inline history's first save), 9,000 entries go in RPUSHes of
    # 1,000: one unpack() of all of them passes Lua's stack limit (about 8,000) and fails.
    a = await process(start_server, redis_server.url)
    session = ResumeSession(clients, a.url())
    conn = await session.start()
    await chat(conn, "m1", "first")
    session.drop()
    await let_go(redis, session)
    record = json.loads(await redis.get(key(session, "record")))
    record["history"] = [["user" if i % 2 == 0 else "agent", f"e{i}", None, f"i{i}", i // 2 + 1] for i in range(9000)]
    record["history_size"] = sum(len(f"e{i}") for i in range(9000))
    await redis.set(key(session, "record"), json.dumps(record), keepttl=True)
    await redis.delete(key(session, "history"))
    conn = await session.resume()
    assert conn.connected["resumed"] is True
    await chat(conn, "m2", "second")
    entries = await history(conn)
    assert [e["text"] for e in entries] == [f"e{i}" for i in range(9000)] + ["second", "second"]
    assert await listed_as(redis, session, entries) == shown(entries)
