"""Cancels sent while an AG-UI resume follows a dead process, with the ``redis`` store: kept long enough.

A cancel no process takes waits in Redis for the next owner for twice the owner's lease
(``producer_timeout``): long enough for the claim that follows the lease running out to
find it. Each resume following a session gives its lease, and removes only its own when it
ends (tests/test_redis_follow_leases.py pins it for the Connic protocol). AG-UI's resume
follows a thread twice when the log lost the thread's start: from its first frame, then,
that gone, from the client's ``lastSeq``; and it may take over a Connic protocol resume
following the same session on the same process. Two real ``python -m connic run``
processes share one real ``redis-server``; clients are real ``websockets`` clients.

Measured on the code before each follow kept its own lease: the restart alone kept the
cancels' TTL (the second follow gives its lease only once the first ended: it waits for the
thread's turn), but an AG-UI resume taking over a Connic protocol one lost it to the older
one's end (2 x 10 s instead of 2 x 30 s), the ``4096`` case below.
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
    redis_server_fixture,  # noqa: F401  (a fixture)
)
from resume_helpers import (
    Clients,
    ResumeSession,
    clients_fixture,  # noqa: F401  (a fixture)
    words,
)
from test_agui_support import run_input
from test_redis_following import following, launch  # noqa: F401  (launch: a fixture)

from conftest import SECRET

aioredis = pytest.importorskip("redis.asyncio", reason="redis-py is not installed (pip install 'connic[redis]')")
AUTH = {"Authorization": f"Bearer {SECRET}"}  # the secret of the connector launch writes


async def test_a_cancel_while_a_resume_follows_a_dead_process_from_last_seq_is_kept_for_twice_its_lease(
    launch: Any,  # noqa: F811  (the fixture imported above)
    redis_server: RedisServer,
) -> None:
    lease = 30.0  # the owner's lease: longer than the 10 s floor, so that the two TTLs differ
    lines = ('transport = "agui"', f"producer_timeout = {lease:g}", "replay_buffer = 16", 'on_disconnect = "continue"')
    # 100 chunks 100 ms apart (10 s): read from the oldest frame held, the resume's second read of
    # the log must come before that frame is evicted (one or two chunks later); 20 ms apart, a
    # loaded machine missed that, and the text message was read from lastSeq (START again).
    a, b = await launch(*lines, delay=0.1), await launch(*lines, delay=0.1)
    endpoint = "ws://127.0.0.1:{}/ws/ws"  # the agui connector at /ws: its WebSocket binding
    ws = await websockets.connect(endpoint.format(a.port), additional_headers=AUTH)
    await ws.send(json.dumps(run_input("t-lease", words(100), run_id="r1")))
    seen = [json.loads(await asyncio.wait_for(ws.recv(), 10)) for _ in range(30)]  # the log keeps the last 16
    ws.transport.abort()
    async with websockets.connect(endpoint.format(b.port), additional_headers=AUTH) as again:
        await again.send(json.dumps({"type": "resume", "threadId": "t-lease", "lastSeq": seen[-1]["seq"]}))
        rest = [json.loads(await asyncio.wait_for(again.recv(), 10)) for _ in range(5)]  # B follows A live
        # Followed from the oldest frame held (the log lost the thread's start): the open text message goes on.
        assert rest[0]["type"] == "TEXT_MESSAGE_CONTENT" and rest[0]["seq"] == seen[-1]["seq"] + 1, rest[0]
        a.proc.kill()  # kill -9: A's lease (30 s) runs on, and nobody takes the cancel
        await asyncio.to_thread(a.proc.wait, 10)
        await again.send(json.dumps({"type": "cancel", "runId": "r1"}))  # while B still follows A
        redis = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
        try:
            key = "connic:{t-lease}:cancel"
            deadline = time.monotonic() + 10
            while (ttl := await redis.pttl(key)) < 0:  # -2 until B's pipeline ran
                assert time.monotonic() < deadline, "the cancel never reached Redis"
                await asyncio.sleep(0.02)
            # 2 x the owner's lease (60 s), not 2 x 10 s: the second follow's lease counts.
            assert 2 * lease * 1000 - 10_000 < ttl <= 2 * lease * 1000, ttl
            assert await redis.lrange(key, 0, -1) == ['"r1"']
        finally:
            await redis.aclose()


@pytest.mark.parametrize("replay_buffer", [16, 4096])
async def test_an_agui_resume_taking_over_a_websocket_resume_keeps_its_lease_for_the_cancels(
    launch: Any,  # noqa: F811  (the fixture imported above)
    clients: Clients,
    redis_server: RedisServer,
    replay_buffer: int,
) -> None:
    # A session of the websocket connector, resumed on B over the Connic protocol (following A,
    # then dead), is resumed again on B over AG-UI with its resume token: the newer resume takes
    # the older over. Its log lost the thread's start (replay_buffer 16): AG-UI follows it from
    # the oldest frame held. Two follows of one session at once on B: the older one's end must not take the
    # AG-UI one's lease with it, or a cancel sent meanwhile is kept 2 x 10 s only.
    lease = 30.0
    agui = ("[[connectors]]", 'transport = "agui"', 'path = "/agui"', f'secrets = ["{SECRET}"]')
    lines = (f"producer_timeout = {lease:g}", f"replay_buffer = {replay_buffer}")
    a, b = await launch(*lines, *agui, *lines), await launch(*lines, *agui, *lines)
    session = ResumeSession(clients, a.url)
    older = await following(session, a, b, words(500))  # B follows A's reply live
    while len(session.transcript.chunks("m1", "assistant")) < 30:  # past the log's 16 frames
        await older.recv()
    last_seq = session.transcript.last_seq - 3  # A logs no more: the AG-UI client has not seen its last frames
    a.proc.kill()  # kill -9: A's lease (30 s) runs on, and nobody takes the cancel
    await asyncio.to_thread(a.proc.wait, 10)
    resume = {"type": "resume", "threadId": session.session_id, "lastSeq": last_seq}
    async with websockets.connect(f"ws://127.0.0.1:{b.port}/agui/ws", additional_headers=AUTH) as newer:
        await newer.send(json.dumps({**resume, "resumeToken": session.resume_token}))
        first = json.loads(await asyncio.wait_for(newer.recv(), 10))
        assert first["seq"] == last_seq + 1, first
        # Whether or not the log lost the thread's start, the open text message goes on.
        assert first["type"] == "TEXT_MESSAGE_CONTENT", first
        code, frames = await older.closed(timeout=10)  # the newer one took the older one over: it ended
        assert code == 4011 and frames[-1]["code"] == "session_taken_over", frames
        await newer.send(json.dumps({"type": "cancel", "runId": "m1"}))  # while B still follows A
        redis = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
        try:
            key = f"connic:{{{session.session_id}}}:cancel"
            deadline = time.monotonic() + 10
            while (ttl := await redis.pttl(key)) < 0:  # -2 until B's pipeline ran
                assert time.monotonic() < deadline, "the cancel never reached Redis"
                await asyncio.sleep(0.02)
            assert 2 * lease * 1000 - 10_000 < ttl <= 2 * lease * 1000, ttl
        finally:
            await redis.aclose()
