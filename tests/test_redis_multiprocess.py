"""The ``redis`` store across real processes: ``python -m connic run`` twice, sharing one ``redis-server``.

Real ``websockets`` clients on loopback; a drop is a TCP reset with no close frame.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
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
    clients_fixture,  # noqa: F401  (a fixture)
    words,
)

from conftest import SECRET, CliServer, start_cli


@pytest.fixture
def launch(tmp_path: Path, redis_server: RedisServer) -> Iterator[Any]:
    """Start ``python -m connic run`` processes sharing ``redis_server``; stopped at the end."""
    config = tmp_path / "connic.toml"
    config.write_text(
        '[agents.assistant]\nuse = "echo"\ndelay = 0.02\n'
        f'[[connectors]]\npath = "/ws"\nsecrets = ["{SECRET}"]\nproducer_timeout = 5\n'
        f'[store]\nuse = "redis"\nurl = "{redis_server.url}"\n'
    )
    env = store_plugin_env(tmp_path / "plugins")
    started: list[CliServer] = []

    async def start(*args: str) -> CliServer:
        server = await asyncio.to_thread(start_cli, "--config", str(config), *args, env=env)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop(signal.SIGKILL if server.proc.poll() is None else signal.SIGTERM)


async def chat(conn: Conn, message_id: str, text: str) -> None:
    await conn.send({"type": "message", "id": message_id, "payload": {"message": text}})
    await conn.until_ended({message_id: ["assistant"]})


async def history(conn: Conn) -> list[str]:
    await conn.send({"type": "history"})
    frames = await conn.until_type("history")
    return [entry["text"] for entry in frames[-1]["entries"]]


async def stop(server: CliServer) -> int:
    code, _ = await asyncio.to_thread(server.stop)
    return code


async def test_idle_session_moves_to_the_other_process(launch: Any, clients: Clients) -> None:
    a, b = await launch(), await launch()
    session = ResumeSession(clients, a.url)
    conn = await session.start()
    await chat(conn, "m1", "hello there")
    session.drop()
    conn_b = await session.resume(url=b.url)
    assert conn_b.connected["resumed"] is True and conn_b.connected["session_id"] == session.session_id
    await chat(conn_b, "m2", "again")
    assert session.transcript.of("m2")[0]["message_number"] == 2
    assert await history(conn_b) == ["hello there", "hello there", "again", "again"]
    session.transcript.assert_complete()


async def test_reply_dropped_on_one_process_streams_on_through_the_other(launch: Any, clients: Clients) -> None:
    a, b = await launch(), await launch()
    session = ResumeSession(clients, a.url)
    conn = await session.start()
    text = words(300)  # 300 chunks, 20 ms apart: about 6 s
    await conn.send({"type": "message", "id": "m1", "payload": {"message": text}})
    while len(session.transcript.chunks("m1", "assistant")) < 10:
        await conn.recv()
    session.drop()
    conn_b = await session.resume(url=b.url)
    assert conn_b.connected["resumed"] is True and conn_b.connected["recovered"] is True
    # Live: B sends A's frames while A still answers (the reply is not over when connected came).
    assert conn_b.connected["last_seq"] < 3 + 300
    await conn_b.until_ended({"m1": ["assistant"]}, timeout=30)
    session.transcript.assert_complete()
    end = session.transcript.end("m1", "assistant")
    assert end is not None and end["full_response"] == text
    await chat(conn_b, "m2", "after")  # B serves the session now
    assert await history(conn_b) == [text, text, "after", "after"]


async def test_many_replies_followed_at_once_on_the_other_process(launch: Any, clients: Clients) -> None:
    # One reader follows every log B follows: sessions joining while it waits (one at a time,
    # then a burst) are read from then on, each reply whole, in order, with no gap.
    a, b = await launch(), await launch()
    texts = [words(80, prefix=f"s{i}w") for i in range(12)]  # 80 chunks, 20 ms apart: about 1.6 s
    sessions = []
    for text in texts:
        session = ResumeSession(clients, a.url)
        conn = await session.start()
        await conn.send({"type": "message", "id": "m1", "payload": {"message": text}})
        sessions.append((session, conn))
    for session, conn in sessions:
        while len(session.transcript.chunks("m1", "assistant")) < 5:
            await conn.recv()
        session.drop()
    resumed = [await session.resume(url=b.url) for session, _ in sessions[:3]]
    await asyncio.sleep(0.3)  # B's reader is waiting on those three when the others come
    resumed += await asyncio.gather(*(session.resume(url=b.url) for session, _ in sessions[3:]))
    for conn_b, (session, _), text in zip(resumed, sessions, texts, strict=True):
        assert conn_b.connected["resumed"] is True and conn_b.connected["recovered"] is True
        await conn_b.until_ended({"m1": ["assistant"]}, timeout=30)
        session.transcript.assert_complete()
        end = session.transcript.end("m1", "assistant")
        assert end is not None and end["full_response"] == text


async def test_sessions_resume_after_every_process_restarted(launch: Any, clients: Clients) -> None:
    a, b = await launch(), await launch()
    sessions = []
    for server in (a, b):
        session = ResumeSession(clients, server.url)
        conn = await session.start()
        await chat(conn, "m1", f"kept by {server.port}")
        sessions.append(session)
    assert await stop(a) == 0 and await stop(b) == 0  # SIGTERM: drained, the sessions let go
    c = await launch()
    for session, port in zip(sessions, (a.port, b.port), strict=True):
        conn = await session.resume(url=c.url)
        assert conn.connected["resumed"] is True
        assert await history(conn) == [f"kept by {port}"] * 2
        await chat(conn, "m2", "still here")
        assert session.transcript.of("m2")[0]["message_number"] == 2


async def test_workers_share_sessions(launch: Any, clients: Clients) -> None:
    server = await launch("--workers", "2")
    sessions = []
    for i in range(6):
        session = ResumeSession(clients, server.url)
        conn = await session.start()
        await chat(conn, "m1", f"session {i}")
        session.drop()
        sessions.append(session)
    # Each resume lands on whichever worker the kernel picks: every one finds its session.
    for i, session in enumerate(sessions):
        conn = await session.resume()
        assert conn.connected["resumed"] is True, conn.connected
        assert await history(conn) == [f"session {i}"] * 2


async def test_killed_producer_ends_its_reply_with_producer_lost(launch: Any, clients: Clients) -> None:
    a, b = await launch(), await launch()
    session = ResumeSession(clients, a.url)
    conn = await session.start()
    await chat(conn, "m0", "before")
    text = words(500)  # 500 chunks, 20 ms apart: about 10 s, far longer than the test waits
    await conn.send({"type": "message", "id": "m1", "payload": {"message": text}})
    while len(session.transcript.chunks("m1", "assistant")) < 10:
        await conn.recv()
    session.drop()
    conn_b = await session.resume(url=b.url)
    assert conn_b.connected["resumed"] is True
    while len(session.transcript.chunks("m1", "assistant")) < 20:  # B follows A's reply live
        await conn_b.recv()
    a.proc.kill()  # kill -9 mid-reply: A's lease (producer_timeout = 5 s) runs out, B takes over
    a.proc.wait(10)
    frames = await conn_b.until(lambda f: f["type"] in ("error", "stream_end"), timeout=5 + 3)
    lost = frames[-1]
    assert lost["type"] == "error" and lost["code"] == "producer_lost", lost
    assert lost["id"] == "m1" and lost["agent"] == "assistant" and "seq" in lost, lost
    assert len(session.transcript.chunks("m1", "assistant")) < 500
    session.transcript.assert_complete()
    # The user message is in the history; the lost partial answer is not.
    assert await history(conn_b) == ["before", "before", text]
    await chat(conn_b, "m2", "after")  # the session goes on, on B
    assert session.transcript.of("m2")[0]["message_number"] == 3
    assert await history(conn_b) == ["before", "before", text, "after", "after"]
    # Logged: a resume from before it replays it.
    session.drop()
    again = await session.resume(last_seq=lost["seq"] - 1, url=b.url)
    replayed = await again.recv()
    assert replayed["seq"] == lost["seq"] and replayed["code"] == "producer_lost", replayed
    assert 'connic_producer_lost_total{connector="/ws"} 1.0' in await metrics(b)


async def test_cancel_sent_to_the_follower_stops_the_owners_agent(launch: Any, clients: Clients) -> None:
    a, b = await launch(), await launch()
    session = ResumeSession(clients, a.url)
    conn = await session.start()
    text = words(500)  # 500 chunks, 20 ms apart: about 10 s
    await conn.send({"type": "message", "id": "m1", "payload": {"message": text}})
    while len(session.transcript.chunks("m1", "assistant")) < 10:
        await conn.recv()
    session.drop()
    conn_b = await session.resume(url=b.url)
    while len(session.transcript.chunks("m1", "assistant")) < 20:  # B follows A's reply live
        await conn_b.recv()
    await conn_b.send({"type": "cancel", "id": "m1"})
    await conn_b.until_ended({"m1": ["assistant"]}, timeout=5)  # not the 10 s the reply would take
    end = session.transcript.end("m1", "assistant")
    assert end is not None and end["finish_reason"] == "cancelled", end
    assert len(session.transcript.chunks("m1", "assistant")) < 250
    assert text.startswith(end["full_response"]) and len(end["full_response"]) < len(text) // 2, end
    session.transcript.assert_complete()
    await chat(conn_b, "m2", "after")  # B takes the session over once A let it go
    assert session.transcript.of("m2")[0]["message_number"] == 2


async def metrics(server: CliServer) -> str:
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{server.port}/metrics") as response:
        return await response.text()
