"""PROTOCOL.md section 8 at the instant a reply ends: ``history`` holds every reply whose end the client has.

A client that got an agent's ``stream_end`` (or ``response``) and asks for ``history`` at once
must find that reply in it: the history answers "with the conversation as of the frames the
client has been sent". These tests ask in that gap, many times over, where the answer comes
from: the session's own process (the ``memory`` and the ``redis`` store, before and after a
resume), and a resume on another process that follows the reply (``redis``: answered from
what the owner saved, :mod:`connic.transports.ws_follow_history`). Real servers on loopback,
real ``websockets`` clients; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import resume_helpers
from redis_server import (
    RedisServer,
    flush,
    redis_server_fixture,  # noqa: F401  (a fixture)
    store_plugin_env,
    with_store,
)
from resume_helpers import Clients, Conn, ResumeSession, serve, words

from conftest import SECRET, CliServer, Server, StartServer, start_cli

# `store_url` runs a test against the memory store and against Redis; `clients` closes what is left open.
store_url, clients = resume_helpers.store_url, resume_helpers.clients_fixture

# Two agents: `quick` ends its reply while `slow` still answers the same message (until cancelled).
TWO = {"quick": {"use": "echo"}, "slow": {"use": "slow", "seconds": 30}}
# One agent answers each message (the message's `agent` picks it): a reply that stops, or one cancelled.
EITHER = {"echo": {"use": "echo", "delay": 0.002}, "slow": {"use": "slow", "seconds": 30}}
ROUNDS = 24  # per test: how often the gap is asked in


@pytest.fixture
def start_one(start_server: StartServer, store_url: str | None) -> StartServer:
    """conftest's ``start_server`` with the store under test (Redis emptied first)."""
    if store_url is None:
        return start_server
    flush(store_url)
    return with_store(start_server, store_url)


def user(text: str, message_id: str, number: int) -> dict[str, Any]:
    return {"role": "user", "text": text, "id": message_id, "message_number": number, "agent": None}


def agent(text: str, message_id: str, number: int, name: str) -> dict[str, Any]:
    return {"role": "agent", "text": text, "id": message_id, "message_number": number, "agent": name}


def ends(message_id: str, name: str) -> Any:
    """A predicate: the frame ends ``name``'s reply to ``message_id``."""
    return lambda f: (
        f["type"] in ("stream_end", "response", "error") and f.get("id") == message_id and f.get("agent") == name
    )


def replied(end: dict[str, Any], number: int) -> list[dict[str, Any]]:
    """The history entry the reply ``end`` ended adds: none when it produced no text."""
    text = end["full_response"] if end["type"] == "stream_end" else end["response"]
    return [agent(text, end["id"], number, end["agent"])] if text else []


async def history_now(conn: Conn) -> dict[str, Any]:
    """Send ``history`` at once (nothing awaited before it) and read up to its answer."""
    await conn.send({"type": "history"})
    frame = (await conn.until(lambda f: f["type"] == "history" or (f["type"] == "error" and f["id"] is None)))[-1]
    assert frame["type"] == "history", frame
    return frame


