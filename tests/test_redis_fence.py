"""The ``redis`` store: a resume that fails once it owns the session lets the session go at once.

Taking a session over claims it in Redis (its ownership key and fencing token) before the
record is read and the session rebuilt. When what follows the claim fails (the record or
its history does not decode or cannot be rebuilt, a store call times out, the client goes
away mid-resume), that process must stop owning it: else it renews the lease for ever with
no live session, and every other resume waits on that lease, so the conversation is lost.

A real ``redis-server`` (tests/redis_server.py); "processes" are connic apps in this test
process sharing it (as in tests/test_redis_store.py), clients real ``websockets`` clients.
``producer_timeout`` is 30 s: a lease nobody renews would run out only after every bound here.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from redis_server import (
    RedisServer,
    redis_client_fixture,  # noqa: F401  (a fixture)
    redis_server_fixture,  # noqa: F401  (a fixture)
)
from resume_helpers import (
    Clients,
    Conn,
    ResumeSession,
    Transcript,
    clients_fixture,  # noqa: F401  (a fixture)
)
from tcp_proxy import TcpProxy
from test_redis_store import chat, history, process, wait_until_let_go

from conftest import StartServer
from connic.app import RUNTIME

aioredis = pytest.importorskip("redis.asyncio", reason="redis-py is not installed (pip install 'connic[redis]')")

LONG_LEASE = {"producer_timeout": 30}


def key(session: ResumeSession, name: str) -> str:
    return f"connic:{{{session.session_id}}}:{name}"


async def let_go_on(url: str, clients: Clients, redis_url: str) -> ResumeSession:
    """A session on the process at ``url``, one exchange in it, then dropped and let go."""
    session = ResumeSession(clients, url)
    conn = await session.start()
    await chat(conn, "m1", "kept")
    session.drop()
    await wait_until_let_go(redis_url, session.session_id)
    return session


async def resume_refused(session: ResumeSession, url: str) -> tuple[int | None, list[dict[str, Any]]]:
    """Resume at ``url`` expecting no ``connected``: the close code and the frames before it."""
    conn = await session.clients.open(url, Transcript())
    await conn.send(session.resume_frame(secret=session.secret))
    return await conn.closed(timeout=15)


async def resumes_whole(session: ResumeSession, url: str) -> Conn:
    """Resume at ``url``: the same session, its history, and a new exchange answered."""
    conn = await session.resume(url=url)
    assert conn.connected["resumed"] is True and conn.connected["session_id"] == session.session_id, conn.connected
    await chat(conn, "m2", "again")  # answered only once this process owns the session
    entries = await history(conn)
    assert [(e["role"], e["id"]) for e in entries] == [("user", "m1"), ("agent", "m1"), ("user", "m2"), ("agent", "m2")]
    assert [e["text"] for e in entries if e["role"] == "user"] == ["kept", "again"]
    return conn


def assert_warned_once(caplog: pytest.LogCaptureFixture, session: ResumeSession) -> None:
    """One warning names the session, and nothing was logged as an error (no unhandled exception)."""
    records = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert not [r for r in records if r.levelno >= logging.ERROR], [r.getMessage() for r in records]
    let_go = [r for r in records if session.session_id in r.getMessage() and "let go" in r.getMessage()]
    assert len(let_go) == 1, [r.getMessage() for r in records]


async def corrupt(redis: Any, session: ResumeSession, what: str) -> Callable[[], Awaitable[None]]:
    """Put a value that does not decode in the session's ``what`` in Redis; how to repair it."""
    name = key(session, what)
    if what == "history":
        kept = await redis.lindex(name, 0)
        await redis.lset(name, 0, "not json")
        return lambda: redis.lset(name, 0, kept)
    # A frame logged after the last save, as an owner that died mid-reply leaves: a take reads the log.
    entries = await redis.xrange(name)
    newest = int(entries[-1][0].split("-")[1])
    await redis.xadd(name, {"f": "not json"}, id=f"0-{newest + 1}")

    async def repair() -> None:  # the log as it was (XDEL would leave its top id above the next frame's)
        await redis.delete(name)
        for entry_id, fields in entries:
            await redis.xadd(name, fields, id=entry_id)

    return repair


