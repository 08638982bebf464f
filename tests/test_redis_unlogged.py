"""A process that dies with frames its client saw but Redis never got.

The redis store writes a session's frames to Redis in batches (a few milliseconds apart)
while the client gets them at once: a process killed between the two leaves the client
ahead of the log. Its resume on another process must still find the conversation (no
fresh session, no seq used twice). Two real ``python -m connic run`` processes share one
``redis-server``; the first reaches Redis through a proxy that the test stalls.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from redis_server import (
    RedisServer,
    redis_client_fixture,  # noqa: F401  (a fixture)
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
from tcp_proxy import TcpProxy

from conftest import SECRET, CliServer, start_cli

PRODUCER_TIMEOUT = 3


class StallingProxy(TcpProxy):
    """Forwards until :attr:`stalled`; from then on nothing more reaches the far side (writes lost with A)."""

    def __init__(self, target_port: int) -> None:
        super().__init__(target_port)
        self.stalled = False

    def passes(self, data: bytes) -> bool:
        return not self.stalled


b_url_hack = ""


def config(path: Path, redis_url: str) -> Path:
    path.write_text(
        '[agents.assistant]\nuse = "echo"\ndelay = 0.02\n'
        f'[[connectors]]\npath = "/ws"\nsecrets = ["{SECRET}"]\nproducer_timeout = {PRODUCER_TIMEOUT}\n'
        f'[store]\nuse = "redis"\nurl = "{redis_url}"\ntimeout = 30\n'
    )
    return path


@pytest.fixture
async def pair(tmp_path: Path, redis_server: RedisServer) -> AsyncIterator[tuple[CliServer, CliServer, StallingProxy]]:
    """A (reaching Redis through a stallable proxy) and B (straight to Redis)."""
    proxy = await StallingProxy(redis_server.port).start()
    env = store_plugin_env(tmp_path / "plugins")
    a_config = config(tmp_path / "a.toml", f"redis://127.0.0.1:{proxy.port}")
    b_config = config(tmp_path / "b.toml", redis_server.url)
    global b_url_hack
    b_url_hack = redis_server.url
    a = await asyncio.to_thread(start_cli, "--config", str(a_config), env=env)
    try:
        b = await asyncio.to_thread(start_cli, "--config", str(b_config), env=env)
        try:
            yield a, b, proxy
        finally:
            b.stop(signal.SIGTERM)
    finally:
        a.stop(signal.SIGKILL if a.proc.poll() is None else signal.SIGTERM)
        await proxy.close()


async def history(conn: Conn) -> list[str]:
    await conn.send({"type": "history"})
    frame = await conn.until_type("history")
    return [entry["text"] for entry in frame[-1]["entries"]]


async def newest_logged(redis: Any, session_id: str) -> int:
    """The seq of the newest frame in the session's replay log in Redis (0: none)."""
    newest = await redis.xrevrange(f"connic:{{{session_id}}}:log", count=1)
    return int(newest[0][0].partition("-")[2]) if newest else 0


async def test_a_client_ahead_of_the_log_of_a_dead_process_resumes_its_session(
    pair: tuple[CliServer, CliServer, StallingProxy], clients: Clients, redis: Any
) -> None:
    a, b, proxy = pair
    session = ResumeSession(clients, a.url)
    conn = await session.start()
    await conn.send({"type": "message", "id": "m0", "payload": {"message": "before"}})
    await conn.until_ended({"m0": ["assistant"]})
    text = words(500)  # 500 chunks, 20 ms apart: far longer than the test
    await conn.send({"type": "message", "id": "m1", "payload": {"message": text}})
    while len(session.transcript.chunks("m1", "assistant")) < 10:
        await conn.recv()
    proxy.stalled = True  # from here on, A's writes never reach Redis
    await asyncio.sleep(0.1)  # what was on its way is in Redis now
    logged = await newest_logged(redis, session.session_id)
    assert logged >= 10, logged
    while session.transcript.last_seq < logged + 10:
        await conn.recv()  # ten frames or more that the log will never have
    a.proc.kill()
    a.proc.wait(10)
    session.drop()
    last_seq = session.transcript.last_seq
    assert await newest_logged(redis, session.session_id) == logged  # the stall held

    conn_b = await session.resume(url=b.url)
    assert conn_b.connected["resumed"] is True, conn_b.connected
    assert conn_b.connected["session_id"] == session.session_id
    # A's lease runs out: B takes the session over and ends the reply A left unfinished, with
    # a seq after every one the client saw (a seq used twice would be dropped as a duplicate).
    frames = await conn_b.until(lambda f: f["type"] in ("error", "stream_end"), timeout=PRODUCER_TIMEOUT + 10)
    lost = frames[-1]
    assert lost["type"] == "error" and lost["code"] == "producer_lost", lost
    assert lost["id"] == "m1" and lost["seq"] > last_seq, (lost, last_seq)
    session.transcript.assert_complete()
    assert await history(conn_b) == ["before", "before", text]
    await conn_b.send({"type": "message", "id": "m2", "payload": {"message": "after"}})
    await conn_b.until_ended({"m2": ["assistant"]})
    assert session.transcript.of("m2")[0]["message_number"] == 3
    assert all(frame["seq"] > last_seq for frame in session.transcript.of("m2"))
    assert await history(conn_b) == ["before", "before", text, "after", "after"]
    # The frames A never logged are a hole in the log: a resume from inside it is not
    # recovered (as from an evicted frame), and gets no frame after the hole.
    conn_b.drop()
    inside = await session.resume(last_seq=logged + 1, url=b.url)
    assert inside.connected["resumed"] is True and inside.connected["recovered"] is False, inside.connected
    assert inside.connected["session_id"] == session.session_id
    await inside.send({"type": "history"})
    first = await inside.recv()
    assert first["type"] == "history", first  # the next frame: nothing was replayed
