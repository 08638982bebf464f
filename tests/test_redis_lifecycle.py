"""The ``redis`` store: a session's end for good (DELETE) and a session opened again under its id (CREATE).

- A session that ends in the moment after its lease lapsed (Redis unreachable for longer than
  the lease, before the next renewal took it back) is deleted all the same: its DELETE takes
  the lease back as a write does, and a resume with its token then gets a fresh session.
- A DELETE that fails (Redis briefly unreachable at the session's end) is retried in the
  background with backoff; given up after ``DELETE_RETRY_FOR``; a server stopping makes one
  last attempt.
- A session opened again under an id the client names (an AG-UI threadId) gets fencing tokens
  above every one its ended predecessor handed out: a process still holding an old one writes
  nothing into the new session.

A real ``redis-server`` (tests/redis_server.py), reached through a proxy that holds back the
scripts a test names (Redis unreachable for those calls only); "processes" are connic apps in
this test process; clients are real ``websockets`` and HTTP clients. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import AsyncIterator
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
from tcp_proxy import TcpProxy
from test_agui_support import agui_config, agui_registry, post_run, run_input
from test_redis_store import Gated, config, registry

import connic.stores.redis as redis_store
from conftest import Server, StartServer
from connic.app import RUNTIME
from connic.stores.redis import RedisStore, scripts
from connic.stores.redis.keys import session_keys

aioredis = pytest.importorskip("redis.asyncio", reason="redis-py is not installed (pip install 'connic[redis]')")

RENEW_SHA = hashlib.sha1(scripts.RENEW.encode()).hexdigest().encode()  # what an EVALSHA of RENEW carries
DELETE_SHA = hashlib.sha1(scripts.DELETE.encode()).hexdigest().encode()
LEASE = 1.0  # producer_timeout (s) where a lease must lapse
TIMEOUT = 0.5  # the store's timeout (s): a call held back fails this soon


class Holding(TcpProxy):
    """A proxy to Redis that holds back the scripts named in :attr:`holding` (their SHA: how many more, or None: all).

    A held call never reaches Redis, and neither does anything after it on that connection:
    its caller gets no answer within the store's timeout (Redis unreachable, for it).
    """

    def __init__(self, target_port: int) -> None:
        super().__init__(target_port)
        self.holding: dict[bytes, int | None] = {}
        self.held: dict[bytes, int] = {}

    def passes(self, data: bytes) -> bool:
        for sha, left in list(self.holding.items()):
            if sha in data and left != 0:
                self.held[sha] = self.held.get(sha, 0) + 1
                if left is not None:
                    self.holding[sha] = left - 1
                return False
        return True


@pytest.fixture(name="proxy")
async def proxy_fixture(redis_server: RedisServer) -> AsyncIterator[Holding]:
    proxy = Holding(redis_server.port)
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.close()


async def through(start_server: StartServer, proxy: Holding, producer_timeout: float = 5) -> Server:
    """A connic "process" (WebSocket connector) whose store reaches Redis through ``proxy``."""
    data = config(f"redis://127.0.0.1:{proxy.port}/0", {"producer_timeout": producer_timeout})
    data["store"]["timeout"] = TIMEOUT
    return await start_server(data, registry=registry())


def key(session_id: str, name: str) -> str:
    return f"connic:{{{session_id}}}:{name}"


async def until(check: Any, what: str, seconds: float = 10) -> None:
    """Until ``await check()`` is true, for at most ``seconds`` (then AssertionError: ``what``)."""
    deadline = asyncio.get_running_loop().time() + seconds
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(what)
        await asyncio.sleep(0.05)


async def gone(redis: Any, session_id: str, seconds: float = 10) -> bool:
    """Whether every key of the session is gone from Redis within ``seconds``."""
    try:
        await until(lambda: _no_keys(redis, session_id), "", seconds)
    except AssertionError:
        return False
    return True


async def _no_keys(redis: Any, session_id: str) -> bool:
    return not await redis.keys(f"connic:{{{session_id}}}:*")


async def ended_with_goodbye(session: ResumeSession, conn: Any) -> None:
    """The client says goodbye (close 1000): the session ends for good."""
    await conn.ws.close(1000)


async def resumes_fresh(session: ResumeSession) -> None:
    """A resume with the ended session's token gets a fresh session, not the ended one back."""
    again = await session.resume()
    assert again.connected["resumed"] is False, again.connected


