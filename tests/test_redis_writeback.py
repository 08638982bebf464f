"""Redis losing its data under live sessions: the processes holding them write them back.

A Redis restarted without its data (or a FLUSHALL) used to end every live session with
``store_unavailable`` (1011): a resume then got a fresh session, and every conversation was
lost although each process still held its sessions whole. Real ``python -m connic run``
processes on a private ``redis-server`` (tests/redis_server.py), real ``websockets``
clients; every wait is bounded. tests/test_ops_attack.py has the rest of Redis's failures,
and tests/test_redis_lifecycle.py a session that must stay ended.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import test_ops_attack
from redis_server import (
    RedisServer,
    flush,
    redis_server_fixture,  # noqa: F401  (a fixture)
    store_plugin_env,
)
from resume_helpers import (
    Clients,
    ResumeSession,
    clients_fixture,  # noqa: F401  (a fixture)
    words,
)
from tcp_proxy import TcpProxy
from test_redis_fleet import chat
from websockets.exceptions import ConnectionClosed

from conftest import SECRET, CliServer, start_cli
from connic.stores.redis import scripts

PRODUCER_TIMEOUT = test_ops_attack.PRODUCER_TIMEOUT
served = test_ops_attack.served  # the fixture: python -m connic run on the test's redis-server


async def _history(conn: Any) -> list[tuple[str, str]]:
    """The session's history as (role, text) pairs, asked for on ``conn``."""
    await conn.send({"type": "history"})
    frames = await conn.until_type("history")
    return [(entry["role"], entry["text"]) for entry in frames[-1]["entries"]]


async def _keys(redis_url: str) -> int:
    import redis.asyncio as aioredis

    admin = aioredis.Redis.from_url(redis_url)
    try:
        return int(await admin.dbsize())
    finally:
        await admin.aclose()


async def test_an_idle_session_goes_on_with_its_conversation_after_redis_lost_its_data(
    served: Any, clients: Clients, redis_server: RedisServer
) -> None:
    a, b = await served(), await served()
    session = ResumeSession(clients, a.url)
    conn = await session.start()
    assert (await chat(conn, "m1", "before the loss"))["full_response"] == "before the loss"
    flush(redis_server.url)
    # A few lease renewals: each finds the session gone from Redis.
    await asyncio.sleep(PRODUCER_TIMEOUT * 2)
    assert await _keys(redis_server.url) > 0, "nothing was written back"
    # The connection goes on, and the conversation with it.
    assert (await chat(conn, "m2", "after the loss"))["full_response"] == "after the loss"
    expected = [
        ("user", "before the loss"),
        ("agent", "before the loss"),
        ("user", "after the loss"),
        ("agent", "after the loss"),
    ]
    assert await _history(conn) == expected
    # Redis has it whole again: a resume on the other process finds it, history and all.
    session.drop()
    again = await session.resume(url=b.url)
    assert again.connected["resumed"] is True, again.connected
    assert await _history(again) == expected


async def test_a_reply_streaming_when_redis_lost_its_data_ends_whole_and_the_session_goes_on(
    served: Any, clients: Clients, redis_server: RedisServer
) -> None:
    a, b = await served(), await served()
    session = ResumeSession(clients, a.url)
    conn = await session.start()
    text = words(150)  # 150 chunks 10 ms apart
    await conn.send({"type": "message", "id": "m1", "payload": {"message": text}})
    await conn.until(lambda f: f.get("type") == "stream_chunk")
    flush(redis_server.url)
    await conn.until_ended({"m1": ["assistant"]}, timeout=20)
    end = session.transcript.end("m1", "assistant")
    assert end is not None and end["full_response"] == text
    assert (await chat(conn, "m2", "next"))["full_response"] == "next"
    # Resumed on the other process from the end: the frames after it are in the new log.
    session.drop()
    again = await session.resume(url=b.url)
    assert again.connected["resumed"] is True, again.connected
    assert await _history(again) == [("user", text), ("agent", text), ("user", "next"), ("agent", "next")]


