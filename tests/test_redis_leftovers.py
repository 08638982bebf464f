"""What the ``redis`` store leaves in Redis once a session is over: nothing past its documented TTL.

docs/configuration.md: a session's record, history and replay log "expire ``resume_window``
seconds after its process let it go detached". Found by a soak run (benchmarks/soak.py): every
session dropped while its reply streamed left its replay log (``:log``) for a day, after its
record and history were gone. A real ``redis-server`` (tests/redis_server.py), connic in-process,
real ``websockets`` clients; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from redis_server import (
    RedisServer,
    redis_client_fixture,  # noqa: F401  (a fixture)
    redis_server_fixture,  # noqa: F401  (a fixture)
)
from test_redis_store import process

from conftest import Connect, StartServer

pytest.importorskip("redis.asyncio", reason="redis-py is not installed (pip install 'connic[redis]')")

RESUME_WINDOW = 1
SESSION_TIMEOUT = 30


async def wait_gone(redis: Any, key: str, within: float) -> None:
    deadline = time.monotonic() + within
    while await redis.exists(key):
        assert time.monotonic() < deadline, f"{key} still there after {within} s (PTTL {await redis.pttl(key)} ms)"
        await asyncio.sleep(0.1)


async def test_a_session_dropped_mid_reply_leaves_no_key_once_its_record_expired(
    start_server: StartServer, connect: Connect, redis_server: RedisServer, redis: Any
) -> None:
    connector = {"resume_window": RESUME_WINDOW, "session_timeout": SESSION_TIMEOUT}
    server = await process(
        start_server, redis_server.url, connector=connector, agents={"assistant": {"use": "echo", "delay": 0.05}}
    )
    conn = await connect(server.url())
    sid = conn.connected["session_id"]  # type: ignore[attr-defined]
    await conn.send({"type": "message", "id": "m1", "payload": {"message": " ".join(f"w{n}" for n in range(10))}})
    await conn.until("stream_chunk")
    conn.ws.transport.abort()  # no close frame: the session detaches, the reply goes on into its log
    record = f"connic:{{{sid}}}:record"
    deadline = time.monotonic() + 20
    while await redis.pttl(record) > RESUME_WINDOW * 1000:  # the reply still runs: kept for the session's life
        assert time.monotonic() < deadline, "the session was never let go"
        await asyncio.sleep(0.05)
    await wait_gone(redis, record, RESUME_WINDOW + 10)
    left = {key: await redis.pttl(key) for key in await redis.keys(f"connic:{{{sid}}}*")}
    assert left == {}, f"keys left after the record expired (PTTL ms): {left}"