@pytest.mark.parametrize("what", ["history", "log"])
async def test_data_that_does_not_decode_fails_the_resume_and_lets_the_session_go(
    redis_server: RedisServer,
    redis: Any,
    start_server: StartServer,
    clients: Clients,
    caplog: pytest.LogCaptureFixture,
    what: str,
) -> None:
    a = await process(start_server, redis_server.url, connector=LONG_LEASE)
    b = await process(start_server, redis_server.url, connector=LONG_LEASE)
    session = await let_go_on(a.url(), clients, redis_server.url)
    repair = await corrupt(redis, session, what)
    caplog.clear()
    code, frames = await resume_refused(session, b.url())
    assert code == 1011 and [f["code"] for f in frames if f["type"] == "error"] == ["store_unavailable"], frames
    await wait_until_let_go(redis_server.url, session.session_id)  # B owns it no more (not renewed for ever)
    assert_warned_once(caplog, session)
    await repair()
    await resumes_whole(session, b.url())  # the process that failed takes it again


async def test_a_record_that_cannot_be_rebuilt_fails_the_resume_and_lets_the_session_go(
    redis_server: RedisServer, redis: Any, start_server: StartServer, clients: Clients, caplog: pytest.LogCaptureFixture
) -> None:
    # The record decodes (the store reads it), but an agent's state in it is no mapping:
    # rebuilding the session (the session core, after the store took it) fails.
    inspect = {"assistant": {"use": "inspect"}}
    a = await process(start_server, redis_server.url, connector=LONG_LEASE, agents=inspect)
    b = await process(start_server, redis_server.url, connector=LONG_LEASE, agents=inspect)
    session = await let_go_on(a.url(), clients, redis_server.url)
    kept = await redis.get(key(session, "record"))
    record = json.loads(kept)
    assert record["states"]["assistant"]["turns"] == 1
    record["states"]["assistant"] = 7
    await redis.set(key(session, "record"), json.dumps(record), keepttl=True)
    caplog.clear()
    code, frames = await resume_refused(session, b.url())
    assert code == 1011 and [f["code"] for f in frames if f["type"] == "error"] == ["store_unavailable"], frames
    await wait_until_let_go(redis_server.url, session.session_id)
    assert_warned_once(caplog, session)
    await redis.set(key(session, "record"), kept, keepttl=True)
    conn = await resumes_whole(session, a.url())
    seen = json.loads(session.transcript.end("m2", "assistant")["full_response"])  # type: ignore[index]
    assert seen["state"]["turns"] == 2  # the agent's own state came back whole
    assert conn.connected["session_id"] == session.session_id


class Stalling(TcpProxy):
    """A proxy to Redis whose connections stop forwarding at the first ``XRANGE`` while :attr:`stalling`.

    ``XRANGE`` is what a take sends after its claim when the owner died mid-reply (it reads
    which replies did not end): a call that hangs once the claim succeeded.
    """

    def __init__(self, target_port: int) -> None:
        super().__init__(target_port)
        self.stalling = False
        self.stalled = asyncio.Event()

    def passes(self, data: bytes) -> bool:
        if self.stalling and b"XRANGE" in data:
            self.stalled.set()
            return False  # neither this nor anything after it reaches Redis
        return True


@pytest.fixture
async def stalling(redis_server: RedisServer) -> AsyncIterator[Stalling]:
    proxy = Stalling(redis_server.port)
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.close()


async def died_mid_reply(redis: Any, session: ResumeSession) -> None:
    """Mark the session's record as a process that died answering leaves it (busy): a take then reads its log."""
    record = json.loads(await redis.get(key(session, "record")))
    record["busy"] = True
    await redis.set(key(session, "record"), json.dumps(record), keepttl=True)


async def resume_stalled(session: ResumeSession, url: str, stalling: Stalling, how: str) -> None:
    """Resume at ``url`` until its ``XRANGE`` stalls; then, by ``how``, its store call times out or the client drops.

    "timeout": no answer within the store's timeout (2 s): store_unavailable (1011).
    "client_gone": the client drops while it is in flight. The proxy forwards again after.
    """
    conn = await session.clients.open(url, Transcript())
    await conn.send(session.resume_frame(secret=session.secret))
    await asyncio.wait_for(stalling.stalled.wait(), 10)
    if how == "timeout":
        code, frames = await conn.closed(timeout=15)
        assert code == 1011 and [f["code"] for f in frames if f["type"] == "error"] == ["store_unavailable"], frames
    else:
        conn.drop()
    stalling.stalling = False


