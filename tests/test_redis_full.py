"""Redis full under live sessions: ``maxmemory`` reached with ``maxmemory-policy noeviction``.

Redis then answers reads and refuses writes (``-OOM command not allowed when used memory >
'maxmemory'``) until it has room. Real ``python -m connic run`` processes on a private
``redis-server`` (tests/redis_server.py) filled with ``CONFIG SET maxmemory 1`` and given room
again with ``CONFIG SET maxmemory 0``: nothing is evicted meanwhile. Real ``websockets``
clients; every wait is bounded, nothing is timed. docs/deployment.md, "When Redis is full".
"""

from __future__ import annotations

import asyncio
import signal
import threading
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
    ResumeSession,
    clients_fixture,  # noqa: F401  (a fixture)
    words,
)
from test_redis_fleet import chat, status_within

from conftest import SECRET, CliServer, start_cli

PRODUCER_TIMEOUT = 1.0
"""The lease of a session's owner in these tests (renewed every third of it)."""


class Served:
    """A ``python -m connic run`` and the lines it logged so far (read by a thread, so its pipe never fills)."""

    def __init__(self, server: CliServer) -> None:
        self.server = server
        self.url = server.url
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.server.proc.stdout is not None
        for line in self.server.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def logged(self, text: str) -> list[str]:
        return [line for line in self.lines if text in line]

    async def until_logged(self, text: str, seconds: float = 10) -> list[str]:
        """The lines holding ``text``, once there is one (≤ ``seconds``)."""
        for _ in range(int(seconds / 0.05)):
            if found := self.logged(text):
                return found
            await asyncio.sleep(0.05)
        return []


@pytest.fixture
def served(tmp_path: Path, redis_server: RedisServer) -> Iterator[Any]:
    """``served()``: a ``python -m connic run`` on ``redis_server`` (echo agent), its log kept; killed at the end."""
    pytest.importorskip("redis.asyncio", reason="redis-py is not installed (pip install 'connic[redis]')")
    env = store_plugin_env(tmp_path / "plugins")
    started: list[CliServer] = []

    async def start() -> Served:
        config = tmp_path / "connic.toml"
        config.write_text(
            '[agents.assistant]\nuse = "echo"\ndelay = 0.01\n'
            f'[[connectors]]\npath = "/ws"\nsecrets = ["{SECRET}"]\nproducer_timeout = {PRODUCER_TIMEOUT}\n'
            f'[store]\nuse = "redis"\nurl = "{redis_server.url}"\ntimeout = 0.5\n'
        )
        server = await asyncio.to_thread(start_cli, "--config", str(config), env=env)
        started.append(server)
        return Served(server)

    yield start
    for server in started:
        if server.proc.poll() is None:
            server.proc.kill()


async def _maxmemory(url: str, value: str) -> None:
    """``CONFIG SET maxmemory value`` (``"1"``: Redis is full at once; ``"0"``: no limit)."""
    import redis.asyncio as aioredis

    admin = aioredis.Redis.from_url(url)
    try:
        assert await admin.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
        await admin.config_set("maxmemory", value)
    finally:
        await admin.aclose()


async def _history(conn: Any) -> list[tuple[str, str]]:
    """The session's history as (role, text) pairs, asked for on ``conn``."""
    await conn.send({"type": "history"})
    frames = await conn.until_type("history")
    return [(entry["role"], entry["text"]) for entry in frames[-1]["entries"]]


async def test_a_full_redis_gets_handshakes_503_then_serves_again_once_it_has_room(
    served: Any, clients: Clients, redis_server: RedisServer
) -> None:
    # Redis full answers reads and the probe (a script writing nothing): every new handshake was
    # let in, and closed 1011 once its session's creation was refused, never the 503
    # (Retry-After) that tells clients and load balancers to wait.
    server = await served()
    session = ResumeSession(clients, server.url)
    conn = await session.start()
    assert (await chat(conn, "m0", "before"))["full_response"] == "before"
    quiet = await ResumeSession(clients, server.url).start()
    await _maxmemory(redis_server.url, "1")
    await conn.send({"type": "message", "id": "m1", "payload": {"message": "while full"}})
    code, frames = await conn.closed()
    # A store failure (resumable), never a takeover (4011, which clients take as final).
    assert code == 1011 and [f["code"] for f in frames if f["type"] == "error"] == ["store_unavailable"]
    assert await status_within(server.url, 503, 5), "handshakes still accepted while Redis refuses every write"
    await _maxmemory(redis_server.url, "0")
    assert await status_within(server.url, None, 10), "handshakes still refused once Redis has room"
    assert (await chat(await ResumeSession(clients, server.url).start(), "m1", "room"))["full_response"] == "room"
    # A session that wrote nothing meanwhile kept its connection (its lease renewals need no room).
    assert (await chat(quiet, "m1", "still here"))["full_response"] == "still here"
    assert server.server.proc.poll() is None


