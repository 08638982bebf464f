"""A resume on process B that *follows* a reply process A still answers (PROTOCOL.md §5, §7).

What the client does meanwhile acts as it would on one process: its goodbye (close 1000)
ends the session on A (or, with A dead, at the next claim), a ``cancel`` of A's message
reaches A at once even behind frames B holds, a ``cancel`` of a message B holds drops it as
a queued message's cancel does, and a ``cancel`` nobody took gets ``not_found``. Two real
``python -m connic run`` processes share one real ``redis-server``; clients are real
``websockets`` clients on loopback, a drop is a TCP reset with no close frame.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from redis_server import (
    RedisServer,
    redis_server_fixture,  # noqa: F401  (a fixture)
    store_plugin_env,
)
from resume_helpers import (
    Clients,
    Conn,
    ResumeSession,
    Transcript,
    clients_fixture,  # noqa: F401  (a fixture)
    wait_turns,
    words,
)

from conftest import SECRET, CliServer, start_cli

aioredis = pytest.importorskip("redis.asyncio", reason="redis-py is not installed (pip install 'connic[redis]')")


@pytest.fixture
def launch(tmp_path: Path, redis_server: RedisServer) -> Iterator[Any]:
    """Start ``python -m connic run`` processes sharing ``redis_server`` (connector keys: TOML lines); stopped after."""
    env = store_plugin_env(tmp_path / "plugins")
    started: list[CliServer] = []

    async def start(*connector: str, delay: float = 0.02) -> CliServer:
        """One process; ``delay``: the seconds between the echo agent's chunks."""
        config = tmp_path / f"connic-{len(started)}.toml"
        config.write_text(
            f'[agents.assistant]\nuse = "echo"\ndelay = {delay:g}\n'
            f'[[connectors]]\npath = "/ws"\nsecrets = ["{SECRET}"]\n'
            + "".join(f"{line}\n" for line in connector)
            + f'[store]\nuse = "redis"\nurl = "{redis_server.url}"\n'
        )
        server = await asyncio.to_thread(start_cli, "--config", str(config), env=env)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop(signal.SIGKILL if server.proc.poll() is None else signal.SIGTERM)


async def following(session: ResumeSession, a: CliServer, b: CliServer, text: str) -> Conn:
    """A session on A answering ``m1`` (``text``), its client dropped and resumed on B, which follows A's reply live."""
    conn = await session.start()
    await conn.send({"type": "message", "id": "m1", "payload": {"message": text}})
    while len(session.transcript.chunks("m1", "assistant")) < 5:
        await conn.recv()
    session.drop()
    conn_b = await session.resume(url=b.url)
    assert conn_b.connected["resumed"] is True
    seen = len(session.transcript.chunks("m1", "assistant"))
    while len(session.transcript.chunks("m1", "assistant")) < seen + 5:  # B follows A's reply live
        await conn_b.recv()
    return conn_b


async def gone(redis: Any, session_id: str, timeout: float) -> float:
    """Wait (≤ ``timeout`` s) until the session's record is gone from Redis (it ended for good); how long that took."""
    started = time.monotonic()
    while await redis.exists(f"connic:{{{session_id}}}:record"):
        assert time.monotonic() - started < timeout, "the session is still in the store: it did not end"
        await asyncio.sleep(0.005)
    return time.monotonic() - started


async def test_a_goodbye_while_following_ends_the_session_on_the_owner(
    launch: Any, clients: Clients, redis_server: RedisServer
) -> None:
    a, b = await launch(), await launch()
    session = ResumeSession(clients, a.url)
    conn_b = await following(session, a, b, words(500))  # 500 chunks, 20 ms apart: about 10 s
    redis = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        await conn_b.ws.close(1000)  # the client says goodbye: the session is over (PROTOCOL.md §7)
        await gone(redis, session.session_id, timeout=5)  # not resumable until resume_window runs out
    finally:
        await redis.aclose()
    # As on one process: A's agent stops (session.end() cancels it), and a resume gets a fresh session.
    await wait_turns(f"http://127.0.0.1:{a.port}", "assistant", 1, reason="cancelled", timeout=5)
    for server in (a, b):
        again = await session.resume(url=server.url)
        assert again.connected["resumed"] is False and again.connected["session_id"] != session.session_id
        await again.ws.close(1000)