@pytest.mark.parametrize("how", ["timeout", "client_gone"])
async def test_a_take_whose_log_read_fails_lets_the_session_go(
    redis_server: RedisServer,
    redis: Any,
    stalling: Stalling,
    start_server: StartServer,
    clients: Clients,
    caplog: pytest.LogCaptureFixture,
    how: str,
) -> None:
    # B reaches Redis through the proxy. "timeout": the XRANGE after B's claim gets no answer
    # within the store's timeout (2 s): StoreUnavailable. "client_gone": the resuming client
    # drops while it is in flight, and the test server (aiohttp's handler_cancellation)
    # cancels the resume: the cancellation propagates, and the session is let go all the same.
    a = await process(start_server, redis_server.url, connector=LONG_LEASE)
    b = await process(start_server, f"redis://127.0.0.1:{stalling.port}/0", connector=LONG_LEASE)
    session = await let_go_on(a.url(), clients, redis_server.url)
    await died_mid_reply(redis, session)
    stalling.stalling = True
    caplog.clear()
    await resume_stalled(session, b.url(), stalling, how)
    await wait_until_let_go(redis_server.url, session.session_id)
    assert_warned_once(caplog, session)
    await resumes_whole(session, b.url())


@pytest.mark.parametrize("seq", [None, "7"])
async def test_a_record_whose_seq_is_no_number_fails_the_resume_and_lets_the_session_go(
    redis_server: RedisServer,
    redis: Any,
    start_server: StartServer,
    clients: Clients,
    caplog: pytest.LogCaptureFixture,
    seq: Any,
) -> None:
    # The record decodes, but its seq is no number: the take compares it with the log's
    # newest frame, after the claim and outside the decoding. Still store_unavailable
    # (1011, said in an error frame), not an unhandled exception, and the session let go.
    a = await process(start_server, redis_server.url, connector=LONG_LEASE)
    b = await process(start_server, redis_server.url, connector=LONG_LEASE)
    session = await let_go_on(a.url(), clients, redis_server.url)
    kept = await redis.get(key(session, "record"))
    record = json.loads(kept)
    record["seq"] = seq
    await redis.set(key(session, "record"), json.dumps(record), keepttl=True)
    caplog.clear()
    code, frames = await resume_refused(session, b.url())
    assert code == 1011 and [f["code"] for f in frames if f["type"] == "error"] == ["store_unavailable"], frames
    await wait_until_let_go(redis_server.url, session.session_id)
    assert_warned_once(caplog, session)
    await redis.set(key(session, "record"), kept, keepttl=True)
    await resumes_whole(session, b.url())


@pytest.mark.parametrize("how", ["timeout", "client_gone"])
async def test_a_resume_whose_replay_fails_after_the_take_lets_the_session_go(
    redis_server: RedisServer,
    stalling: Stalling,
    start_server: StartServer,
    clients: Clients,
    how: str,
) -> None:
    # The take succeeds (its claim reads the log in its script; the owner did not die mid-reply,
    # so no XRANGE); the replay that follows reads the log with XRANGE, which stalls. The session
    # was rebuilt here but never attached: it must not stay owned by B for ever.
    a = await process(start_server, redis_server.url, connector=LONG_LEASE)
    b = await process(start_server, f"redis://127.0.0.1:{stalling.port}/0", connector=LONG_LEASE)
    session = await let_go_on(a.url(), clients, redis_server.url)
    stalling.stalling = True
    await resume_stalled(session, b.url(), stalling, how)
    await wait_until_let_go(redis_server.url, session.session_id)
    await resumes_whole(session, a.url())  # another process takes it


async def test_a_resume_cancelled_as_its_take_completes_lets_the_session_go(
    redis_server: RedisServer, start_server: StartServer, clients: Clients
) -> None:
    # A resume's handler awaits the find (the take from the store) in a task of its own while it
    # reads the socket (ws_resume._reading_meanwhile). Cancelled (aiohttp cancels a handler whose
    # client went away, or at shutdown) in the very step in which that task completes with the
    # session it took over, the session was neither replayed nor attached: it must be let go, not
    # owned by B for ever. The step is made exact by cancelling the handler from inside B's find
    # as it returns; the find, the take and Redis are real.
    a = await process(start_server, redis_server.url, connector=LONG_LEASE)
    b = await process(start_server, redis_server.url, connector=LONG_LEASE)
    session = await let_go_on(a.url(), clients, redis_server.url)
    sessions = b.server.app[RUNTIME].transports[0].sessions
    find = sessions.find
    taken: list[Any] = []

    def find_then_cancel(*args: Any, **kwargs: Any) -> Awaitable[Any]:
        handler = asyncio.current_task()  # the call is made in the handler's task
        assert handler is not None

        async def finding() -> Any:
            found = await find(*args, **kwargs)
            taken.append(found)
            handler.cancel()
            return found

        return finding()

    sessions.find = find_then_cancel
    conn = await session.clients.open(b.url(), Transcript())
    await conn.send(session.resume_frame(secret=session.secret))
    await conn.closed(timeout=15)
    assert taken and taken[0] is not None and taken[0].id == session.session_id, taken  # B took it over
    await wait_until_let_go(redis_server.url, session.session_id)
    await resumes_whole(session, a.url())  # another process takes it
