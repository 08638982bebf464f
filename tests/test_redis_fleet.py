"""A fleet under load on the ``redis`` store: ``--workers 2``, Redis restarted, rolling restarts.

Real ``python -m connic run`` processes sharing one private ``redis-server``
(tests/redis_server.py), real ``websockets`` clients on loopback. Every wait is bounded;
the loads are small (the machine's two cores are shared).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import websockets
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

RECALL_AGENT = '''
import connic


class Recall(connic.Agent):
    """Answers with the texts of the history before this message, joined by " | "."""

    async def respond(self, turn):
        yield " | ".join(entry.text for entry in turn.session.history) or "(nothing)"
'''


@pytest.fixture
def fleet(tmp_path: Path, redis_server: RedisServer) -> Iterator[Any]:
    """``fleet(*args, agent=...)``: a ``python -m connic run`` process on ``redis_server``; killed at the end."""
    env = store_plugin_env(tmp_path / "plugins")
    site = tmp_path / "site"
    site.mkdir()
    (site / "recall_agent.py").write_text(RECALL_AGENT)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(site), env.get("PYTHONPATH", "")) if p)
    started: list[CliServer] = []

    async def start(*args: str, agent: str = 'use = "echo"\ndelay = 0.02') -> CliServer:
        config = tmp_path / f"connic-{len(started)}.toml"
        config.write_text(
            f"[agents.assistant]\n{agent}\n"
            f'[[connectors]]\npath = "/ws"\nsecrets = ["{SECRET}"]\nproducer_timeout = 5\n'
            f'[store]\nuse = "redis"\nurl = "{redis_server.url}"\ntimeout = 1\n'
        )
        process = await asyncio.to_thread(start_cli, "--config", str(config), *args, env=env)
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop(signal.SIGKILL if process.proc.poll() is None else signal.SIGTERM)


async def chat(conn: Conn, message_id: str, text: str, timeout: float = 20) -> dict[str, Any]:
    """Send a message and read until its reply ended; the reply's end."""
    await conn.send({"type": "message", "id": message_id, "payload": {"message": text}})
    await conn.until_ended({message_id: ["assistant"]}, timeout=timeout)
    end = conn.transcript.end(message_id, "assistant")
    assert end is not None
    return end


async def stop(server: CliServer) -> int:
    code, _ = await asyncio.to_thread(server.stop)
    return code


# --- --workers 2 under load -------------------------------------------------------------


async def test_two_workers_serve_40_chatting_clients_and_10_resuming_mid_stream(fleet: Any, clients: Clients) -> None:
    server = await fleet("--workers", "2")

    async def chatting(i: int) -> None:
        session = ResumeSession(clients, server.url)
        conn = await session.start()
        for n in range(3):
            text = words(5, prefix=f"c{i}m{n}-")
            assert (await chat(conn, f"m{n}", text))["full_response"] == text
        session.transcript.assert_complete()

    async def resuming(i: int) -> None:
        session = ResumeSession(clients, server.url)
        conn = await session.start()
        text = words(100, prefix=f"r{i}-")  # 100 chunks, 20 ms apart: about 2 s
        await conn.send({"type": "message", "id": "long", "payload": {"message": text}})
        while len(session.transcript.chunks("long", "assistant")) < 5:
            await conn.recv()
        session.drop()
        # The kernel picks the worker: the same one, or the other following the first's reply.
        conn = await session.resume()
        assert conn.connected["resumed"] is True and conn.connected["recovered"] is True, conn.connected
        await conn.until_ended({"long": ["assistant"]}, timeout=30)
        session.transcript.assert_complete()  # no gap, no duplicate
        end = session.transcript.end("long", "assistant")
        assert end is not None and end["full_response"] == text
        assert (await chat(conn, "next", "after"))["full_response"] == "after"

    async with asyncio.timeout(90):
        await asyncio.gather(*(chatting(i) for i in range(40)), *(resuming(i) for i in range(10)))
    assert server.proc.poll() is None
    assert await stop(server) == 0