# --- (a) a session ending just after its lease lapsed ----------------------------------------


async def test_a_session_ending_after_its_lease_lapsed_unnoticed_is_deleted_and_stays_ended(
    redis_server: RedisServer, redis: Any, proxy: Holding, start_server: StartServer, clients: Clients
) -> None:
    # Redis unreachable for the renewals for longer than the lease: it lapses in Redis, nobody
    # claims the session meanwhile. The client says goodbye then, before any renewal gets through:
    # DELETE found no owner and deleted nothing, so the ended session stayed in Redis until its
    # keys expired (an hour and more) and a resume with its token brought it back.
    server = await through(start_server, proxy, producer_timeout=LEASE)
    session = ResumeSession(clients, server.url())
    conn = await session.start()
    assert await conn.barrier() == []
    proxy.holding[RENEW_SHA] = None
    await until(lambda: _lapsed(redis, session.session_id), "the lease never lapsed")
    await ended_with_goodbye(session, conn)
    assert await gone(redis, session.session_id), await redis.keys("*")
    await resumes_fresh(session)


async def _lapsed(redis: Any, session_id: str) -> bool:
    return bool(await redis.exists(key(session_id, "record")) and not await redis.exists(key(session_id, "owner")))


async def test_an_ended_sessions_delete_leaves_a_session_another_process_claimed_since(
    redis_server: RedisServer,
    redis: Any,
    proxy: Holding,
    start_server: StartServer,
    clients: Clients,
) -> None:
    # The other side of the same rule: A's lease lapsed and B claimed the session meanwhile (a
    # resume there); A's copy ends afterwards (its client's goodbye reached A first). A's DELETE
    # must not take back nor delete what B owns now: B's client goes on with its session.
    a = await through(start_server, proxy, producer_timeout=LEASE)
    b = await start_server(config(redis_server.url, {"producer_timeout": 30}), registry=registry())
    session = ResumeSession(clients, a.url())
    conn_a = await session.start()
    assert await conn_a.barrier() == []
    proxy.holding[RENEW_SHA] = None
    await until(lambda: _lapsed(redis, session.session_id), "the lease never lapsed")
    conn_b = await session.resume(url=b.url())  # B claims it: A is told, but its pub/sub may lag
    assert conn_b.connected["resumed"] is True, conn_b.connected
    await conn_a.ws.close(1000)
    runtime = a.server.app[RUNTIME]

    async def ended_on_a() -> bool:
        return not runtime.transports[0].connections

    await until(ended_on_a, "A never ended its copy")
    await runtime.store.flush()  # A's DELETE is written (it is queued as the session ends)
    assert await redis.exists(key(session.session_id, "record")) == 1
    assert (await conn_b.barrier()) == []  # B's connection is untouched


# --- (b) a DELETE that fails -----------------------------------------------------------------


