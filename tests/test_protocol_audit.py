"""PROTOCOL.md rules that no other test pinned, found by a conformance audit of the contract.

Black-box: real ``websockets`` clients against real in-process servers on loopback. A
drop is a TCP reset with no close frame (:meth:`resume_helpers.Conn.drop`). The tests
that take ``any_store`` run against each session store (memory and Redis), as the
resume suite does; the cross-process ones run two servers sharing one Redis.
"""

from __future__ import annotations

import asyncio
import signal
from typing import Any

import aiohttp
import pytest
import resume_helpers
import websockets
from redis_server import (
    RedisServer,
    flush,
    redis_server_fixture,  # noqa: F401  (a fixture)
    with_store,
)
from resume_helpers import Clients, ResumeSession, serve, wait_turns, words

from conftest import SECRET, StartServer
from connic.transports.websocket import WebSocketTransport

# The fixtures shared with the resume tests (resume_helpers): pytest finds them in this namespace.
store_url, clients = resume_helpers.store_url, resume_helpers.clients_fixture


@pytest.fixture
def any_store(start_server: StartServer, store_url: str | None) -> StartServer:
    """conftest's ``start_server``, its apps keeping their sessions in each store in turn (Redis emptied first)."""
    if store_url is None:
        return start_server
    flush(store_url)
    return with_store(start_server, store_url)


# --- §7 defaults ------------------------------------------------------------------------------


def test_connector_defaults_are_the_contracts() -> None:
    """The defaults PROTOCOL.md names (§1, §4, §7, §9), as a connector without these keys has them."""
    defaults = WebSocketTransport.Options()
    assert defaults.require_auth is True
    assert defaults.auth_timeout == 10
    assert defaults.max_messages == 100
    assert defaults.session_timeout == 3600
    assert defaults.heartbeat == 30
    assert defaults.streaming is True
    assert defaults.resume_window == 120
    assert defaults.on_disconnect == "continue"
    assert defaults.replay_buffer == 4096
    assert defaults.producer_timeout == 10
    assert defaults.progress_events is False


# --- §7 detaching: what ends a session for good --------------------------------------------------


async def test_session_expired_ends_the_session_for_good(any_store: StartServer, clients: Clients) -> None:
    server = await serve(any_store, {"session_timeout": 0.5})
    session = ResumeSession(clients, server.url())
    conn = await session.start()
    await conn.send({"id": "m1", "message": "hello"})
    await conn.until_ended({"m1": ["assistant"]})
    code, frames = await conn.closed()
    assert code == 4008
    assert [(f["type"], f["code"], f["id"]) for f in frames] == [("error", "session_expired", None)]
    again = await session.resume()
    assert again.connected["resumed"] is False
    assert again.connected["session_id"] != session.session_id


async def test_session_timeout_runs_on_while_detached(any_store: StartServer, clients: Clients) -> None:
    # The resume window is far longer than session_timeout: only the idle clock can end the session.
    server = await serve(any_store, {"session_timeout": 0.5, "resume_window": 60})
    session = ResumeSession(clients, server.url())
    conn = await session.start()
    await conn.send({"id": "m1", "message": "hello"})
    await conn.until_ended({"m1": ["assistant"]})
    conn.drop()
    await asyncio.sleep(2.0)  # four times session_timeout with no message and no reply in flight
    again = await session.resume()
    assert again.connected["resumed"] is False
    assert again.connected["session_id"] != session.session_id


# --- §7 throttle: failed resumes are failed authentications --------------------------------------


async def test_failed_resumes_count_as_failed_authentications(any_store: StartServer, clients: Clients) -> None:
    server = await serve(any_store, {"max_auth_failures": 2, "auth_failure_window": 30})
    session = ResumeSession(clients, server.url())
    conn = await session.start()
    await conn.send({"id": "m1", "message": "keep me"})
    await conn.until_ended({"m1": ["assistant"]})
    conn.drop()
    for guess in ("x", "y"):
        attempt = await clients.open(server.url())
        frame = session.resume_frame(secret=SECRET)
        frame["resume_token"] = guess + session.resume_token
        await attempt.send(frame)
        connected = await session.read_connected(attempt)
        assert connected["resumed"] is False  # a fresh session: the right secret, a wrong token
    # Two failed resumes from this address: its next handshake is braked, even a rightful one.
    with pytest.raises(websockets.InvalidStatus) as refused:
        await session.resume()
    assert refused.value.response.status_code == 429


# --- §7 replies while detached, and after a resume -----------------------------------------------