async def test_a_resume_following_the_reply_on_another_process_when_redis_lost_its_data_is_told_of_the_gap(
    served: Any, clients: Clients, redis_server: RedisServer
) -> None:
    # The client resumed on B while A answers: B follows A's replay log. The frames A wrote
    # just before the loss are gone from the log A writes back: the client must never get
    # what follows them as if nothing was missing. B's resume ends as a store failure (1011),
    # and the client's next resume says `recovered: false` (PROTOCOL.md §7: frames are
    # missing; `history` has the conversation); the reply still ends whole.
    a, b = await served(), await served()
    session = ResumeSession(clients, a.url)
    conn = await session.start()
    text = words(300)  # 300 chunks 10 ms apart
    await conn.send({"type": "message", "id": "m1", "payload": {"message": text}})
    while len(session.transcript.chunks("m1", "assistant")) < 3:
        await conn.recv()
    session.drop()
    conn = await session.resume(url=b.url)
    assert conn.connected["resumed"] is True, conn.connected
    while len(session.transcript.chunks("m1", "assistant")) < 20:
        await conn.recv()
    flush(redis_server.url)
    told: list[int] = []  # the last_seq of each resume that said frames after it are missing
    for _ in range(5):
        try:
            await conn.until_ended({"m1": ["assistant"]}, timeout=20)
            break
        except ConnectionClosed:
            code, frames = await conn.closed(timeout=5)
            assert code == 1011, (code, frames)
            last_seq = session.transcript.last_seq
            conn = await session.resume(url=b.url)
            if conn.connected["recovered"] is False:
                told.append(last_seq)
    end = session.transcript.end("m1", "assistant")
    assert end is not None and end["full_response"] == text
    seqs = [f["seq"] for f in session.transcript.ordered()]
    gaps = [before for before, after in itertools.pairwise(seqs) if after != before + 1]
    assert all(gap in told for gap in gaps), f"frames missing after seq {gaps}, resumes told of {told}"


async def _session_keys(redis_url: str, session_id: str) -> list[str]:
    import redis.asyncio as aioredis

    admin = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        return sorted(await admin.keys(f"connic:{{{session_id}}}:*"))
    finally:
        await admin.aclose()


async def _until_no_keys(redis_url: str, session_id: str) -> None:
    for _ in range(200):
        if not await _session_keys(redis_url, session_id):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"session {session_id} still in Redis: {await _session_keys(redis_url, session_id)}")


async def test_a_session_made_just_after_redis_lost_its_data_then_ended_elsewhere_stays_ended(
    served: Any, clients: Clients, redis_server: RedisServer
) -> None:
    # A session created after a FLUSHALL but before its process read the epoch again was held as
    # made under the epoch from before the loss. Later its lease lapsed unnoticed (the process
    # stalled), a resume took it on the other process, and its client said goodbye there: the
    # session ended for good. The stalled process then found it gone, saw "another epoch" and
    # wrote it back: a session ended by its client's goodbye came back, its token resumable.
    a, b = await served(), await served()
    flush(redis_server.url)
    session = ResumeSession(clients, a.url)  # at once: A reads the epoch again once a second
    conn_a = await session.start()
    assert await conn_a.barrier() == []
    await asyncio.sleep(PRODUCER_TIMEOUT)  # A renews (and reads the epoch) a few times
    os.kill(a.proc.pid, signal.SIGSTOP)  # A stalls: its lease lapses unnoticed
    try:
        await asyncio.sleep(PRODUCER_TIMEOUT * 2.5)
        conn_b = await session.resume(url=b.url)
        assert conn_b.connected["resumed"] is True, conn_b.connected
        await conn_b.ws.close(1000)  # goodbye: the session ends for good
        await _until_no_keys(redis_server.url, session.session_id)
    finally:
        os.kill(a.proc.pid, signal.SIGCONT)
    # A finds the session gone at its next renewals: it must stay so, and A's copy stops.
    await asyncio.sleep(PRODUCER_TIMEOUT * 2)
    assert await _session_keys(redis_server.url, session.session_id) == [], "the ended session came back"
    again = await session.resume(url=b.url)
    assert again.connected["resumed"] is False, again.connected
    code, _ = await conn_a.closed(timeout=PRODUCER_TIMEOUT * 10)
    assert code == 1011


@pytest.fixture
def connic_run(tmp_path: Path, redis_server: RedisServer) -> Iterator[Any]:
    """``connic_run(delay, producer_timeout, url=..., timeout=..., connector=...)``: a ``python -m connic run``
    whose echo agent waits ``delay`` before each word, on ``url`` (default: ``redis_server``), ``connector``
    more keys of its connector (TOML lines); killed at the end.
    """
    pytest.importorskip("redis.asyncio", reason="redis-py is not installed (pip install 'connic[redis]')")
    env = store_plugin_env(tmp_path / "plugins")
    started: list[CliServer] = []

    async def start(
        delay: float, producer_timeout: float, url: str = redis_server.url, timeout: float = 0.5, connector: str = ""
    ) -> Any:
        config = tmp_path / f"connic{len(started)}.toml"
        config.write_text(
            f'[agents.assistant]\nuse = "echo"\ndelay = {delay}\n'
            f'[[connectors]]\npath = "/ws"\nsecrets = ["{SECRET}"]\nproducer_timeout = {producer_timeout}\n'
            f"{connector}"
            f'[store]\nuse = "redis"\nurl = "{url}"\ntimeout = {timeout}\n'
        )
        server = await asyncio.to_thread(start_cli, "--config", str(config), env=env)
        started.append(server)
        threading.Thread(target=server.proc.communicate, daemon=True).start()  # a full pipe would stop it
        return server

    yield start
    for server in started:
        if server.proc.poll() is None:
            server.proc.kill()


