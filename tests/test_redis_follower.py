"""The ``redis`` store's follower (one ``XREAD`` for every followed log) against a real ``redis-server``."""

from __future__ import annotations

import asyncio

import pytest
from redis_server import (
    RedisServer,
    redis_server_fixture,  # noqa: F401  (a fixture)
    redis_store_fixture,  # noqa: F401  (a fixture)
)
from tcp_proxy import TcpProxy

from connic.stores.redis import RedisStore

aioredis = pytest.importorskip("redis.asyncio", reason="redis-py is not installed (pip install 'connic[redis]')")
syncredis = pytest.importorskip("redis")


async def blocked_in_xread(url: str) -> None:
    """Until a client of the server is blocked in ``XREAD`` (bounded)."""
    client = aioredis.Redis.from_url(url, decode_responses=True)
    try:
        for _ in range(250):
            if any(c.get("cmd") == "xread" and "b" in c.get("flags", "") for c in await client.client_list()):
                return
            await asyncio.sleep(0.02)
    finally:
        await client.aclose()
    raise AssertionError("the follower never blocked in XREAD")


async def test_a_log_followed_again_never_gets_entries_a_read_sent_before_holds_again(
    redis_server: RedisServer, store: RedisStore
) -> None:
    # A resume follows a log from seq 0 and goes away (its client left) while the read is
    # under way; frames 1 and 2 are logged, and a new resume reads them with its claim and
    # follows from 2 before the read's reply is handled. That reply must not hand it 1 and 2
    # again: the take would see a gap ("frames trimmed") and refuse the resume.
    key = "connic:{s1}:log"
    follower = store._follower
    old = follower.follow(key, 0)
    await blocked_in_xread(redis_server.url)
    follower.stop(old)
    # A blocking client: the event loop (so the follower) runs only once both frames are logged.
    client = syncredis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        for seq in (1, 2):
            client.xadd(key, {"f": f"frame {seq}"}, id=f"0-{seq}")
    finally:
        client.close()
    new = follower.follow(key, 2)
    try:
        assert await follower.next(new, 0.5) == []
    finally:
        follower.stop(new)


class HeldProxy(TcpProxy):
    """A proxy to ``redis-server`` that holds the first connection made once :attr:`holding` is set, till :attr:`go`."""

    def __init__(self, target_port: int) -> None:
        super().__init__(target_port)
        self.holding = False
        self.arrived = asyncio.Event()
        self.go = asyncio.Event()
        self.closed = asyncio.Event()  # the held connection, forwarded, closed

    async def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        if not self.holding:
            await super()._accept(client_reader, client_writer)
            return
        self.holding = False
        self.arrived.set()
        await self.go.wait()  # its handshake waits: the follower is still connecting
        try:
            await super()._accept(client_reader, client_writer)
        finally:
            self.closed.set()


async def subscribed(url: str) -> None:
    """Until a client of the server listens on the store's cancel channel (bounded)."""
    client = aioredis.Redis.from_url(url, decode_responses=True)
    try:
        for _ in range(250):
            if dict(await client.pubsub_numsub("connic:cancel")).get("connic:cancel"):
                return
            await asyncio.sleep(0.02)
    finally:
        await client.aclose()
    raise AssertionError("the store never subscribed")


async def xread_errors(url: str) -> int:
    """How many ``XREAD`` calls the server answered with an error."""
    client = aioredis.Redis.from_url(url, decode_responses=True)
    try:
        stats = await client.info("commandstats")
    finally:
        await client.aclose()
    xread = stats.get("cmdstat_xread", {})
    return int(xread.get("failed_calls", 0)) + int(xread.get("rejected_calls", 0))


async def test_a_log_no_longer_followed_once_the_reader_connected_is_not_read(redis_server: RedisServer) -> None:
    # The reader connects (a new connection) when a first log is followed; under load that takes
    # a while, and the resume may stop following meanwhile (an AG-UI resume whose log lost the
    # thread's start stops and follows again from further on). It used to send its XREAD then
    # naming no stream: a syntax error, handed to the resume following again by then as
    # StoreUnavailable (RUN_ERROR store_unavailable).
    proxy = await HeldProxy(redis_server.port).start()
    store = RedisStore(RedisStore.Options(url=f"redis://127.0.0.1:{proxy.port}/0"))
    await store.start()
    try:
        await subscribed(redis_server.url)  # its subscriber's connection is made: the next one is the reader's
        proxy.holding = True
        following = store._follower.follow("connic:{s1}:log", 0)
        await asyncio.wait_for(proxy.arrived.wait(), 10)
        store._follower.stop(following)
        proxy.go.set()
        # The reader, connected, finds nothing to follow and lets its connection go.
        await asyncio.wait_for(proxy.closed.wait(), 10)
        assert await xread_errors(redis_server.url) == 0
    finally:
        await store.close()
        await proxy.close()