async def test_a_process_stopped_while_redis_is_full_stops(
    served: Any, clients: Clients, redis_server: RedisServer
) -> None:
    # A session let go while Redis is full is held back until it has room: a stop must not wait for that.
    server = await served()
    conn = await ResumeSession(clients, server.url).start()
    await conn.send({"type": "message", "id": "m1", "payload": {"message": words(20)}})
    await conn.until(lambda f: f.get("type") == "stream_chunk")
    await _maxmemory(redis_server.url, "1")
    assert (await conn.closed())[0] == 1011
    await asyncio.sleep(0.5)  # the reply ends (20 chunks, 10 ms apart): its session's release is held back
    server.server.proc.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(server.server.proc.wait, 20) == 0
    await asyncio.sleep(0.2)  # the reader thread takes the last lines
    assert [line for line in server.lines if "Traceback" in line or " ERROR " in line] == []


async def test_redis_full_under_streaming_sessions_is_logged_once_and_its_end_once(
    served: Any, clients: Clients, redis_server: RedisServer
) -> None:
    # Every batch of every streaming session had each of its writes refused, and logged a line
    # for each (`session <id>: APPEND failed: ...`): a hundred lines a second per session.
    server = await served()
    conns = [await ResumeSession(clients, server.url).start() for _ in range(4)]
    for i, conn in enumerate(conns):
        await conn.send({"type": "message", "id": "m1", "payload": {"message": words(100, prefix=f"s{i}-")}})
        await conn.until(lambda f: f.get("type") == "stream_chunk")
    await _maxmemory(redis_server.url, "1")
    for conn in conns:
        code, _ = await conn.closed()
        assert code == 1011
    # The replies go on detached, their writes refused, until they end (100 chunks, 10 ms apart).
    await asyncio.sleep(1.5)
    await _maxmemory(redis_server.url, "0")
    over = await server.until_logged("Redis takes writes again")
    assert len(over) == 1, over
    full = server.logged("Redis is full")
    assert len(full) == 1, "\n".join(server.lines)
    assert "noeviction" in full[0] and "503" in full[0], full[0]
    refused = [line for line in server.lines if "maxmemory" in line or "OutOfMemory" in line]
    assert refused == full, "\n".join(refused)


async def test_replies_that_end_while_redis_is_full_are_in_the_session_once_it_has_room(
    served: Any, clients: Clients, redis_server: RedisServer
) -> None:
    # A session whose connection ended (1011) goes on detached: its reply ends, and it is let go.
    # Redis full refused the SAVE of that release but ran the RELEASE after it (it frees memory):
    # the session was let go as Redis last had it, and a reply that ended (or a message
    # acknowledged) while Redis was full was lost, although nothing was evicted and the process
    # that held it never stopped (`1 reply(s) lost with the process answering them` on resume).
    server = await served()
    streaming = ResumeSession(clients, server.url)
    conn = await streaming.start()
    assert (await chat(conn, "m0", "before"))["full_response"] == "before"
    text = words(150)
    await conn.send({"type": "message", "id": "m1", "payload": {"message": text}})
    await conn.until(lambda f: f.get("type") == "stream_chunk")
    idle = ResumeSession(clients, server.url)
    idle_conn = await idle.start()
    assert await idle_conn.barrier() == []
    await _maxmemory(redis_server.url, "1")
    assert (await conn.closed())[0] == 1011
    await idle_conn.send({"type": "message", "id": "m1", "payload": {"message": "acknowledged while full"}})
    code, frames = await idle_conn.closed()
    assert code == 1011 and frames[0]["type"] == "ack", frames
    await asyncio.sleep(2.5)  # the reply ends (150 chunks, 10 ms apart), and both sessions are let go
    await _maxmemory(redis_server.url, "0")
    assert await status_within(server.url, None, 10)
    again = await streaming.resume()
    assert again.connected["resumed"] is True, again.connected
    assert await _history(again) == [("user", "before"), ("agent", "before"), ("user", text), ("agent", text)]
    again = await idle.resume()
    assert again.connected["resumed"] is True, again.connected
    expected = [("user", "acknowledged while full"), ("agent", "acknowledged while full")]
    assert await _history(again) == expected
    assert server.logged("lost with the process") == []
