"""The redis store's command packing: hiredis's packer, and connic's own for what hiredis refuses.

A streamed frame can hold a lone surrogate (a client's JSON may carry ``"\\ud800"``, and the
frames are encoded with ``ensure_ascii=False``): hiredis's packer refuses it, so such a
batch is packed by connic's own code, which Redis stores as any other bytes. Both packers
must give the RESP redis-py itself would send.
"""

from __future__ import annotations

import json

import pytest
from redis_server import (
    RedisServer,
    redis_server_fixture,  # noqa: F401  (a fixture)
)
from resume_helpers import (
    Clients,
    ResumeSession,
    clients_fixture,  # noqa: F401  (a fixture)
)
from test_redis_store import process

from conftest import StartServer

pytest.importorskip("redis.asyncio", reason="redis-py is not installed (pip install 'connic[redis]')")

from connic.stores.redis.checks import too_old
from connic.stores.redis.connection import _c_packer, _pack


def _resp(*args: bytes) -> bytes:
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        (
            ["EVALSHA", "ab", 2, "k1", "k2", 4096, "héllo 🙂"],
            (b"EVALSHA", b"ab", b"2", b"k1", b"k2", b"4096", "héllo 🙂".encode()),
        ),
        (["SET", "k", "lone \ud800 surrogate"], (b"SET", b"k", b"lone \xed\xa0\x80 surrogate")),
        (["XADD", "k", "", -1, 0], (b"XADD", b"k", b"", b"-1", b"0")),
    ],
)
def test_a_command_packs_as_resp(command: list[str | int], expected: tuple[bytes, ...]) -> None:
    assert _pack(command) == _resp(*expected)


def test_hiredis_packs_when_installed() -> None:
    pytest.importorskip("hiredis")
    assert _c_packer() is not None


async def test_a_lone_surrogate_streamed_is_replayed_from_redis_on_another_process(
    redis_server: RedisServer, start_server: StartServer, clients: Clients
) -> None:
    agents = {"assistant": {"use": "echo"}}
    a = await process(start_server, redis_server.url, agents=agents)
    b = await process(start_server, redis_server.url, agents=agents)
    session = ResumeSession(clients, a.url())
    conn = await session.start()
    text = "before \ud800 after \U0001f642"
    await conn.send({"type": "message", "id": "m1", "payload": {"message": text}})
    await conn.until_ended({"m1": ["assistant"]})
    sent = [f for f in conn.frames if "seq" in f]
    session.drop()
    conn_b = await session.resume(0, url=b.url())  # everything again, from Redis's log
    assert conn_b.connected["resumed"] is True and conn_b.connected["recovered"] is True
    while not conn_b.frames or conn_b.frames[-1]["type"] != "stream_end":  # the transcript has them all
        await conn_b.recv()
    replayed = [f for f in conn_b.frames if "seq" in f]
    assert json.dumps(replayed) == json.dumps(sent)
    assert replayed[-1]["full_response"] == text


@pytest.mark.parametrize(
    ("version", "old"),
    [
        ("5.0.14", True),
        ("6.0.16", True),
        ("6.2.0", False),
        ("7.0.15", False),
        ("7.2.4", False),
        ("10.1", False),
        ("", False),
        ("unknown", False),
    ],
)
def test_a_redis_older_than_6_2_is_refused(version: str, old: bool) -> None:
    # XADD MINID and GETDEL, which the scripts use, came with Redis 6.2.
    assert too_old(version) is old