REPLY_DELAY = 1.0
"""Seconds the echo agent waits before each word of a reply, where a reply's words must be a session's only
writes for a while (its lease, 60 s, is renewed every 20 s)."""


async def test_a_detached_session_whose_reply_ends_first_after_redis_lost_its_data_is_written_back(
    connic_run: Any, clients: Clients, redis_server: RedisServer
) -> None:
    # The client went away while a reply ran; Redis lost its data; the reply's last words are
    # the session's first write since. Finding it gone, its process began writing it back; the
    # reply's end let the (detached, idle) session go meanwhile, and the write-back then found
    # it no longer live and dropped it: the conversation was lost, although the process held it
    # whole, and a resume got a fresh session.
    a, b = await connic_run(REPLY_DELAY, 60), await connic_run(REPLY_DELAY, 60)
    session = ResumeSession(clients, a.url)
    conn = await session.start()
    await conn.send({"type": "message", "id": "m1", "payload": {"message": "one two"}})
    await conn.until(lambda f: f.get("type") == "stream_chunk", timeout=10)  # "one ", then "two" a second later
    session.drop()
    await asyncio.sleep(REPLY_DELAY / 4)  # A saves the detached session (before the loss)
    flush(redis_server.url)
    # The reply ends (and the session is let go) within a second.
    for _ in range(100):
        if await _session_keys(redis_server.url, session.session_id):
            break
        await asyncio.sleep(0.05)
    again = await session.resume(url=b.url)
    assert again.connected["resumed"] is True, again.connected
    assert await _history(again) == [("user", "one two"), ("agent", "one two")]


CREATE_SHA = hashlib.sha1(scripts.CREATE.encode()).hexdigest().encode()  # what an EVALSHA of CREATE carries


class Delaying(TcpProxy):
    """A proxy to Redis that, while :attr:`delay` is set, holds what carries a CREATE that long, then passes it on.

    :attr:`delayed` is set once it holds one: the CREATE is on its way, not yet run.
    """

    def __init__(self, target_port: int) -> None:
        super().__init__(target_port)
        self.delay = 0.0
        self.delayed = asyncio.Event()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                if self.delay and CREATE_SHA in data:
                    self.delayed.set()
                    await asyncio.sleep(self.delay)
                writer.write(data)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
        except (ConnectionError, OSError):
            writer.transport.abort()


async def test_a_session_whose_client_says_goodbye_while_it_is_written_back_stays_ended(
    connic_run: Any, clients: Clients, redis_server: RedisServer
) -> None:
    # Redis lost its data; the process writing a session back has sent its CREATE when the
    # client says goodbye: the session ends here. The CREATE ran all the same, and the write-back
    # then held the ended session as owned: it lived on in Redis, its lease renewed for as long
    # as the process ran, and a resume with its token found it (or waited on its owner).
    proxy = Delaying(redis_server.port)
    await proxy.start()
    try:
        a = await connic_run(0.01, PRODUCER_TIMEOUT, url=f"redis://127.0.0.1:{proxy.port}/0", timeout=5.0)
        b = await connic_run(0.01, PRODUCER_TIMEOUT)
        session = ResumeSession(clients, a.url)
        conn = await session.start()
        assert await conn.barrier() == []
        proxy.delay = 1.0
        flush(redis_server.url)
        await asyncio.wait_for(proxy.delayed.wait(), PRODUCER_TIMEOUT * 10)  # A's write-back sent its CREATE
        await conn.ws.close(1000)  # goodbye: the session ends for good
        await asyncio.sleep(proxy.delay)  # the CREATE runs
        await _until_no_keys(redis_server.url, session.session_id)
        again = await session.resume(url=b.url)
        assert again.connected["resumed"] is False, again.connected
    finally:
        await proxy.close()