async def test_a_goodbye_while_following_a_dead_owner_ends_the_session_at_the_next_claim(
    launch: Any, clients: Clients, redis_server: RedisServer
) -> None:
    a, b = await launch("producer_timeout = 2"), await launch("producer_timeout = 2")
    session = ResumeSession(clients, a.url)
    conn_b = await following(session, a, b, words(500))
    a.proc.kill()  # kill -9: nobody renews A's lease, nobody hears the goodbye on A
    a.proc.wait(10)
    await conn_b.ws.close(1000)
    redis = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        owner = f"connic:{{{session.session_id}}}:owner"
        deadline = time.monotonic() + 10
        while await redis.exists(owner):  # A's lease (2 s) runs out
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        again = await session.resume(url=b.url)  # the next claim finds the goodbye: ended, not resumed
        assert again.connected["resumed"] is False and again.connected["session_id"] != session.session_id
        assert not await redis.exists(f"connic:{{{session.session_id}}}:record")
    finally:
        await redis.aclose()


async def test_a_cancel_behind_a_message_held_while_following_reaches_the_owner_at_once(
    launch: Any, clients: Clients
) -> None:
    a, b = await launch(), await launch()
    session = ResumeSession(clients, a.url)
    text = words(500)
    conn_b = await following(session, a, b, text)
    # m2 is held on B until it takes the session over; the cancel of A's m1 after it is not.
    await conn_b.send({"type": "message", "id": "m2", "payload": {"message": "after"}})
    await conn_b.send({"type": "cancel", "id": "m1"})
    await conn_b.until_ended({"m1": ["assistant"]}, timeout=15)
    end = session.transcript.end("m1", "assistant")
    assert end is not None and end["finish_reason"] == "cancelled", end
    assert len(session.transcript.chunks("m1", "assistant")) < 250
    assert text.startswith(end["full_response"])
    await conn_b.until_ended({"m2": ["assistant"]})  # B took the session over and answered m2
    assert session.transcript.of("m2")[0]["message_number"] == 2
    session.transcript.assert_complete()


async def test_a_cancel_of_a_message_held_while_following_drops_it_as_a_queued_ones_does(
    launch: Any, clients: Clients
) -> None:
    # On one process m2 and m3 would wait behind m1 and the cancel drop m2: its ack, nothing else.
    # rate_limit: admitting m3 on B asks Redis for a token, time enough for m2 to start were it admitted.
    limit = "rate_limit = { messages = 100, per = 1 }"
    a, b = await launch(limit), await launch(limit)
    session = ResumeSession(clients, a.url)
    conn_b = await following(session, a, b, words(60))
    for message_id in ("m2", "m3"):
        await conn_b.send({"type": "message", "id": message_id, "payload": {"message": message_id}})
    await conn_b.send({"type": "cancel", "id": "m2"})
    await conn_b.until_ended({"m1": ["assistant"], "m3": ["assistant"]}, timeout=15)
    await conn_b.send({"type": "message", "id": "m4", "payload": {"message": "last"}})
    await conn_b.until_ended({"m4": ["assistant"]})
    m2 = session.transcript.of("m2")
    assert [(f["type"], f.get("message_number")) for f in m2] == [("ack", 2)], m2
    assert session.transcript.end("m3", "assistant")["finish_reason"] == "stop"  # type: ignore[index]
    assert [f["message_number"] for f in session.transcript.ordered() if f["type"] == "ack"] == [1, 2, 3, 4]
    session.transcript.assert_complete()


async def test_a_cancel_no_process_takes_gets_not_found_from_the_next_owner(launch: Any, clients: Clients) -> None:
    a, b = await launch("producer_timeout = 2"), await launch("producer_timeout = 2")
    session = ResumeSession(clients, a.url)
    conn_b = await following(session, a, b, words(500))
    a.proc.kill()  # the cancel below reaches no process: B takes the session once A's lease runs out
    a.proc.wait(10)
    await conn_b.send({"type": "cancel", "id": "m1"})
    frames = await conn_b.until(lambda f: f["type"] == "error" and f.get("code") == "not_found", timeout=10)
    lost = [f for f in frames if f["type"] == "error" and f["code"] == "producer_lost"]
    assert [f["id"] for f in lost] == ["m1"], frames  # the reply ended as lost: m1 is no longer answered
    assert frames[-1]["id"] == "m1" and frames[-1]["seq"] > lost[0]["seq"], frames
    session.transcript.assert_complete()
    await conn_b.send({"type": "message", "id": "m2", "payload": {"message": "after"}})
    await conn_b.until_ended({"m2": ["assistant"]})
    assert session.transcript.of("m2")[0]["message_number"] == 2


