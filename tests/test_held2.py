"""The ``redis`` store's pub/sub listener catching up on a Redis that refuses ``GETDEL`` (``-LOADING``).

After the listener subscribes again (its connection lost: Redis restarted), it takes the
takeover flags left meanwhile for the sessions this process owns, one ``GETDEL`` each (sent
together). A Redis that accepts ``SUBSCRIBE`` but refuses ``GETDEL`` (``-LOADING`` while it loads
its data after a restart; ``-READONLY`` on a replica) refuses them all: one warning line for
the catch-up, not one per owned session (a thousand sessions, a thousand lines, at every
reconnection). The flags stay in Redis: the next lease renewal (``RENEW``) takes them, and
acts on them (the owner's connection taken over, 4011).

A real ``redis-server`` (tests/redis_server.py) behind a proxy that answers ``GETDEL`` with
``-LOADING`` while :attr:`Loading.loading` is set (it has Redis itself answer so, through a
script, in order with the other replies); connic runs in this test process; clients are real
``websockets`` clients. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator
from typing import Any

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
from tcp_proxy import TcpProxy
from test_redis_store import config, registry

from conftest import StartServer

aioredis = pytest.importorskip("redis.asyncio", reason="redis-py is not installed (pip install 'connic[redis]')")

_LOADING = b"return redis.error_reply('LOADING Redis is loading the dataset in memory')"
_EVAL = b"*3\r\n$4\r\nEVAL\r\n$%d\r\n%s\r\n$1\r\n0\r\n" % (len(_LOADING), _LOADING)
_GETDEL = re.compile(rb"\*2\r\n\$6\r\nGETDEL\r\n\$(\d+)\r\n")


class Loading(TcpProxy):
    """A proxy to Redis that, while :attr:`loading`, has every ``GETDEL`` answered ``-LOADING`` (by a script).

    Each ``GETDEL`` command (RESP, whole in one read: small writes on loopback) is replaced by
    an ``EVAL`` of a script replying that error: the replies stay in order with the others.
    """

    def __init__(self, target_port: int) -> None:
        super().__init__(target_port)
        self.loading = False
        self.refused = 0  # how many GETDEL commands were answered -LOADING

    def rewrite(self, data: bytes) -> bytes:
        if not self.loading or b"GETDEL" not in data:
            return data
        out, at = bytearray(), 0
        for match in _GETDEL.finditer(data):
            end = match.end() + int(match[1]) + 2  # the key and its CRLF
            out += data[at : match.start()] + _EVAL
            at = end
            self.refused += 1
        return bytes(out + data[at:])

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # As TcpProxy's, each chunk rewritten (only what goes to Redis names GETDEL).
        try:
            while data := await reader.read(65536):
                writer.write(self.rewrite(data))
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
        except (ConnectionError, OSError):
            writer.transport.abort()


@pytest.fixture(name="proxy")
async def proxy_fixture(redis_server: RedisServer) -> AsyncIterator[Loading]:
    proxy = Loading(redis_server.port)
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.close()


async def until(check: Any, what: str, seconds: float = 10) -> None:
    """Until ``check()`` is true, for at most ``seconds`` (then AssertionError: ``what``)."""
    deadline = asyncio.get_running_loop().time() + seconds
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(what)
        await asyncio.sleep(0.05)


_SESSIONS = 6


async def test_a_catch_up_refused_getdel_is_one_warning_not_one_per_owned_session(
    proxy: Loading,
    redis_server: RedisServer,
    start_server: StartServer,
    clients: Clients,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="connic.stores.redis")
    server = await start_server(config(f"redis://127.0.0.1:{proxy.port}/0"), registry=registry())
    sessions = [ResumeSession(clients, server.url()) for _ in range(_SESSIONS)]
    conns = [await session.start() for session in sessions]
    for conn in conns:
        assert await conn.barrier() == []  # owned by this process, attached
    proxy.loading = True
    assert await proxy.cut() >= 1  # Redis restarted: every connection lost, the listener's too
    # The listener subscribes again (after a second) and catches up: each owned session's GETDEL refused.
    await until(lambda: proxy.refused >= _SESSIONS, "the listener never caught up", 15)
    await until(lambda: _flag_warnings(caplog), "no warning about the takeover flags")
    await asyncio.sleep(0.3)  # the other failed GETDELs' callers, had they each logged
    said = _flag_warnings(caplog)
    assert len(said) == 1, said
    assert f"{_SESSIONS} of {_SESSIONS} session" in said[0], said
    # A flag the catch-up could not take (set for the owner's fence, as a resume elsewhere sets
    # it) is still acted on, GETDEL still refused: the lease renewal takes it (RENEW).
    redis = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        sid = sessions[0].session_id
        await redis.set(f"connic:{{{sid}}}:takeover", await redis.get(f"connic:{{{sid}}}:fence"))
    finally:
        await redis.aclose()
    code, _ = await conns[0].closed(timeout=10)
    assert code == 4011
    assert _flag_warnings(caplog) == said
    proxy.loading = False
    for session in sessions[1:]:  # the other sessions go on
        conn = await session.resume()
        assert conn.connected["resumed"] is True


def _flag_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    return [message for message in said if "takeover flag" in message]