async def end_then_history(conn: Conn, message_id: str, name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read up to the end of ``name``'s reply to ``message_id``, then ask for ``history`` at once; both frames."""
    end = (await conn.until(ends(message_id, name)))[-1]
    assert end["type"] in ("stream_end", "response"), end
    return end, await history_now(conn)


# --- one process ------------------------------------------------------------------------------


@pytest.mark.parametrize("streaming", [True, False])
async def test_a_reply_is_in_the_history_as_soon_as_its_end_is_sent_though_another_agent_answers_on(
    start_one: StartServer, clients: Clients, streaming: bool
) -> None:
    # Two agents answer one message. `quick` ends; `slow` goes on. The client has quick's end,
    # so its `history` holds quick's reply: the history only got the message's replies once
    # all its agents were done (the user message alone was answered here).
    server = await serve(start_one, {"streaming": streaming}, TWO)
    session = ResumeSession(clients, server.url())
    conn = await session.start()
    await conn.send({"type": "message", "id": "m1", "payload": {"message": "one two"}})
    end, got = await end_then_history(conn, "m1", "quick")
    assert got["entries"] == [user("one two", "m1", 1), agent("one two", "m1", 1, "quick")]
    assert got["last_seq"] >= end["seq"]
    await conn.send({"type": "cancel", "id": "m1"})
    end, got = await end_then_history(conn, "m1", "slow")
    assert end["finish_reason"] == "cancelled"
    assert got["entries"][2:] == replied(end, 1)
    # After a resume on the same process, the same.
    session.drop()
    conn = await session.resume()
    assert conn.connected["resumed"] is True
    await conn.send({"type": "message", "id": "m2", "payload": {"message": "three"}})
    _, got = await end_then_history(conn, "m2", "quick")
    assert got["entries"][-2:] == [user("three", "m2", 2), agent("three", "m2", 2, "quick")]


async def test_history_asked_right_after_each_reply_ends_holds_it(start_one: StartServer, clients: Clients) -> None:
    # One agent per message: replies that stop, and replies cancelled mid-stream (the cancel
    # lets the agent's task yield between its end frame and what follows it), some after a
    # resume on the same process. Every `history` sent the moment an end arrives holds it.
    server = await serve(start_one, None, EITHER)
    session = ResumeSession(clients, server.url())
    conn = await session.start()
    for n in range(1, ROUNDS + 1):
        mid, cancelled = f"m{n}", n % 2 == 0
        text = f"say {n}"
        name = "slow" if cancelled else "echo"
        await conn.send({"type": "message", "id": mid, "payload": {"message": text, "agent": name}})
        if cancelled:
            await conn.until(lambda f, mid=mid: f["type"] == "stream_chunk" and f["id"] == mid)
            await conn.send({"type": "cancel", "id": mid})
        end, got = await end_then_history(conn, mid, name)
        reply = "started " if cancelled else text
        assert got["entries"][-2:] == [user(text, mid, n), agent(reply, mid, n, name)], (n, got["entries"][-3:])
        assert got["last_seq"] >= end["seq"]
        if n % 6 == 0:
            session.drop()
            conn = await session.resume()
            assert conn.connected["resumed"] is True


# --- a resume on another process, following the reply (redis) ---------------------------------


async def two_processes(
    start_server: StartServer, redis_server: RedisServer, agents: dict[str, Any]
) -> tuple[Server, Server]:
    start = with_store(start_server, redis_server.url)
    connector = {"producer_timeout": 5}
    return await serve(start, connector, agents), await serve(start, connector, agents)


async def follow_on_b(clients: Clients, a: str, b: str, frame: dict[str, Any]) -> Conn:
    """A session on A (a URL) answering ``frame``, its client dropped once the reply streams, resumed on B."""
    session = ResumeSession(clients, a)
    conn = await session.start()
    await conn.send(frame)
    await conn.until(lambda f: f["type"] == "stream_chunk")
    session.drop()
    conn_b = await session.resume(url=b)
    assert conn_b.connected["resumed"] is True
    return conn_b


async def test_history_while_following_holds_a_reply_that_ended_while_another_agent_answers_on(
    start_server: StartServer, redis_server: RedisServer, clients: Clients
) -> None:
    # B forwards quick's end while A's `slow` still answers: B answers `history` from Redis,
    # where the owner saved the message's replies only once all its agents were done.
    a, b = await two_processes(start_server, redis_server, {**TWO, "quick": {"use": "echo", "delay": 0.02}})
    text = words(10)
    conn = await follow_on_b(clients, a.url(), b.url(), {"type": "message", "id": "m1", "payload": {"message": text}})
    end, got = await end_then_history(conn, "m1", "quick")
    assert got["entries"] == [user(text, "m1", 1), agent(text, "m1", 1, "quick")]
    assert got["last_seq"] >= end["seq"]
    await conn.send({"type": "cancel", "id": "m1"})  # reaches A
    end, got = await end_then_history(conn, "m1", "slow")
    assert got["entries"] == [user(text, "m1", 1), agent(text, "m1", 1, "quick"), *replied(end, 1)]


async def test_history_while_following_holds_the_reply_whose_end_was_just_forwarded(
    start_server: StartServer, redis_server: RedisServer, clients: Clients
) -> None:
    # One agent per message; B follows A's reply and forwards its end; the client asks at once.
    # A cancelled reply's end was logged a batch before the save holding it (some 5 ms later):
    # B answered from Redis without it.
    a, b = await two_processes(start_server, redis_server, EITHER)
    missed: list[tuple[int, list[str]]] = []
    for n in range(ROUNDS):
        cancelled = n % 2 == 0
        name, text = ("slow" if cancelled else "echo"), words(30)
        frame = {"type": "message", "id": "m1", "payload": {"message": text, "agent": name}}
        conn = await follow_on_b(clients, a.url(), b.url(), frame)
        if cancelled:
            await conn.send({"type": "cancel", "id": "m1"})  # reaches A
        end, got = await end_then_history(conn, "m1", name)
        reply = "started " if cancelled else text
        if got["entries"] != [user(text, "m1", 1), agent(reply, "m1", 1, name)]:
            missed.append((n, [entry["role"] for entry in got["entries"]]))
        assert got["last_seq"] >= end["seq"]
        await conn.ws.close()  # the session ends (1000): the next round starts afresh on A
    assert not missed, f"rounds whose history missed the reply just ended: {missed} of {ROUNDS}"


@pytest.fixture
def launch(tmp_path: Path, redis_server: RedisServer) -> Iterator[Callable[[], Awaitable[CliServer]]]:
    """Start ``python -m connic run`` processes sharing ``redis_server`` (an echo agent streaming a word per 10 ms)."""
    env = store_plugin_env(tmp_path / "plugins")
    started: list[CliServer] = []

    async def start() -> CliServer:
        config = tmp_path / f"connic-{len(started)}.toml"
        config.write_text(
            '[agents.assistant]\nuse = "echo"\ndelay = 0.01\n'
            f'[[connectors]]\npath = "/ws"\nsecrets = ["{SECRET}"]\nproducer_timeout = 5\n'
            f'[store]\nuse = "redis"\nurl = "{redis_server.url}"\n'
        )
        server = await asyncio.to_thread(start_cli, "--config", str(config), env=env)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop(signal.SIGKILL)


async def test_history_while_following_a_reply_on_another_os_process_holds_it_once_ended(
    launch: Callable[[], Awaitable[CliServer]], clients: Clients
) -> None:
    # The same across two `python -m connic run` processes: each reply stops or is cancelled
    # on A while B follows it, and the client asks B for `history` the moment B forwards its end.
    a, b = await launch(), await launch()
    missed: list[tuple[int, list[str]]] = []
    for n in range(ROUNDS // 2):
        cancelled = n % 2 == 0
        text = words(200 if cancelled else 20)
        conn = await follow_on_b(clients, a.url, b.url, {"type": "message", "id": "m1", "payload": {"message": text}})
        if cancelled:
            await conn.send({"type": "cancel", "id": "m1"})  # reaches A
        end, got = await end_then_history(conn, "m1", "assistant")
        assert end["finish_reason"] == ("cancelled" if cancelled else "stop"), end
        if got["entries"] != [user(text, "m1", 1), *replied(end, 1)]:
            missed.append((n, [entry["role"] for entry in got["entries"]]))
        await conn.ws.close()
    assert not missed, f"rounds whose history missed the reply just ended: {missed} of {ROUNDS // 2}"