async def test_on_disconnect_cancel_drops_the_queued_messages(any_store: StartServer, clients: Clients) -> None:
    agents = {"slow": {"use": "slow", "seconds": 30}, "echo": {"use": "echo"}}
    server = await serve(any_store, {"on_disconnect": "cancel"}, agents)
    session = ResumeSession(clients, server.url())
    conn = await session.start()
    await conn.send({"type": "message", "id": "m1", "payload": {"message": "long", "agent": "slow"}})
    await conn.send({"type": "message", "id": "m2", "payload": {"message": "queued", "agent": "slow"}})
    while not (
        any(f["type"] == "stream_chunk" for f in conn.frames)
        and any(f["type"] == "ack" and f["id"] == "m2" for f in conn.frames)
    ):
        await conn.recv()
    conn.drop()
    await wait_turns(server.http, "slow", 1, reason="cancelled")
    again = await session.resume()
    assert again.connected["resumed"] is True
    await again.until_ended({"m1": ["slow"]})
    end = session.transcript.end("m1", "slow")
    assert end is not None and end["finish_reason"] == "cancelled"
    # Messages are answered in order: m3 ends within the wait only if m2 (30 s) was dropped.
    await again.send({"type": "message", "id": "m3", "payload": {"message": "quick", "agent": "echo"}})
    await again.until_ended({"m3": ["echo"]})
    assert [f["type"] for f in session.transcript.of("m2")] == ["ack"]  # never answered
    session.transcript.assert_complete()


async def test_messages_sent_after_a_resume_are_answered_after_those_already_accepted(
    any_store: StartServer, clients: Clients
) -> None:
    server = await serve(any_store, agents={"assistant": {"use": "echo", "delay": 0.03}})
    session = ResumeSession(clients, server.url())
    conn = await session.start()
    await conn.send({"id": "m1", "message": words(15, "a")})
    await conn.send({"id": "m2", "message": words(5, "b")})
    await conn.until(lambda f: f["type"] == "ack" and f["id"] == "m2")
    conn.drop()
    again = await session.resume()
    assert again.connected["resumed"] is True
    await again.send({"id": "m3", "message": words(3, "c")})
    await again.until_ended({"m1": ["assistant"], "m2": ["assistant"], "m3": ["assistant"]})
    session.transcript.assert_complete()
    starts = [f["id"] for f in session.transcript.ordered() if f["type"] == "stream_start"]
    assert starts == ["m1", "m2", "m3"]
    replies = [f["id"] for f in session.transcript.ordered() if f["type"] != "ack"]
    assert replies == ["m1"] * 17 + ["m2"] * 7 + ["m3"] * 5  # one after another, not interleaved
    assert [(f["id"], f["message_number"]) for f in session.transcript.ordered() if f["type"] == "ack"] == [
        ("m1", 1),
        ("m2", 2),
        ("m3", 3),
    ]


# --- §7 across processes ------------------------------------------------------------------------


# Two processes share sessions only through a shared store: these tests run on Redis alone.
SHARED_STORE_ONLY = pytest.mark.parametrize("store_url", ["redis"], indirect=True)


async def shared_pair(any_store: StartServer, store_url: str | None, agents: dict[str, Any] | None = None) -> Any:
    """Two servers sharing the Redis store."""
    assert store_url is not None
    return await serve(any_store, agents=agents), await serve(any_store, agents=agents)


@SHARED_STORE_ONLY
async def test_takeover_across_processes_closes_the_old_socket_4011(
    any_store: StartServer, store_url: str | None, clients: Clients
) -> None:
    a, b = await shared_pair(any_store, store_url)
    session = ResumeSession(clients, a.url())
    old = await session.start()
    await old.send({"id": "m1", "message": "hi"})
    await old.until_ended({"m1": ["assistant"]})
    new = await session.resume(url=b.url())  # the old socket on A is still open
    assert new.connected["resumed"] is True and new.connected["session_id"] == session.session_id
    code, frames = await old.closed(timeout=5)
    assert [(f["type"], f["code"], f["id"]) for f in frames] == [("error", "session_taken_over", None)]
    assert code == 4011
    await new.send({"id": "m2", "message": "on B"})
    await new.until_ended({"m2": ["assistant"]})
    new.assert_seqs_follow(4)
    session.transcript.assert_complete()
    assert session.transcript.of("m2")[0]["message_number"] == 2


@SHARED_STORE_ONLY
async def test_takeover_across_processes_mid_stream(
    any_store: StartServer, store_url: str | None, clients: Clients
) -> None:
    a, b = await shared_pair(any_store, store_url, {"assistant": {"use": "echo", "delay": 0.03}})
    session = ResumeSession(clients, a.url())
    old = await session.start()
    text = words(40)
    await old.send({"id": "m1", "message": text})
    while len(session.transcript.chunks("m1", "assistant")) < 3:
        await old.recv()
    last = session.transcript.last_seq
    new = await session.resume(last, url=b.url())
    old.transcript = resume_helpers.Transcript()  # what A's socket got meanwhile is not the client's any more
    assert new.connected["resumed"] is True and new.connected["recovered"] is True
    await new.until_ended({"m1": ["assistant"]}, timeout=20)
    new.assert_seqs_follow(last)
    session.transcript.assert_complete()
    end = session.transcript.end("m1", "assistant")
    assert end is not None and end["finish_reason"] == "stop"
    assert "".join(session.transcript.chunks("m1", "assistant")) == end["full_response"] == text
    code, frames = await old.closed()
    assert code == 4011
    assert frames[-1]["type"] == "error" and frames[-1]["code"] == "session_taken_over"