async def test_a_detached_session_let_go_while_it_is_written_back_is_let_go_and_resumable(
    connic_run: Any, clients: Clients, redis_server: RedisServer
) -> None:
    # The client went away while a reply ran; Redis lost its data. The process writing the session
    # back has sent its CREATE when the reply ends and the (detached, idle) session is let go. The
    # write-back then held the let-go session as owned: nobody let it go in Redis, its lease was
    # renewed for as long as the process ran, and a resume elsewhere waited on its owner in vain.
    proxy = Delaying(redis_server.port)
    await proxy.start()
    try:
        a = await connic_run(REPLY_DELAY / 2, 60, url=f"redis://127.0.0.1:{proxy.port}/0", timeout=5.0)
        b = await connic_run(0.01, PRODUCER_TIMEOUT)
        session = ResumeSession(clients, a.url)
        conn = await session.start()
        await conn.send({"type": "message", "id": "m1", "payload": {"message": "one two three"}})
        await conn.until(lambda f: f.get("type") == "stream_chunk", timeout=10)  # the next words come 0.5 s apart
        session.drop()
        await asyncio.sleep(REPLY_DELAY / 10)  # A saves the detached session (before the loss)
        proxy.delay = REPLY_DELAY * 2  # longer than the rest of the reply
        flush(redis_server.url)
        await asyncio.wait_for(proxy.delayed.wait(), 10)  # the next word found it gone: its CREATE is on its way
        for _ in range(100):  # the CREATE runs, then the session is let go
            if await _session_keys(redis_server.url, session.session_id):
                break
            await asyncio.sleep(0.05)
        again = await session.resume(url=b.url)
        assert again.connected["resumed"] is True, again.connected
        assert await _history(again) == [("user", "one two three"), ("agent", "one two three")]
    finally:
        await proxy.close()


async def test_a_session_taken_just_before_redis_lost_its_data_is_written_back_by_its_taker(
    served: Any, clients: Clients, redis_server: RedisServer
) -> None:
    # The epoch a taken session is held under is read in its claim's round trip: a loss right
    # after the take (before the taker's next renewal reads the epoch) is told from a session
    # gone for good, and the taker writes it back.
    a, b = await served(), await served()
    session = ResumeSession(clients, a.url)
    conn = await session.start()
    assert (await chat(conn, "m1", "before"))["full_response"] == "before"
    session.drop()
    conn = await session.resume(url=b.url)
    assert conn.connected["resumed"] is True, conn.connected
    assert (await chat(conn, "m2", "taken"))["full_response"] == "taken"  # answered by B: B took it
    flush(redis_server.url)  # at once: B renews (and reads the epoch) every third of a second
    await asyncio.sleep(PRODUCER_TIMEOUT * 2)
    assert (await chat(conn, "m3", "after"))["full_response"] == "after"
    assert [text for _, text in await _history(conn)] == ["before", "before", "taken", "taken", "after", "after"]


async def test_a_resume_following_a_session_let_go_as_redis_lost_its_data_is_not_told_it_was_taken_over(
    served: Any, clients: Clients, redis_server: RedisServer
) -> None:
    # The client resumes on B as its connection to A drops; A lets the idle session go just as
    # Redis loses its data, and writes it back (then lets it go). B's resume, following meanwhile,
    # finds the session's resumer gone with the data: it was told `session_taken_over` (4011, which
    # clients take as final) although nobody took it. A store failure it is (1011), and the next
    # resume finds the conversation.
    a, b = await served(), await served()
    session = ResumeSession(clients, a.url)
    conn = await session.start()
    assert (await chat(conn, "m1", "before"))["full_response"] == "before"
    # A is held still (well within its lease) from the drop until Redis lost its data: it lets
    # the session go after that, whatever the load on this machine (it raced the flush).
    os.kill(a.proc.pid, signal.SIGSTOP)
    try:
        session.drop()
        conn = await session.resume(url=b.url)  # B follows A
        flush(redis_server.url)
    finally:
        os.kill(a.proc.pid, signal.SIGCONT)
    await asyncio.sleep(PRODUCER_TIMEOUT)  # B's resume settles: it took the session, or it failed
    try:
        await conn.barrier()
    except ConnectionClosed:
        assert conn.ws.close_code == 1011, conn.ws.close_code
        conn = await session.resume(url=b.url)
    assert conn.connected["resumed"] is True, conn.connected
    assert await _history(conn) == [("user", "before"), ("agent", "before")]


