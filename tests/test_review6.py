"""Review 6: the redis store's write-back, lease renewal and limits against real processes.

Real ``python -m connic run`` processes on a private ``redis-server`` (tests/redis_server.py),
some through a TCP proxy that holds one write on its way (a slow Redis, a congested link);
real ``websockets`` clients. Every wait is bounded; no assertion is on a duration.
"""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

import test_redis_writeback
from redis_server import (
    RedisServer,
    flush,
    redis_server_fixture,  # noqa: F401  (a fixture)
)
from resume_helpers import (
    Clients,
    ResumeSession,
    clients_fixture,  # noqa: F401  (a fixture)
    words,
)
from tcp_proxy import TcpProxy

from connic.stores.redis import scripts

connic_run = test_redis_writeback.connic_run  # the fixture: python -m connic run, its echo agent's delay given

APPEND_SHA = hashlib.sha1(scripts.APPEND.encode()).hexdigest().encode()  # what an EVALSHA of APPEND carries


class HoldingOnce(TcpProxy):
    """A proxy to Redis that, once :attr:`hold` is set, holds the next write carrying an APPEND that long.

    Only that one write, on its one connection: the process's other calls go through meanwhile,
    as they do when one of its pooled connections is slow. :attr:`held` is set once it holds it.
    """

    def __init__(self, target_port: int) -> None:
        super().__init__(target_port)
        self.hold = 0.0
        self.held = asyncio.Event()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                if self.hold and APPEND_SHA in data:
                    hold, self.hold = self.hold, 0.0
                    self.held.set()
                    await asyncio.sleep(hold)
                writer.write(data)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
        except (ConnectionError, OSError):
            writer.transport.abort()


async def test_a_write_sent_before_redis_lost_its_data_and_run_after_the_write_back_takes_nothing_over(
    connic_run: Any, clients: Clients, redis_server: RedisServer
) -> None:
    # A batch of the session's frames (APPEND, under the fencing token A held) is on its way, slow,
    # when Redis loses its data. Meanwhile A's renewal finds the session gone and writes it back:
    # a new fencing token. The slow APPEND then runs and is refused for the old token: A took that
    # for another process owning the session and closed the connection with session_taken_over
    # (4011, final for clients) although nobody took it over: A itself holds it.
    proxy = HoldingOnce(redis_server.port)
    await proxy.start()
    try:
        a = await connic_run(0.02, 1.0, url=f"redis://127.0.0.1:{proxy.port}/0", timeout=5.0)
        session = ResumeSession(clients, a.url)
        conn = await session.start()
        text = words(200)  # 200 chunks 20 ms apart
        await conn.send({"type": "message", "id": "m1", "payload": {"message": text}})
        await conn.until(lambda f: f.get("type") == "stream_chunk")
        proxy.hold = 2.0
        await asyncio.wait_for(proxy.held.wait(), 10)  # an APPEND is on its way, not yet run
        flush(redis_server.url)
        await conn.until_ended({"m1": ["assistant"]}, timeout=30)
        end = session.transcript.end("m1", "assistant")
        assert end is not None and end["full_response"] == text
        await conn.send({"type": "message", "id": "m2", "payload": {"message": "next"}})
        await conn.until_ended({"m2": ["assistant"]}, timeout=10)
    finally:
        await proxy.close()