# --- §2, §3, §8: ids and what the history keeps ---------------------------------------------------


@pytest.mark.parametrize("streaming", [True, False])
@pytest.mark.parametrize("message_id", [0, 7, -3, "0"])
async def test_the_id_is_echoed_verbatim_on_every_frame_of_its_reply(
    start_server: StartServer, clients: Clients, streaming: bool, message_id: Any
) -> None:
    server = await serve(start_server, {"streaming": streaming}, {"a": {"use": "echo"}, "b": {"use": "echo"}})
    session = ResumeSession(clients, server.url())
    conn = await session.start()
    await conn.send({"id": message_id, "message": "one two"})
    await conn.until_ended({message_id: ["a", "b"]})
    frames = [f for f in conn.frames if "seq" in f]
    assert len(frames) == (1 + 2 * 4 if streaming else 1 + 2)
    for frame in frames:
        assert frame["id"] == message_id and type(frame["id"]) is type(message_id), frame


async def test_a_reply_that_timed_out_is_not_in_the_history(start_server: StartServer, clients: Clients) -> None:
    agents = {"slow": {"use": "slow", "seconds": 30}, "echo": {"use": "echo"}}
    server = await serve(start_server, {"agent_timeout": 0.3}, agents)
    session = ResumeSession(clients, server.url())
    conn = await session.start()
    await conn.send({"id": "m1", "message": "try"})
    await conn.until_ended({"m1": ["slow", "echo"]})
    error = session.transcript.end("m1", "slow")
    assert error is not None and error["type"] == "error" and error["code"] == "agent_timeout"
    assert session.transcript.chunks("m1", "slow") == ["started "]  # it had streamed something
    await conn.send({"type": "history"})
    history = (await conn.until_type("history"))[-1]
    assert history["entries"] == [
        {"role": "user", "text": "try", "id": "m1", "message_number": 1, "agent": None},
        {"role": "agent", "text": "try", "id": "m1", "message_number": 1, "agent": "echo"},
    ]


# --- §7 the resume window and server-started closes -----------------------------------------------


async def test_resume_window_starts_again_when_the_last_reply_ends(any_store: StartServer, clients: Clients) -> None:
    agents = {"assistant": {"use": "echo", "delay": 0.1}}
    server = await serve(any_store, {"resume_window": 2.0}, agents)
    session = ResumeSession(clients, server.url())
    conn = await session.start()
    text = words(40)  # about 4 s of streaming: it ends long after a window counted from the drop would have
    await conn.send({"id": "m1", "message": text})
    while not session.transcript.chunks("m1", "assistant"):
        await conn.recv()
    conn.drop()
    await wait_turns(server.http, "assistant", 1)  # the reply ended with nobody attached: the window starts now
    again = await session.resume()
    assert again.connected["resumed"] is True and again.connected["recovered"] is True
    await again.until_ended({"m1": ["assistant"]})
    session.transcript.assert_complete()
    assert "".join(session.transcript.chunks("m1", "assistant")) == text


async def test_slow_consumer_close_detaches_the_session(start_server: StartServer, clients: Clients) -> None:
    connector = {"send_queue": 8, "send_timeout": 0.5, "max_frame_bytes": 4_000_000, "on_disconnect": "cancel"}
    server = await serve(start_server, connector)
    session = ResumeSession(clients, server.url())
    # max_queue=1: the client stops reading, so TCP backpressure reaches the server.
    slow = await session.start(max_queue=1)
    await slow.send({"id": "m1", "message": "word " * 100_000})
    await metric_reaches(server.http, 'connic_slow_consumer_closes_total{connector="/ws"}', 1)
    again = await session.resume(0)  # the server closed it (4010): the session is detached, not ended
    assert again.connected["resumed"] is True and again.connected["session_id"] == session.session_id
    await again.send({"id": "m2", "message": "after"})
    await again.until(lambda f: f["type"] == "stream_end" and f["id"] == "m2")
    ack = next(f for f in again.frames if f["type"] == "ack" and f["id"] == "m2")
    assert ack["message_number"] == 2


