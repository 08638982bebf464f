"""Redis that stalls (SIGSTOP: a hung server, or a network dropping packets) under live sessions.

Real ``python -m connic run`` processes on a private ``redis-server`` (tests/redis_server.py),
real ``websockets`` clients on loopback. Redis is stopped for longer than the store's
``timeout``, so that every store call under way fails, then let run again. Every wait is
bounded; nothing is timed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import threading
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
    ResumeSession,
    clients_fixture,  # noqa: F401  (a fixture)
    words,
)
from test_redis_fleet import chat, status_within

from conftest import SECRET, CliServer, start_cli


class Served:
    """A ``python -m connic run`` on the test's Redis, and the lines it printed so far."""

    def __init__(self, server: CliServer) -> None:
        self.server = server
        self.lines: list[str] = []
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        # Read what it prints, or a full pipe would stop the server at its next log line.
        assert self.server.proc.stdout is not None
        for line in self.server.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def url(self) -> str:
        return self.server.url

    async def printed(self, pattern: str, timeout: float = 20, times: int = 1) -> str:
        """The ``times``-th line matching the regular expression ``pattern``, waited for up to ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [line for line in list(self.lines) if re.search(pattern, line)]
            if len(found) >= times:
                return found[times - 1]
            await asyncio.sleep(0.05)
        raise AssertionError(f"no {times} lines matching {pattern!r}:\n" + "\n".join(self.lines))


@pytest.fixture
def served(tmp_path: Path, redis_server: RedisServer) -> Iterator[Any]:
    """``served(producer_timeout)``: a ``python -m connic run`` on ``redis_server`` (echo agent); killed at the end.

    Redis is let run again (SIGCONT) first, whatever the test left it as.
    """
    pytest.importorskip("redis.asyncio", reason="redis-py is not installed (pip install 'connic[redis]')")
    env = store_plugin_env(tmp_path / "plugins")
    started: list[Served] = []

    async def start(producer_timeout: float = 1.0) -> Served:
        config = tmp_path / "connic.toml"
        config.write_text(
            '[agents.assistant]\nuse = "echo"\ndelay = 0.01\n'
            f'[[connectors]]\npath = "/ws"\nsecrets = ["{SECRET}"]\nproducer_timeout = {producer_timeout}\n'
            f'[store]\nuse = "redis"\nurl = "{redis_server.url}"\ntimeout = 0.5\n'
        )
        server = Served(await asyncio.to_thread(start_cli, "--config", str(config), env=env))
        started.append(server)
        return server

    yield start
    if redis_server.proc is not None:
        os.kill(redis_server.proc.pid, signal.SIGCONT)
    for server in started:
        if server.server.proc.poll() is None:
            server.server.proc.kill()


def _history(frame: dict[str, Any]) -> list[tuple[str, Any, str]]:
    return [(entry["role"], entry["id"], entry["text"]) for entry in frame["entries"]]


async def test_a_session_let_go_while_redis_stalls_is_let_go_as_it_was_once_redis_answers(
    served: Any, clients: Clients, redis_server: RedisServer
) -> None:
    # Redis stops answering; a message is acked and answered in full meanwhile (the agent needs no
    # store), then its session's write times out: store_unavailable, 1011, resumable. Idle and
    # detached, the session is let go, and that last save times out too. It was dropped from the
    # process's memory all the same: a resume once Redis was back took Redis's older copy, which
    # had the message pending (producer_lost for a reply the client saw end) and no answer to it
    # in the history.
    a, b = await served(), await served()
    session = ResumeSession(clients, a.url)
    conn = await session.start()
    assert (await chat(conn, "m1", "one two three"))["full_response"] == "one two three"
    assert redis_server.proc is not None
    os.kill(redis_server.proc.pid, signal.SIGSTOP)
    try:
        assert (await chat(conn, "m2", "four five six"))["full_response"] == "four five six"
        code, frames = await conn.closed(timeout=20)
        assert code == 1011 and [f["code"] for f in frames if f["type"] == "error"] == ["store_unavailable"]
        # Its release (the save letting it go) timed out too.
        await a.printed(rf"session {session.session_id}: (RELEASE|letting it go) failed")
    finally:
        os.kill(redis_server.proc.pid, signal.SIGCONT)
    expected = [
        ("user", "m1", "one two three"),
        ("agent", "m1", "one two three"),
        ("user", "m2", "four five six"),
        ("agent", "m2", "four five six"),
    ]
    for url in (a.url, b.url):  # the process that held it, then Redis's copy, on another
        again = await session.resume(url=url)
        assert again.connected["resumed"] is True, again.connected
        await again.send({"type": "history"})
        got = await again.until_type("history")
        assert [f for f in got if f["type"] == "error"] == []
        assert _history(got[-1]) == expected
        session.drop()


async def test_cancels_sent_to_a_follower_while_redis_stalls_reach_the_owner_once_it_answers(
    served: Any, clients: Clients, redis_server: RedisServer
) -> None:
    # A client following on B a reply that A runs cancels it while Redis does not answer, then
    # floods B with cancels. B passed them to A one Redis call after another: the first (the
    # cancel of the reply) timed out and was dropped with a warning, the reply ran to its end;
    # the others waited in B's memory and were passed one per `timeout` while Redis stalled
    # (a warning each), then one round trip each. The owner's lease outlasts the stall here: one
    # that lapses meanwhile is another matter (the follower's claims between its reads).
    a, b = await served(10), await served(10)
    session = ResumeSession(clients, a.url)
    conn = await session.start()
    text = words(1500)  # 1500 chunks 10 ms apart: some 15 s, longer than the whole test's stall
    await conn.send({"type": "message", "id": "m1", "payload": {"message": text}})
    while len(session.transcript.chunks("m1", "assistant")) < 3:
        await conn.recv()
    session.drop()
    conn = await session.resume(url=b.url)
    assert conn.connected["resumed"] is True, conn.connected
    await conn.until(lambda f: f.get("type") == "stream_chunk")
    assert redis_server.proc is not None
    os.kill(redis_server.proc.pid, signal.SIGSTOP)
    try:
        await conn.send({"type": "cancel", "id": "m1"})
        with contextlib.suppress(websockets.ConnectionClosed):
            for i in range(2000):
                await conn.send({"type": "cancel", "id": f"x{i}"})
        code, _ = await conn.closed(timeout=20)
        assert code == 1011
        await b.printed(rf"session {session.session_id}: passing .*cancel.* failed")
        await asyncio.sleep(3)  # Redis stays stopped a while longer (a stall, not a blip)
    finally:
        os.kill(redis_server.proc.pid, signal.SIGCONT)
    again = await session.resume(url=a.url)
    assert again.connected["resumed"] is True, again.connected
    await again.until_ended({"m1": ["assistant"]}, timeout=30)
    end = session.transcript.end("m1", "assistant")
    assert end is not None and end["finish_reason"] == "cancelled", end
    failures = [line for line in b.lines if "cancel" in line and "failed" in line]
    assert len(failures) <= 2, failures  # one line for the cancels waiting, not one per cancel


async def test_a_reply_streaming_while_redis_is_down_logs_its_failed_writes_once(
    served: Any, clients: Clients, redis_server: RedisServer
) -> None:
    # Redis stopped (connections refused at once) under a reply that goes on detached after its
    # connection ended store_unavailable: each batch of its frames failed at once and logged a
    # warning, some 40 a second per streaming session (about 100 in the 2.3 s of one outage
    # measured), a log flood proportional to sessions times chunks.
    a = await served()
    session = ResumeSession(clients, a.url)
    conn = await session.start()
    await conn.send({"type": "message", "id": "m1", "payload": {"message": words(600)}})
    while len(session.transcript.chunks("m1", "assistant")) < 3:
        await conn.recv()
    redis_server.stop()
    code, _ = await conn.closed(timeout=20)
    assert code == 1011
    # A few lease renewals (a third of producer_timeout apart) fail meanwhile.
    await a.printed("renewing .* failed", times=4)
    redis_server.start()
    failed = [line for line in list(a.lines) if f"session {session.session_id}: APPEND failed" in line]
    assert 1 <= len(failed) <= 2, failed
    fresh = ResumeSession(clients, a.url)
    assert await status_within(a.url, None, 10)
    assert (await chat(await fresh.start(), "m1", "back"))["full_response"] == "back"