async def test_a_goodbye_whose_message_was_lost_is_taken_at_the_lease_renewal(
    launch: Any, clients: Clients, redis_server: RedisServer
) -> None:
    # producer_timeout = 1.5: the owner renews its leases, and takes the flags, every 0.5 s.
    a = await launch("producer_timeout = 1.5")
    session = ResumeSession(clients, a.url)
    conn = await session.start()
    await conn.send({"type": "message", "id": "m1", "payload": {"message": words(500)}})
    await conn.until_type("stream_chunk")
    redis = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        # The flag a follower's goodbye sets, without its pub/sub message.
        await redis.set(f"connic:{{{session.session_id}}}:end", "1", px=60_000)
        code, frames = await conn.closed(timeout=5)
        assert code == 4011 and frames[-1]["code"] == "session_taken_over", frames
        await gone(redis, session.session_id, timeout=5)
        assert not await redis.exists(f"connic:{{{session.session_id}}}:end")  # taken: acted on once
    finally:
        await redis.aclose()
    again = await session.resume(url=a.url)
    assert again.connected["resumed"] is False


async def test_a_cancel_whose_message_was_lost_is_taken_at_the_lease_renewal_when_idle(
    launch: Any, clients: Clients, redis_server: RedisServer
) -> None:
    a = await launch("producer_timeout = 1.5")
    session = ResumeSession(clients, a.url)
    conn = await session.start()
    await conn.send({"type": "message", "id": "m1", "payload": {"message": "hello"}})
    await conn.until_ended({"m1": ["assistant"]})
    redis = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        # A cancel a follower passed, without its pub/sub message, for a session no longer busy.
        await redis.rpush(f"connic:{{{session.session_id}}}:cancel", '"m1"')
        frames = await conn.until(lambda f: f["type"] == "error", timeout=5)
        assert (frames[-1]["code"], frames[-1]["id"]) == ("not_found", "m1"), frames
        assert not await redis.exists(f"connic:{{{session.session_id}}}:cancel")
    finally:
        await redis.aclose()
    session.transcript.assert_complete()


# rate_limit: the owner's admission of m1 takes a token, and the session's bucket (its ":rate" key)
# would outlive it by ``per`` seconds were its end to forget it.
_RATE = "rate_limit = { messages = 100, per = 600 }"


async def session_keys(redis: Any, session_id: str) -> list[str]:
    """Every key of the session left in Redis (they share its hash tag)."""
    return sorted(await redis.keys(f"connic:{{{session_id}}}:*"))


async def test_a_goodbye_while_following_leaves_no_key_of_the_session(
    launch: Any, clients: Clients, redis_server: RedisServer
) -> None:
    a, b = await launch(_RATE), await launch(_RATE)
    session = ResumeSession(clients, a.url)
    conn_b = await following(session, a, b, words(500))
    redis = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        await conn_b.send({"type": "cancel", "id": "m9"})  # a cancel passed to A (not_found): its set, taken
        await conn_b.until(lambda f: f["type"] == "error" and f.get("code") == "not_found")
        await conn_b.ws.close(1000)
        await gone(redis, session.session_id, timeout=5)
        # As a session's end on one process (DELETE): every key of it, not only what a resume reads.
        assert await session_keys(redis, session.session_id) == []
    finally:
        await redis.aclose()