# --- Redis stopped and restarted under load -------------------------------------------


async def handshake_status(url: str) -> int | None:
    """The HTTP status refusing a handshake to ``url``, or None when it is accepted (then closed)."""
    try:
        ws = await websockets.connect(url, open_timeout=10, proxy=None)
    except websockets.exceptions.InvalidStatus as exc:
        return exc.response.status_code
    await ws.close()
    return None


async def status_within(url: str, wanted: int | None, seconds: float) -> bool:
    """Whether a handshake to ``url`` gets ``wanted`` (None: accepted) within ``seconds`` (tried every 0.2 s)."""
    deadline = time.monotonic() + seconds
    for _ in itertools.count():
        if await handshake_status(url) == wanted:
            return True
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    return False


async def test_redis_restarted_under_load_fails_sessions_1011_refuses_503_then_recovers(
    fleet: Any, clients: Clients, redis_server: RedisServer
) -> None:
    a, b = await fleet(), await fleet()
    sessions: list[tuple[ResumeSession, Conn]] = []
    for i in range(10):
        session = ResumeSession(clients, (a, b)[i % 2].url)
        sessions.append((session, await session.start()))
    # Every session streams a long reply (about 4 s) while Redis goes away under it.
    for i, (_, conn) in enumerate(sessions):
        await conn.send({"type": "message", "id": "m1", "payload": {"message": words(200, prefix=f"s{i}-")}})
    for session, conn in sessions:
        while len(session.transcript.chunks("m1", "assistant")) < 3:
            await conn.recv()
    redis_server.stop()
    for _, conn in sessions:
        code, frames = await conn.closed(timeout=15)
        assert code == 1011, (code, frames[-3:])
        assert any(f.get("code") == "store_unavailable" and f.get("id") is None for f in frames), frames[-3:]
    for server in (a, b):
        assert await status_within(server.url, 503, 10), f"no 503 from {server.port} while Redis is down"
    assert a.proc.poll() is None and b.proc.poll() is None  # no process crashed
    redis_server.start()  # back, and empty: new sessions work without restarting connic
    for server in (a, b):
        assert await status_within(server.url, None, 10), f"{server.port} still refuses once Redis is back"
        session = ResumeSession(clients, server.url)
        assert (await chat(await session.start(), "m1", "back again"))["full_response"] == "back again"
    assert await stop(a) == 0 and await stop(b) == 0


# --- rolling restarts -----------------------------------------------------------------


async def test_rolling_restart_the_agent_on_the_next_process_sees_the_history(fleet: Any, clients: Clients) -> None:
    recall = 'use = "recall_agent:Recall"'
    a, b = await fleet(agent=recall), await fleet(agent=recall)
    session = ResumeSession(clients, a.url)
    conn = await session.start()
    assert (await chat(conn, "m1", "remember me"))["full_response"] == "(nothing)"  # nothing before it
    assert await stop(a) == 0  # SIGTERM: A drains, lets the session go and closes its connection
    code, _ = await conn.closed(timeout=15)
    assert code == 1001
    conn = await session.resume(url=b.url)
    assert conn.connected["resumed"] is True
    # The agent on B is given what was said on A.
    assert (await chat(conn, "m2", "and now?"))["full_response"] == "remember me | (nothing)"
    # The rest of the rolling restart: A comes back, B goes. The session moves on with all of it.
    a2 = await fleet(agent=recall)
    assert await stop(b) == 0
    with contextlib.suppress(asyncio.TimeoutError):
        await conn.closed(timeout=15)
    conn = await session.resume(url=a2.url)
    assert conn.connected["resumed"] is True
    end = await chat(conn, "m3", "still?")
    assert end["full_response"] == "remember me | (nothing) | and now? | remember me | (nothing)"
    assert session.transcript.of("m3")[0]["message_number"] == 3
    session.transcript.assert_complete()