async def test_messages_sent_while_a_session_is_written_back_take_their_tokens_from_its_rate_bucket(
    connic_run: Any, clients: Clients, redis_server: RedisServer
) -> None:
    # Redis lost its data; a message's token found the session gone and began writing it back.
    # Until the write-back's CREATE came back, the session owned nothing here, and every message
    # arriving meanwhile was let through without a token: a client sending as fast as it could
    # got as many through as it sent in those round trips (here one second of them).
    limit = 3
    proxy = Delaying(redis_server.port)
    await proxy.start()
    try:
        a = await connic_run(
            0.01,
            60,
            url=f"redis://127.0.0.1:{proxy.port}/0",
            timeout=5.0,
            connector=f"rate_limit = {{ messages = {limit}, per = 600 }}\n",
        )
        session = ResumeSession(clients, a.url)
        conn = await session.start()
        assert await conn.barrier() == []
        proxy.delay = 1.0
        flush(redis_server.url)  # the bucket goes with it: full again, `limit` tokens
        sent = [f"m{i}" for i in range(limit * 3)]
        for message_id in sent:
            await conn.send({"type": "message", "id": message_id, "payload": {"message": "hi"}})
        answers: dict[str, str] = {}
        while len(answers) < len(sent):
            frame = await conn.recv(timeout=10)
            if frame.get("id") in sent and frame["type"] in ("ack", "error"):
                answers.setdefault(frame["id"], frame["type"] if frame["type"] == "ack" else frame["code"])
        await asyncio.wait_for(proxy.delayed.wait(), 10)  # the session was written back
        acked = [mid for mid in sent if answers[mid] == "ack"]
        assert len(acked) <= limit, answers
        assert set(answers.values()) <= {"ack", "rate_limited"}, answers
    finally:
        await proxy.close()


async def test_a_process_stopping_while_it_writes_a_session_back_lets_it_go(
    connic_run: Any, clients: Clients, redis_server: RedisServer
) -> None:
    # Redis lost its data; the process writing a session back stops (SIGTERM) while its CREATE is
    # on its way. A normal stop lets every session go, so that a resume elsewhere takes it at once;
    # the stop cancelled the write-back instead, the CREATE ran all the same, and the session was
    # left owned by a stopped process for its whole lease (60 s here): a resume elsewhere waited.
    proxy = Delaying(redis_server.port)
    await proxy.start()
    try:
        a = await connic_run(0.01, 60, url=f"redis://127.0.0.1:{proxy.port}/0", timeout=5.0)
        b = await connic_run(0.01, 60)
        session = ResumeSession(clients, a.url)
        conn = await session.start()
        assert (await chat(conn, "m1", "before"))["full_response"] == "before"
        proxy.delay = 1.0
        flush(redis_server.url)
        await conn.send({"type": "message", "id": "m2", "payload": {"message": "after"}})
        await asyncio.wait_for(proxy.delayed.wait(), 10)  # its save found it gone: the CREATE is on its way
        a.proc.send_signal(signal.SIGTERM)
        await asyncio.to_thread(a.proc.wait, 20)
        await asyncio.sleep(proxy.delay)  # whatever A sent has reached Redis
        owner = f"connic:{{{session.session_id}}}:owner"
        assert await _session_keys(redis_server.url, session.session_id), "the session was not written back"
        assert owner not in await _session_keys(redis_server.url, session.session_id), "still owned by A"
        again = await session.resume(url=b.url)
        assert again.connected["resumed"] is True, again.connected
        assert [text for _, text in await _history(again)][:2] == ["before", "before"]
    finally:
        await proxy.close()


async def test_a_process_stopping_just_after_redis_lost_its_data_writes_its_sessions_back_and_lets_them_go(
    connic_run: Any, clients: Clients, redis_server: RedisServer
) -> None:
    # Redis lost its data, then the process stops before anything found its idle session gone
    # (its lease, 60 s, is renewed every 20 s). The stop's release found it gone and began writing
    # it back, and the store's close cancelled that write-back: the conversation was lost, and a
    # resume elsewhere got a fresh session.
    a, b = await connic_run(0.01, 60), await connic_run(0.01, 60)
    session = ResumeSession(clients, a.url)
    conn = await session.start()
    assert (await chat(conn, "m1", "before"))["full_response"] == "before"
    flush(redis_server.url)
    a.proc.send_signal(signal.SIGTERM)
    await asyncio.to_thread(a.proc.wait, 20)
    again = await session.resume(url=b.url)
    assert again.connected["resumed"] is True, again.connected
    assert await _history(again) == [("user", "before"), ("agent", "before")]