async def test_a_goodbye_ended_at_the_next_claim_leaves_no_key_of_the_session(
    launch: Any, clients: Clients, redis_server: RedisServer
) -> None:
    a, b = await launch("producer_timeout = 2", _RATE), await launch("producer_timeout = 2", _RATE)
    session = ResumeSession(clients, a.url)
    conn_b = await following(session, a, b, words(500))
    a.proc.kill()
    a.proc.wait(10)
    await conn_b.ws.close(1000)
    redis = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        owner = f"connic:{{{session.session_id}}}:owner"
        deadline = time.monotonic() + 10
        while await redis.exists(owner):  # A's lease (2 s) runs out
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        again = await session.resume(url=b.url)  # the claim ends it (the CLAIM script deletes it)
        assert again.connected["resumed"] is False
        assert await session_keys(redis, session.session_id) == []
    finally:
        await redis.aclose()


# --- a newer resume takes a following resume over (PROTOCOL.md §7) ---------------------------

# Where the client resumes again while B follows A's reply: on A itself, on a third process C,
# or on B again (a second resume there, its first one's socket half-open).
_AGAIN = ["owner", "another", "follower"]


async def again_on(where: str, launch: Any, a: CliServer, b: CliServer) -> CliServer:
    """The process of the client's next resume."""
    return {"owner": a, "follower": b}.get(where) or await launch()


async def assert_taken_over(conn: Conn) -> None:
    """``conn`` ends with ``session_taken_over`` (4011) while the reply it followed still goes on."""
    code, frames = await conn.closed(timeout=30)
    assert code == 4011 and frames and frames[-1].get("code") == "session_taken_over", (code, frames[-3:])
    # Told at once, not once the reply meant for the newer connection ended.
    assert not [f for f in frames if f["type"] == "stream_end"], frames[-3:]


@pytest.mark.parametrize("where", _AGAIN)
async def test_a_newer_resume_takes_a_following_resume_over(launch: Any, clients: Clients, where: str) -> None:
    a, b = await launch(), await launch()
    session = ResumeSession(clients, a.url)
    text = words(500)  # 500 chunks, 20 ms apart: the reply goes on through both resumes
    conn_b = await following(session, a, b, text)
    conn_b.transcript = Transcript()  # what B gets from now on is not the client's any more
    again = await session.resume(url=(await again_on(where, launch, a, b)).url)
    assert again.connected["resumed"] is True
    await assert_taken_over(conn_b)
    await again.until_ended({"m1": ["assistant"]}, timeout=30)
    end = session.transcript.end("m1", "assistant")
    assert end is not None and end["finish_reason"] == "stop" and end["full_response"] == text, end
    session.transcript.assert_complete()
    await again.send({"type": "message", "id": "m2", "payload": {"message": "after"}})
    await again.until_ended({"m2": ["assistant"]})
    assert session.transcript.of("m2")[0]["message_number"] == 2


@pytest.mark.parametrize("where", _AGAIN)
async def test_the_goodbye_of_a_following_resume_taken_over_ends_nothing(
    launch: Any, clients: Clients, where: str
) -> None:
    # On one process a connection taken over says nothing more: its close 1000 ends nothing.
    a, b = await launch(), await launch()
    session = ResumeSession(clients, a.url)
    text = words(300)
    conn_b = await following(session, a, b, text)
    conn_b.transcript = Transcript()
    again = await session.resume(url=(await again_on(where, launch, a, b)).url)
    assert again.connected["resumed"] is True
    await conn_b.ws.close(1000)  # at once: B may not have heard of the newer resume yet
    await again.until_ended({"m1": ["assistant"]}, timeout=30)
    end = session.transcript.end("m1", "assistant")
    assert end is not None and end["finish_reason"] == "stop" and end["full_response"] == text, end
    await again.send({"type": "message", "id": "m2", "payload": {"message": "after"}})
    await again.until_ended({"m2": ["assistant"]})
    assert session.transcript.of("m2")[0]["message_number"] == 2
    assert again.ws.close_code is None
    session.transcript.assert_complete()


async def test_a_following_resume_whose_takeover_message_was_lost_finds_out_between_its_reads(
    launch: Any, clients: Clients, redis_server: RedisServer
) -> None:
    a, b = await launch(), await launch()
    session = ResumeSession(clients, a.url)
    conn_b = await following(session, a, b, words(500))
    redis = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        # What a newer resume's claim leaves, without its pub/sub message.
        await redis.set(f"connic:{{{session.session_id}}}:resumer", "newer", px=60_000)
    finally:
        await redis.aclose()
    await assert_taken_over(conn_b)
