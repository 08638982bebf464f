"""A client that floods frames while its resume on process B follows a reply process A answers.

B holds what the client sends until it takes the session over (docs/deployment.md, "Moving a
session that is answering"); a reply of minutes must not let a flood grow B's memory without
limit. Past a bound B answers at once (``queue_full``, unsequenced on B: only A numbers the
session's frames; pings their pong), and what it held is answered once A's reply ends, as on
one process. Real ``python -m connic run``
processes on a real ``redis-server``.
"""

from __future__ import annotations

from typing import Any

import pytest
from redis_server import redis_server_fixture  # noqa: F401  (a fixture)
from resume_helpers import Clients, Conn, clients_fixture, words  # noqa: F401  (a fixture)
from test_redis_held import following, launch, resumed_mid_reply  # noqa: F401  (a fixture)

from connic.transports.ws_bound import SLACK

pytest.importorskip("redis.asyncio", reason="redis-py is not installed (pip install 'connic[redis]')")

MAX_QUEUED = 3
FLOOD = 40
PINGS = 100
Frame = dict[str, Any]


def pongs(conn: Conn) -> int:
    return sum(1 for f in conn.frames if f["type"] == "pong")


async def flood(conn: Conn) -> None:
    for i in range(FLOOD):
        await conn.send({"type": "message", "id": f"f{i}", "payload": {"message": "x" * 1000}})


async def test_a_flood_while_following_is_refused_at_once(launch: Any, clients: Clients) -> None:  # noqa: F811
    a = await launch(f"max_queued = {MAX_QUEUED}")
    b = await launch(f"max_queued = {MAX_QUEUED}")
    session, conn = await following(a, b, clients, words(3000))  # a minute of reply on A
    await flood(conn)
    # Past B's bound each message is refused while A's reply still streams, in order (before the
    # fix nothing came back at all: every frame was held until the reply ended).
    held = 2 * MAX_QUEUED + SLACK
    got = await conn.until(lambda f: f.get("message_id") == f"f{FLOOD - 1}", timeout=20)
    refused = [f for f in got if f["type"] == "error"]
    assert [f["message_id"] for f in refused] == [f"f{i}" for i in range(held, FLOOD)]
    assert {(f["code"], f["id"], "seq" in f) for f in refused} == {("queue_full", None, False)}
    # Pings past the bound get their pong at once.
    for _ in range(PINGS):
        await conn.send({"type": "ping"})
    while pongs(conn) < PINGS:
        await conn.recv()
    assert session.transcript.end("m1", "assistant") is None
    await conn.send({"type": "cancel", "id": "m1"})  # A's reply ends: B takes over, answers what it held
    await conn.until_ended({"m1": ["assistant"], **{f"f{i}": ["assistant"] for i in range(MAX_QUEUED)}}, timeout=20)
    while len(session.transcript.of(f"f{held - 1}")) < 1:
        await conn.recv()
    # What B held is answered as on one process: sequenced queue_full past max_queued.
    acks = [f["id"] for f in session.transcript.ordered() if f["type"] == "ack"]
    assert acks == ["m1", "f0", "f1", "f2"]
    late = [f["id"] for f in session.transcript.ordered() if f.get("code") == "queue_full"]
    assert late == [f"f{i}" for i in range(MAX_QUEUED, held)]
    session.transcript.assert_complete()


async def test_one_process_accepts_the_same_messages(launch: Any, clients: Clients) -> None:  # noqa: F811
    # The same flood on one process (the client resumed there): the same messages accepted.
    session, conn = await resumed_mid_reply(launch, clients, False, f"max_queued = {MAX_QUEUED}")
    await flood(conn)
    got = await conn.until(lambda f: f.get("id") == f"f{FLOOD - 1}", timeout=20)
    refused = [f["id"] for f in got if f["type"] == "error" and f["code"] == "queue_full"]
    assert refused == [f"f{i}" for i in range(MAX_QUEUED, FLOOD)]
    await conn.send({"type": "cancel", "id": "m1"})
    await conn.until_ended({"m1": ["assistant"], **{f"f{i}": ["assistant"] for i in range(MAX_QUEUED)}}, timeout=20)
    acks = [f["id"] for f in session.transcript.ordered() if f["type"] == "ack"]
    assert acks == ["m1", "f0", "f1", "f2"]
