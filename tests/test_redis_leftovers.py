"""What the ``redis`` store leaves in Redis once a session is over: nothing past its documented TTL.

docs/configuration.md: a session's record, history and replay log "expire ``resume_window``
seconds after its process let it go detached". Found by a soak run (benchmarks/soak.py): every
session dropped while its reply streamed left its replay log (``:log``) for a day, after its
record and history were gone; a session resumed on another process while its connection was
still open left its ``:resumer`` for up to ``session_timeout`` more. A real ``redis-server``
(tests/redis_server.py), connic in-process ("processes" are apps on their own ports), real
``websockets`` clients; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest
import websockets
from redis_server import (
    RedisServer,
    redis_client_fixture,  # noqa: F401  (a fixture)
    redis_server_fixture,  # noqa: F401  (a fixture)
)
from test_redis_store import process

from conftest import SECRET, Connect, StartServer

pytest.importorskip("redis.asyncio", reason="redis-py is not installed (pip install 'connic[redis]')")

RESUME_WINDOW = 1
SESSION_TIMEOUT = 30


async def wait_gone(redis: Any, key: str, within: float) -> None:
    deadline = time.monotonic() + within
    while await redis.exists(key):
        assert time.monotonic() < deadline, f"{key} still there after {within} s (PTTL {await redis.pttl(key)} ms)"
        await asyncio.sleep(0.1)


async def keys_left_after_the_record(redis: Any, sid: str) -> dict[str, int]:
    """Once the session's record has expired (within ``resume_window`` and a margin): its keys left, with their PTTL."""
    await wait_gone(redis, f"connic:{{{sid}}}:record", RESUME_WINDOW + 10)
    return {key: await redis.pttl(key) for key in await redis.keys(f"connic:{{{sid}}}*")}


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


@pytest.mark.parametrize("end", ["cancel, then drop", "close 1000 while following"])
async def test_a_session_taken_over_from_another_process_leaves_no_key_once_its_record_expired(
    start_server: StartServer, connect: Connect, redis_server: RedisServer, redis: Any, end: str
) -> None:
    connector = {"resume_window": RESUME_WINDOW, "session_timeout": SESSION_TIMEOUT}
    agents = {"assistant": {"use": "echo", "delay": 0.05}}
    first = await process(start_server, redis_server.url, connector=connector, agents=agents)
    second = await process(start_server, redis_server.url, connector=connector, agents=agents)
    conn = await connect(first.url(), keep_seq=True)
    hello = conn.connected  # type: ignore[attr-defined]
    await conn.send({"type": "message", "id": "m1", "payload": {"message": " ".join(f"w{n}" for n in range(20))}})
    last_seq = (await conn.until("stream_chunk"))[-1]["seq"]
    again = await websockets.connect(second.url(), open_timeout=5)
    resume = {"type": "resume", "session_id": hello["session_id"], "resume_token": hello["resume_token"]}
    await again.send(json.dumps({**resume, "last_seq": last_seq, "secret": SECRET}))
    code, _ = await conn.closed(10)
    assert code == 4011  # the first connection, still open, was taken over
    if end == "cancel, then drop":
        await again.send(json.dumps({"type": "cancel", "id": "m1"}))
        while json.loads(await asyncio.wait_for(again.recv(), 10))["type"] not in ("stream_end", "error"):
            pass
        again.transport.abort()
    else:
        await asyncio.sleep(0.2)  # following the reply the first process still answers
        await again.close(1000)
    left = await keys_left_after_the_record(redis, hello["session_id"])
    assert left == {}, f"keys left after the record expired (PTTL ms): {left}"