async def metric_reaches(http: str, name: str, value: float, timeout: float = 20.0) -> None:
    """Wait (bounded) until the sample ``name`` on ``http``/metrics is at least ``value``."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        async with aiohttp.ClientSession() as client, client.get(http + "/metrics") as response:
            text = await response.text()
        seen = [float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ")]
        if seen and seen[0] >= value:
            return
        assert asyncio.get_running_loop().time() < deadline, f"{name} is {seen}, expected {value}"
        await asyncio.sleep(0.05)


async def test_store_unavailable_closes_1011_and_the_session_resumes_once_the_store_is_back(
    start_server: StartServer, redis_server: RedisServer, clients: Clients
) -> None:
    server = await serve(with_store(start_server, redis_server.url))
    session = ResumeSession(clients, server.url())
    conn = await session.start()
    await conn.send({"id": "m1", "message": "before"})
    await conn.until_ended({"m1": ["assistant"]})
    assert redis_server.proc is not None
    redis_server.proc.send_signal(signal.SIGSTOP)  # unreachable, its data kept
    try:
        await conn.send({"id": "m2", "message": "while the store is away"})
        code, frames = await conn.closed(timeout=20)
    finally:
        redis_server.proc.send_signal(signal.SIGCONT)
    assert code == 1011
    assert ("error", "store_unavailable", None) in [(f["type"], f.get("code"), f["id"]) for f in frames]
    again = await session.resume()
    assert again.connected["resumed"] is True and again.connected["session_id"] == session.session_id
    await again.send({"type": "history"})
    history = (await again.until_type("history"))[-1]
    assert [e["text"] for e in history["entries"]][:2] == ["before", "before"]
    await again.send({"id": "m3", "message": "after"})
    await again.until(lambda f: f["type"] == "stream_end" and f["id"] == "m3", timeout=15)


@SHARED_STORE_ONLY
async def test_messages_sent_after_a_resume_on_another_process_are_answered_after_those_accepted_before(
    any_store: StartServer, store_url: str | None, clients: Clients
) -> None:
    a, b = await shared_pair(any_store, store_url, {"assistant": {"use": "echo", "delay": 0.03}})
    session = ResumeSession(clients, a.url())
    conn = await session.start()
    await conn.send({"id": "m1", "message": words(30, "a")})
    await conn.send({"id": "m2", "message": words(5, "b")})
    await conn.until(lambda f: f["type"] == "ack" and f["id"] == "m2")
    conn.drop()
    again = await session.resume(url=b.url())  # A still answers m1, with m2 queued behind it
    assert again.connected["resumed"] is True
    await again.send({"id": "m3", "message": words(3, "c")})
    expected = {"m1": ["assistant"], "m2": ["assistant"], "m3": ["assistant"]}
    await again.until_ended(expected, timeout=20)
    session.transcript.assert_complete()
    replies = [f["id"] for f in session.transcript.ordered() if f["type"] != "ack"]
    assert replies == ["m1"] * 32 + ["m2"] * 7 + ["m3"] * 5
    acks = [(f["id"], f["message_number"]) for f in session.transcript.ordered() if f["type"] == "ack"]
    assert acks == [("m1", 1), ("m2", 2), ("m3", 3)]


@SHARED_STORE_ONLY
async def test_cancel_on_another_process_drops_a_message_queued_on_the_first(
    any_store: StartServer, store_url: str | None, clients: Clients
) -> None:
    agents = {"slow": {"use": "slow", "seconds": 30}, "echo": {"use": "echo"}}
    a, b = await shared_pair(any_store, store_url, agents)
    session = ResumeSession(clients, a.url())
    conn = await session.start()
    await conn.send({"type": "message", "id": "m1", "payload": {"message": "long", "agent": "slow"}})
    await conn.send({"type": "message", "id": "m2", "payload": {"message": "queued", "agent": "slow"}})
    while not (
        any(f["type"] == "stream_chunk" for f in conn.frames)
        and any(f["type"] == "ack" and f["id"] == "m2" for f in conn.frames)
    ):
        await conn.recv()
    conn.drop()
    again = await session.resume(url=b.url())
    assert again.connected["resumed"] is True
    await again.send({"type": "cancel", "id": "m2"})  # queued on A
    await again.send({"type": "cancel", "id": "m1"})  # in flight on A
    await again.until_ended({"m1": ["slow"]}, timeout=10)
    end = session.transcript.end("m1", "slow")
    assert end is not None and end["finish_reason"] == "cancelled" and end["full_response"] == "started "
    # Answered in order: m3 ends within the wait only if m2 (30 s) was dropped.
    await again.send({"type": "message", "id": "m3", "payload": {"message": "quick", "agent": "echo"}})
    await again.until_ended({"m3": ["echo"]}, timeout=15)
    assert [f["type"] for f in session.transcript.of("m2")] == ["ack"]
    assert session.transcript.of("m3")[0]["message_number"] == 3
    session.transcript.assert_complete()
