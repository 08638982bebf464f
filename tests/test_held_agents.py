"""Held cancels on a follower (process B) when the connector links one agent or two, against one process.

The session answers m1 on process A, the client resumes on B, which follows A's reply and holds
what it sends meanwhile; the same frames go to one process (the ``memory`` store). With two
agents a message stopped ends ``cancelled`` once per agent: B counted each end as a cancel the
owner took, and let go a later held cancel of the id that one process acts on.
Real ``python -m connic run`` processes, a real ``redis-server``, real ``websockets`` clients.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from redis_server import (
    RedisServer,
    redis_server_fixture,  # noqa: F401  (a fixture)
    store_plugin_env,
)
from resume_helpers import Clients, Conn, ResumeSession, clients_fixture  # noqa: F401  (a fixture)
from test_review5 import _run

from conftest import SECRET, CliServer, start_cli

TWO_AGENTS = ("assistant", "helper")


@pytest.fixture
def launch(tmp_path: Path, redis_server: RedisServer) -> Iterator[Any]:
    """Start ``python -m connic run`` processes with echo agents (``agents``: their names, by default
    ``assistant`` and ``helper``), sharing ``redis_server`` unless not ``shared``."""
    env = store_plugin_env(tmp_path / "plugins")
    started: list[CliServer] = []

    async def start(shared: bool = True, agents: tuple[str, ...] = TWO_AGENTS) -> CliServer:
        config = tmp_path / f"connic-{len(started)}.toml"
        store = f'[store]\nuse = "redis"\nurl = "{redis_server.url}"\n' if shared else ""
        config.write_text(
            "".join(f'[agents.{agent}]\nuse = "echo"\ndelay = 0.02\n' for agent in agents)
            + f'[[connectors]]\npath = "/ws"\nsecrets = ["{SECRET}"]\n'
            + store
        )
        server = await asyncio.to_thread(start_cli, "--config", str(config), env=env)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop(signal.SIGKILL if server.proc.poll() is None else signal.SIGTERM)


async def one_or_two(launch: Any, shared: bool, agents: tuple[str, ...] = TWO_AGENTS) -> tuple[CliServer, CliServer]:
    """Process A, and B sharing its ``redis-server`` when ``shared``; else A twice (one process, the memory store)."""
    a = await launch(shared=shared, agents=agents)
    return a, (await launch(agents=agents) if shared else a)


async def resumed_mid_reply(session: ResumeSession, to: CliServer) -> Conn:
    """Drop ``session`` once the assistant's m1 streamed 5 chunks, resume it on ``to``, and return
    the new connection once 2 more chunks came (the reply still streams where it began)."""
    conn = session.conn
    assert conn is not None
    while len(session.transcript.chunks("m1", "assistant")) < 5:
        await conn.recv()
    session.drop()
    conn = await session.resume(url=to.url)
    assert conn.connected["resumed"] is True
    seen = len(session.transcript.chunks("m1", "assistant"))
    while len(session.transcript.chunks("m1", "assistant")) < seen + 2:
        await conn.recv()
    return conn


@pytest.mark.parametrize("agents", [("assistant",), TWO_AGENTS], ids=["one_agent", "two_agents"])
async def test_a_second_cancel_behind_a_held_message_after_a_cancel_passed_at_once_drops_it(
    launch: Any, clients: Clients, agents: tuple[str, ...]
) -> None:
    # PROTOCOL.md §5: the first cancel stops m1 in flight (each agent ends cancelled); the second
    # finds it stopped already and drops the m1 queued behind it (or stops it, had it begun): the
    # second m1 never runs to its end.
    for shared in (False, True):
        a, b = await one_or_two(launch, shared, agents)
        frames, _ = await _run(a, b, clients, [], ["-m1", "m1", "-m1"])
        ends = {key[3]: n for key, n in frames.items() if key[:2] == ("stream_end", "m1")}
        assert frames[("error", "m1", None, None, "not_found")] == 0, (shared, frames)
        assert frames[("ack", "m1", 2, None, None)] == 1 and "stop" not in ends, (shared, frames)
