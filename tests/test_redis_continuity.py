"""What a session carries from one process to another with the ``redis`` store, against one process.

The mission: any process serves any session, nothing lost when a connection or a process
drops. Each test here does on two processes sharing one ``redis-server`` what works on one
process with the ``memory`` store, and checks that the client and the agents see the same.
"Processes" are connic apps in this test process, each with its own registry, store and
TestServer (as in tests/test_redis_store.py); clients are real ``websockets`` clients.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis_server import (
    RedisServer,
    redis_client_fixture,  # noqa: F401  (a fixture)
    redis_server_fixture,  # noqa: F401  (a fixture)
)
from resume_helpers import (
    Clients,
    ResumeSession,
    clients_fixture,  # noqa: F401  (a fixture)
)
from test_redis_store import chat, config, history, registry

import connic
from conftest import Server, StartServer

aioredis = pytest.importorskip("redis.asyncio", reason="redis-py is not installed (pip install 'connic[redis]')")


class Keeper(connic.Agent):
    """Keeps what it is told in its state, as the agent decides: answers with the state it had.

    ``"deep N"`` nests its state N levels deep (a linked list of turns, as an agent keeping
    a chain of its exchanges would); anything else is appended to ``said``.
    """

    async def respond(self, turn: connic.Turn) -> AsyncIterator[str | connic.Usage]:
        state = turn.session.state
        before = json.dumps({"said": state.get("said", []), "depth": _depth(state.get("chain"))})
        if turn.message.startswith("deep "):
            chain: Any = None
            for _ in range(int(turn.message.split()[1])):
                chain = {"prev": chain}
            state["chain"] = chain
        else:
            state.setdefault("said", []).append(turn.message)
        yield before


def _depth(chain: Any) -> int:
    depth = 0
    while isinstance(chain, dict):
        chain = chain.get("prev")
        depth += 1
    return depth


async def process(start_server: StartServer, url: str, connector: dict[str, Any] | None = None) -> Server:
    """One connic "process" whose agent is a :class:`Keeper`."""
    reg = registry()
    reg.register("agents", "keeper", Keeper)
    return await start_server(config(url, connector, {"assistant": {"use": "keeper"}}), registry=reg)


async def told(conn: Any, session: ResumeSession, message_id: str, text: str) -> dict[str, Any]:
    """Send ``text``; the state the agent had before it (its answer)."""
    await chat(conn, message_id, text)
    end = session.transcript.end(message_id, "assistant")
    assert end is not None
    answer: dict[str, Any] = json.loads(end["full_response"])
    return answer


async def owner_gone(redis: Any, session: ResumeSession) -> None:
    """Until no process owns the session (it was saved and let go): bounded."""
    for _ in range(500):
        if not await redis.exists(f"connic:{{{session.session_id}}}:owner"):
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the session was never let go")


# --- each agent's state -----------------------------------------------------------------


async def test_state_holding_a_lone_surrogate_resumes_on_another_process(
    redis_server: RedisServer, redis: Any, start_server: StartServer, clients: Clients
) -> None:
    # JSON lets a client send a lone surrogate ("\ud800"), and an agent may keep the text it
    # was sent in its state. On one process the session resumes with it. The record went to
    # Redis with the surrogate escaped, and the claim's Lua (cjson) refuses such an escape:
    # every resume on another process got a fresh session, the conversation gone.
    a = await process(start_server, redis_server.url)
    b = await process(start_server, redis_server.url)
    session = ResumeSession(clients, a.url())
    conn = await session.start()
    text = "half a pair \ud800 and a whole one \U0001f600, a NUL \x00"
    assert (await told(conn, session, "m1", text))["said"] == []
    session.drop()
    await owner_gone(redis, session)
    conn_b = await session.resume(url=b.url())
    assert conn_b.connected["resumed"] is True and conn_b.connected["session_id"] == session.session_id
    assert (await told(conn_b, session, "m2", "again"))["said"] == [text]
    assert [entry["text"] for entry in await history(conn_b)][::2] == [text, "again"]


async def test_a_state_nested_too_deep_for_json_fails_its_own_session_not_the_process(
    redis_server: RedisServer, redis: Any, start_server: StartServer, clients: Clients
) -> None:
    # An agent may nest its state as deep as it likes on one process. JSON cannot encode a
    # thousand levels (RecursionError, not the TypeError or ValueError the writer expected):
    # the writer's batch failed whole, and every batch after it (the session stayed queued),
    # so no frame nor record of any session of the process reached Redis again.
    a = await process(start_server, redis_server.url)
    b = await process(start_server, redis_server.url)
    other = ResumeSession(clients, a.url())
    other_conn = await other.start()
    await told(other_conn, other, "m1", "before")
    deep = ResumeSession(clients, a.url())
    deep_conn = await deep.start()
    await deep_conn.send({"type": "message", "id": "d1", "payload": {"message": "deep 1200"}})
    code, _ = await deep_conn.closed()
    assert code == 1011  # docs/deployment.md: a state JSON cannot encode ends its connection so
    assert (await told(other_conn, other, "m2", "after"))["said"] == ["before"]
    other.drop()
    await owner_gone(redis, other)
    conn_b = await other.resume(url=b.url())
    assert conn_b.connected["resumed"] is True and conn_b.connected["recovered"] is True
    assert (await told(conn_b, other, "m3", "again"))["said"] == ["before", "after"]
    other.transcript.assert_complete()