async def test_a_delete_that_fails_is_retried_until_the_session_is_gone(
    redis_server: RedisServer,
    redis: Any,
    proxy: Holding,
    start_server: StartServer,
    clients: Clients,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Redis does not answer the session's DELETE, twice: it was never retried, so the ended
    # session lived until its keys expired and a resume with its token brought it back.
    server = await through(start_server, proxy)
    session = ResumeSession(clients, server.url())
    conn = await session.start()
    assert await conn.barrier() == []
    proxy.holding[DELETE_SHA] = 2
    caplog.set_level(logging.INFO, "connic.stores.redis")
    await ended_with_goodbye(session, conn)
    assert await gone(redis, session.session_id), await redis.keys("*")
    assert proxy.held[DELETE_SHA] == 2
    await resumes_fresh(session)
    said = [r.getMessage() for r in caplog.records if session.session_id in r.getMessage()]
    assert [m for m in said if "retrying in the background" in m] != [], said
    assert [m for m in said if "ended in Redis after 2 retries" in m] != [], said


async def test_a_delete_that_keeps_failing_is_given_up_with_one_line(
    redis_server: RedisServer,
    redis: Any,
    proxy: Holding,
    start_server: StartServer,
    clients: Clients,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(redis_store, "DELETE_RETRY_FOR", 2.0, raising=False)  # instead of minutes
    server = await through(start_server, proxy)
    session = ResumeSession(clients, server.url())
    conn = await session.start()
    assert await conn.barrier() == []
    proxy.holding[DELETE_SHA] = None
    await ended_with_goodbye(session, conn)

    async def given_up() -> bool:
        return any("given up" in r.getMessage() for r in caplog.records)

    await until(given_up, "the DELETE was never given up", 15)
    tries = proxy.held[DELETE_SHA]
    assert 2 <= tries <= 5, tries  # backoff: 0.5 s, 1 s, 2 s between tries, each failing after 0.5 s
    await asyncio.sleep(2.5)  # longer than the last wait between tries
    assert proxy.held[DELETE_SHA] == tries  # no try after giving up
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len([m for m in said if session.session_id in m]) == 2, said  # retrying, then given up


async def test_a_server_stopping_makes_one_last_attempt_at_a_failed_delete(
    redis_server: RedisServer,
    redis: Any,
    proxy: Holding,
    start_server: StartServer,
    clients: Clients,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(redis_store, "DELETE_RETRY_FIRST", 60.0, raising=False)  # no retry before the stop
    server = await through(start_server, proxy)
    session = ResumeSession(clients, server.url())
    conn = await session.start()
    assert await conn.barrier() == []
    proxy.holding[DELETE_SHA] = 1
    await ended_with_goodbye(session, conn)

    async def failed() -> bool:  # the one warning naming the session: its DELETE failed
        return any(session.session_id in r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)

    await until(failed, "the DELETE never failed")
    await asyncio.wait_for(server.server.close(), 10)  # not held up by the retry's 60 s
    assert await gone(redis, session.session_id, 1), await redis.keys("*")


# --- (c) a session opened again under the id the client names --------------------------------


async def test_a_thread_opened_again_after_its_session_ended_gets_fences_above_the_old_ones(
    redis_server: RedisServer, redis: Any, start_server: StartServer
) -> None:
    # An AG-UI thread's session ends for good (its message limit), and the thread is opened again:
    # CREATE restarted the fencing counter at 1, so the new session's owner held the very token a
    # process of the old session may still hold (its lease lapsed unnoticed), and that process's
    # writes passed the new session's fence. Its write is played here by the script it would send.
    reg = agui_registry()
    reg.register("stores", "redis", RedisStore)
    reg.register("agents", "gated", Gated)
    data = agui_config({"max_messages": 2}, {"assistant": {"use": "gated"}})
    data["store"] = {"use": "redis", "url": redis_server.url, "timeout": 2}
    server = await start_server(data, registry=reg)
    url = server.http + "/agui"
    thread = "thread-again"
    owner = key(thread, "owner")

    async def owned_during_a_run(text: str, meanwhile: Any = None) -> str:
        """The token owning the thread's session while a run of ``text`` streams (``meanwhile`` awaited then)."""
        Gated.gate = asyncio.Event()
        run = asyncio.create_task(post_run(url, run_input(thread, text)))
        try:
            await until(lambda: redis.exists(owner), "the run never owned the thread")
            token: str = await redis.get(owner)
            if meanwhile is not None:
                await meanwhile()
        finally:
            Gated.gate.set()
        status, _ = await run
        assert status == 200
        return token

    old = [await owned_during_a_run("one"), await owned_during_a_run("two")]
    await post_run(url, run_input(thread, "three"))  # over the limit: the session ends
    assert await gone(redis, thread), await redis.keys("*")
    keys = session_keys("connic:", thread)

    async def stale_writes() -> None:
        # What a process still holding a token of the old session sends: an APPEND to the replay log.
        length = await redis.xlen(keys[3])
        for token in old:
            written = await redis.eval(scripts.APPEND, len(keys), *keys, token, 0, 60000, 10**9, '{"type":"x"}', 1000)
            assert written == 0, (token, written)  # another process owns it: refused
        assert await redis.xlen(keys[3]) == length

    new = await owned_during_a_run("again", stale_writes)
    assert int(new) > max(int(token) for token in old), (old, new)
