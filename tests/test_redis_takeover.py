"""A resume on another process takes the old connection over (PROTOCOL.md §7), with the ``redis`` store.

The plain cases (idle, and mid-reply) are in tests/test_protocol_audit.py; these pin what
is around them: the flag taken at the lease renewal when its pub/sub message is lost, a
resume with a wrong token that must not close anything, and a reply that goes on through a
takeover whatever ``on_disconnect`` says. "Processes" are connic apps in this test process,
each with its own store, sharing one real ``redis-server``; clients are real ``websockets``
clients on loopback.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from redis_server import (
    RedisServer,
    redis_server_fixture,  # noqa: F401  (a fixture)
    with_store,
)
from resume_helpers import (
    Clients,
    Conn,
    ResumeSession,
    Transcript,
    clients_fixture,  # noqa: F401  (a fixture)
    serve,
    words,
)

from conftest import SECRET, Server, StartServer

aioredis = pytest.importorskip("redis.asyncio", reason="redis-py is not installed (pip install 'connic[redis]')")


async def process(
    start_server: StartServer, url: str, connector: dict[str, Any] | None = None, agents: dict[str, Any] | None = None
) -> Server:
    """One connic "process" keeping its sessions in the Redis at ``url``."""
    return await serve(with_store(start_server, url), connector, agents)


async def chat(conn: Conn, message_id: str, text: str) -> None:
    await conn.send({"id": message_id, "message": text})
    await conn.until_ended({message_id: ["assistant"]})


async def test_a_takeover_whose_message_was_lost_is_taken_at_the_lease_renewal(
    redis_server: RedisServer, start_server: StartServer, clients: Clients
) -> None:
    # producer_timeout = 1.5: the owner renews its leases, and takes the flags, every 0.5 s.
    server = await process(start_server, redis_server.url, {"producer_timeout": 1.5})
    session = ResumeSession(clients, server.url())
    old = await session.start()
    await chat(old, "m1", "hello")
    client = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        # The flag a resume on another process sets (naming the owner's fence), without its pub/sub message.
        fence = await client.get(f"connic:{{{session.session_id}}}:owner")
        await client.set(f"connic:{{{session.session_id}}}:takeover", fence, px=5000)
        code, frames = await old.closed(timeout=5)
        assert code == 4011, frames
        assert [(f["type"], f["code"]) for f in frames] == [("error", "session_taken_over")]
        assert await client.exists(f"connic:{{{session.session_id}}}:takeover") == 0  # taken: acted on once
    finally:
        await client.aclose()
    again = await session.resume()  # the session lives on, detached: resumable
    assert again.connected["resumed"] is True
    await chat(again, "m2", "again")
    assert session.transcript.of("m2")[0]["message_number"] == 2


async def test_a_takeover_flag_set_for_an_earlier_owner_leaves_the_new_owner_alone(
    redis_server: RedisServer, start_server: StartServer, clients: Clients
) -> None:
    # A resume that found a process owning the session flags its takeover; that process dies
    # before taking the flag, and this one takes the session over while the flag lives. The
    # flag was this connection's takeover at this process's next lease renewal, or at any
    # message on the takeover channel (a resume here publishes one): a resume here was cut
    # with 4011 as it attached.
    server = await process(start_server, redis_server.url, {"producer_timeout": 1.5})
    session = ResumeSession(clients, server.url())
    conn = await session.start()
    await chat(conn, "m1", "hello")
    client = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        fence = int(await client.get(f"connic:{{{session.session_id}}}:owner"))
        await client.set(f"connic:{{{session.session_id}}}:takeover", str(fence + 7), px=5000)  # not this owner's
        await client.publish("connic:takeover", session.session_id)
        await asyncio.sleep(1.2)  # two lease renewals
        assert await conn.barrier() == []  # still open
        assert await client.exists(f"connic:{{{session.session_id}}}:takeover") == 0  # taken, and ignored
    finally:
        await client.aclose()
    session.drop()
    again = await session.resume()
    await asyncio.sleep(0.6)  # a renewal
    await chat(again, "m2", "again")
    assert session.transcript.of("m2")[0]["message_number"] == 2


async def test_a_resume_with_a_wrong_token_on_another_process_leaves_the_old_connection_alone(
    redis_server: RedisServer, start_server: StartServer, clients: Clients
) -> None:
    a = await process(start_server, redis_server.url)
    b = await process(start_server, redis_server.url)
    session = ResumeSession(clients, a.url())
    old = await session.start()
    await chat(old, "m1", "hello")
    attempt = await clients.open(b.url(), Transcript())
    frame = session.resume_frame(secret=SECRET)
    frame["resume_token"] = "x" + session.resume_token
    await attempt.send(frame)
    connected = await attempt.recv()
    assert connected["type"] == "connected" and connected["resumed"] is False, connected
    client = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        assert await client.exists(f"connic:{{{session.session_id}}}:takeover") == 0  # no signal was sent
    finally:
        await client.aclose()
    await chat(old, "m2", "still here")  # the old connection still holds the session
    assert session.transcript.of("m2")[0]["message_number"] == 2
    # The rightful resume then takes it over.
    new = await session.resume(url=b.url())
    assert new.connected["resumed"] is True
    code, _ = await old.closed(timeout=5)
    assert code == 4011


async def test_a_reply_goes_on_through_a_takeover_with_on_disconnect_cancel(
    redis_server: RedisServer, start_server: StartServer, clients: Clients
) -> None:
    # The old connection ends because the client moved, not because it went away: the reply
    # it was streaming is not cancelled, and the resume follows it to its end.
    connector = {"on_disconnect": "cancel"}
    agents = {"assistant": {"use": "echo", "delay": 0.03}}
    a = await process(start_server, redis_server.url, connector, agents)
    b = await process(start_server, redis_server.url, connector, agents)
    session = ResumeSession(clients, a.url())
    old = await session.start()
    text = words(40)
    await old.send({"id": "m1", "message": text})
    while len(session.transcript.chunks("m1", "assistant")) < 3:
        await old.recv()
    last = session.transcript.last_seq
    new = await session.resume(last, url=b.url())
    old.transcript = Transcript()  # what A's socket got meanwhile is not the client's any more
    assert new.connected["resumed"] is True
    code, frames = await old.closed()
    assert code == 4011 and frames[-1]["code"] == "session_taken_over", frames
    await new.until_ended({"m1": ["assistant"]}, timeout=20)
    end = session.transcript.end("m1", "assistant")
    assert end is not None and end["finish_reason"] == "stop", end
    assert end["full_response"] == text
    session.transcript.assert_complete()
    await chat(new, "m2", "on B")  # B took the session over once the reply ended
    assert session.transcript.of("m2")[0]["message_number"] == 2


async def test_of_two_resumes_on_other_processes_at_once_one_takes_the_session_and_the_other_is_taken_over(
    redis_server: RedisServer, start_server: StartServer, clients: Clients
) -> None:
    # Both resumes signal the owner A. The newer one (its claim came second) takes the older one
    # over at once, while both still follow A (as on one process), and takes the session.
    a, b, c = [await process(start_server, redis_server.url) for _ in range(3)]
    session = ResumeSession(clients, a.url())
    old = await session.start()
    await chat(old, "m1", "hello")
    frame = session.resume_frame(secret=SECRET)
    conns = [await clients.open(server.url(), Transcript()) for server in (b, c)]
    for conn in conns:
        await conn.send(frame)
    for conn in conns:
        connected = await conn.recv()
        assert connected["type"] == "connected" and connected["resumed"] is True, connected
    code, _ = await old.closed(timeout=5)
    assert code == 4011
    closing = {asyncio.ensure_future(conn.closed(timeout=10)): conn for conn in conns}
    done, pending = await asyncio.wait(closing, timeout=10, return_when=asyncio.FIRST_COMPLETED)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)  # the winner's reads stopped
    assert len(done) == 1, "neither resume was taken over"
    loser = closing[done.pop()]
    assert loser.ws.close_code == 4011
    winner = conns[1 - conns.index(loser)]
    assert winner.ws.close_code is None
    await winner.send({"id": "m2", "message": "who has it"})
    await winner.until_ended({"m2": ["assistant"]})
    assert winner.transcript.of("m2")[0]["message_number"] == 2
