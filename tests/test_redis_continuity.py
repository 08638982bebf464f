"""What a session carries from one process to another with the ``redis`` store, against one process.

The mission: any process serves any session, nothing lost when a connection or a process
drops. Each test here does on two processes sharing one ``redis-server`` what works on one
process with the ``memory`` store, and checks that the client and the agents see the same.
"Processes" are connic apps in this test process, each with its own registry, store and
TestServer (as in tests/test_redis_store.py), or ``python -m connic run`` subprocesses where
one is killed; clients are real ``websockets`` and HTTP clients. A test marked
``xfail(strict=True)`` pins a difference whose fix belongs in a file of another branch (its
reason names it): it passes, and so fails strict, once that fix lands.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
import websockets
from redis_server import (
    RedisServer,
    redis_client_fixture,  # noqa: F401  (a fixture)
    redis_server_fixture,  # noqa: F401  (a fixture)
    store_plugin_env,
    with_store,
)
from resume_helpers import (
    Clients,
    ResumeSession,
    clients_fixture,  # noqa: F401  (a fixture)
    words,
)
from test_agui_support import AUTH, agui_config, agui_registry, post_run, run_input, text_of
from test_redis_store import Gated, chat, config, history, registry

import connic
from conftest import SECRET, CliServer, Server, StartServer, start_cli
from connic.app import RUNTIME
from connic.stores.redis.keys import cancel_channel, cancel_key

aioredis = pytest.importorskip("redis.asyncio", reason="redis-py is not installed (pip install 'connic[redis]')")


class Keeper(connic.Agent):
    """Keeps what it is told in its state, as the agent decides: answers with the state it had.

    ``"deep N"`` nests its state N levels deep (a linked list of turns, as an agent keeping
    a chain of its exchanges would); ``"a set, then hold"`` keeps a set (which JSON cannot
    encode) and waits for :attr:`hold` (never set: until it is cancelled); anything else is
    appended to ``said``.
    """

    hold: ClassVar[asyncio.Event]

    async def respond(self, turn: connic.Turn) -> AsyncIterator[str | connic.Usage]:
        state = turn.session.state
        before = json.dumps({"said": state.get("said", []), "depth": _depth(state.get("chain"))})
        if turn.message == "a set, then hold":
            state["set"] = {1, 2}
            yield "holding "
            await Keeper.hold.wait()
        elif turn.message.startswith("deep "):
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


async def process(
    start_server: StartServer, url: str, connector: dict[str, Any] | None = None, **server: Any
) -> Server:
    """One connic "process" whose agent is a :class:`Keeper` (``server``: its ``[server]`` keys)."""
    reg = registry()
    reg.register("agents", "keeper", Keeper)
    data = config(url, connector, {"assistant": {"use": "keeper"}})
    data["server"] = server
    return await start_server(data, registry=reg)


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
    # Far deeper than any recursion limit this process may run under (Hypothesis raises it
    # for its tests, and the suite runs them in this process).
    await deep_conn.send({"type": "message", "id": "d1", "payload": {"message": "deep 20000"}})
    code, _ = await deep_conn.closed()
    assert code == 1011  # docs/deployment.md: a state JSON cannot encode ends its connection so
    assert (await told(other_conn, other, "m2", "after"))["said"] == ["before"]
    other.drop()
    await owner_gone(redis, other)
    conn_b = await other.resume(url=b.url())
    assert conn_b.connected["resumed"] is True and conn_b.connected["recovered"] is True
    assert (await told(conn_b, other, "m3", "again"))["said"] == ["before", "after"]
    other.transcript.assert_complete()


async def test_a_state_json_cannot_encode_does_not_stop_the_other_sessions_being_let_go_at_sigterm(
    redis_server: RedisServer,
    redis: Any,
    start_server: StartServer,
    clients: Clients,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A process stopping lets each session go (its record written, its ownership released),
    # and closes its connections with 1001: on one process with the memory store, each ends.
    # Letting go of a session whose state JSON cannot encode raised out of leave(): the
    # stop went no further, the other sessions stayed owned by the stopped process (a resume
    # elsewhere waits producer_timeout for the lease) and their connections got no 1001.
    Keeper.hold = asyncio.Event()
    a = await process(start_server, redis_server.url, {"producer_timeout": 60}, shutdown_grace=0.2)
    good = ResumeSession(clients, a.url())
    good_conn = await good.start()
    await told(good_conn, good, "m1", "kept")
    bad = ResumeSession(clients, a.url())
    bad_conn = await bad.start()
    await bad_conn.send({"type": "message", "id": "b1", "payload": {"message": "a set, then hold"}})
    code, _ = await bad_conn.closed()
    assert code == 1011  # its state cannot be saved: its connection ends (docs/deployment.md)
    caplog.clear()
    await a.server.close()  # SIGTERM: drain, then let every session go
    code, _ = await good_conn.closed()
    assert code == 1001
    assert not await redis.exists(f"connic:{{{good.session_id}}}:owner")  # let go, not left to its lease
    assert not await redis.exists(f"connic:{{{bad.session_id}}}:owner")  # let go as last saved
    warned = [r.getMessage() for r in caplog.records if "let go as last saved" in r.getMessage()]
    assert len(warned) == 1 and bad.session_id in warned[0], warned


class Bursts(connic.Agent):
    """Streams three bursts of 40 chunks at once, the second and third each after one release of :attr:`gate`."""

    # A semaphore, not an event: two releases that come before the agent gets to wait let out
    # two bursts, where an event set twice lets out one and the reply never ends.
    gate: ClassVar[asyncio.Semaphore]

    async def respond(self, turn: connic.Turn) -> AsyncIterator[str | connic.Usage]:
        for burst in range(3):
            if burst:
                await Bursts.gate.acquire()
            for word in range(40):
                yield f"b{burst}w{word} "


async def test_a_reply_followed_on_another_process_arrives_whole_with_a_small_replay_buffer(
    redis_server: RedisServer, start_server: StartServer, clients: Clients
) -> None:
    # On one process a resumed client gets every frame of the reply in flight, live, whatever
    # replay_buffer is. On another process it follows the first one's log: a burst of frames
    # written in one batch and trimmed to replay_buffer before it is read was a gap, and the
    # resumed connection was closed (1011, "resume again").
    Bursts.gate = asyncio.Semaphore(0)
    small = {"replay_buffer": 8}
    processes = []
    for _ in range(2):
        reg = registry()
        reg.register("agents", "bursts", Bursts)
        data = config(redis_server.url, small, {"assistant": {"use": "bursts"}})
        data["server"] = {"shutdown_grace": 0.2}  # a reply left waiting does not hold the test's end
        processes.append(await start_server(data, registry=reg))
    a, b = processes
    session = ResumeSession(clients, a.url())
    conn = await session.start()
    await conn.send({"type": "message", "id": "m1", "payload": {"message": "go"}})
    while len(session.transcript.chunks("m1", "assistant")) < 40:
        await conn.recv()
    session.drop()
    conn_b = await session.resume(url=b.url())
    assert conn_b.connected["resumed"] is True
    for _ in range(2):
        await asyncio.sleep(0.2)  # B follows A's log meanwhile
        Bursts.gate.release()
    await conn_b.until_ended({"m1": ["assistant"]})
    assert len(session.transcript.chunks("m1", "assistant")) == 120
    session.transcript.assert_complete()


async def test_history_is_answered_while_following_a_reply_on_another_process(
    redis_server: RedisServer, start_server: StartServer, clients: Clients
) -> None:
    # On one process `history` is answered at once, a reply streaming or not (PROTOCOL.md §8:
    # what a client resumed with recovered: false rebuilds from). A resume on another process
    # following the reply held it until the reply ended and the session moved.
    Gated.gate = asyncio.Event()
    gated = {"assistant": {"use": "gated"}}
    a = await start_server(config(redis_server.url, None, gated), registry=registry())
    b = await start_server(config(redis_server.url, None, gated), registry=registry())
    session = ResumeSession(clients, a.url())
    conn = await session.start()
    await conn.send({"type": "message", "id": "m1", "payload": {"message": "asked"}})
    while not session.transcript.chunks("m1", "assistant"):
        await conn.recv()
    session.drop()
    conn_b = await session.resume(url=b.url())
    assert conn_b.connected["resumed"] is True
    try:
        await conn_b.send({"type": "history"})
        frames = await conn_b.until_type("history", timeout=5)
    finally:
        Gated.gate.set()
    assert not any(frame["type"] == "stream_end" for frame in frames)  # answered while the reply goes on
    assert [entry["text"] for entry in frames[-1]["entries"]] == ["asked"]


# --- AG-UI threads -----------------------------------------------------------------------


async def test_a_run_on_another_process_queues_behind_the_run_streaming_and_cuts_nothing(
    redis_server: RedisServer, start_server: StartServer
) -> None:
    # docs/agui.md: runs of one thread may overlap; the later one is queued behind. On one
    # process both stream to their end. A run POSTed to another process took the first
    # process's stream over: the run streaming there ended at once with RUN_ERROR
    # (session_taken_over), its text cut, though its agent went on.
    start = with_store(start_server, redis_server.url)
    agents = {"assistant": {"use": "echo", "delay": 0.05}}
    one = await start(agui_config({"producer_timeout": 10}, agents), registry=agui_registry())
    two = await start(agui_config({"producer_timeout": 10}, agents), registry=agui_registry())
    words = " ".join(f"w{n}" for n in range(40))  # 40 chunks 50 ms apart: 2 s
    first = asyncio.ensure_future(post_run(one.http + "/agui", run_input("t-both", words)))
    for _ in range(500):  # until the first run streams (its frames are logged): bounded
        if await redis_has(redis_server.url, "connic:{t-both}:log"):
            break
        await asyncio.sleep(0.02)
    second = await post_run(two.http + "/agui", run_input("t-both", "and then"))
    status, events = await first
    assert status == 200 and isinstance(events, list)
    assert events[-1].type.value == "RUN_FINISHED", events[-1]
    assert text_of(events) == words
    assert second[0] == 200 and isinstance(second[1], list) and second[1][-1].type.value == "RUN_FINISHED"


async def redis_has(url: str, key: str) -> bool:
    client = aioredis.Redis.from_url(url, decode_responses=True)
    try:
        return bool(await client.exists(key))
    finally:
        await client.aclose()


async def test_two_first_runs_of_a_new_thread_on_two_processes_both_run(
    redis_server: RedisServer, start_server: StartServer
) -> None:
    # On one process two runs of one thread may overlap, the first run of a new thread too:
    # the second is queued behind the first (docs/agui.md). On two processes both opened the
    # thread, and the one whose store found it created already answered 503 ("exists already").
    start = with_store(start_server, redis_server.url)
    agents = {"look": {"use": "inspect"}}
    one = await start(agui_config(agents=agents), registry=agui_registry())
    two = await start(agui_config(agents=agents), registry=agui_registry())
    for i in range(3):  # the two runs race: every round has one of them find the thread opened
        runs = await asyncio.gather(
            post_run(one.http + "/agui", run_input(f"thread-{i}", "to one")),
            post_run(two.http + "/agui", run_input(f"thread-{i}", "to two")),
        )
        assert [status for status, _ in runs] == [200, 200], runs
        turns = sorted((json.loads(text_of(events)) for _, events in runs), key=lambda turn: turn["number"])
        assert [turn["number"] for turn in turns] == [1, 2]
        assert [entry["text"] for entry in turns[1]["history"]][:1] == [turns[0]["message"]]


async def test_an_agui_websocket_resume_on_another_process_follows_the_run_in_flight(
    redis_server: RedisServer, start_server: StartServer
) -> None:
    # AG-UI's WebSocket binding resumes a thread from its lastSeq (docs/agui.md): on one process
    # the rest of the run in flight comes at once, then live. On another process the resume
    # waited for the first one to let the thread go, at the run's end: a run longer than
    # producer_timeout made it fail (invalid_resume, counted as a failed authentication).
    start = with_store(start_server, redis_server.url)
    connector = {"on_disconnect": "continue", "producer_timeout": 2}
    agents = {"assistant": {"use": "echo", "delay": 0.05}}
    one = await start(agui_config(connector, agents), registry=agui_registry())
    two = await start(agui_config(connector, agents), registry=agui_registry())
    words = " ".join(f"w{n}" for n in range(100))  # 100 chunks 50 ms apart: 5 s
    ws = await websockets.connect(one.base + "/agui/ws", additional_headers=AUTH)
    await ws.send(json.dumps(run_input("t-far", words, run_id="r1")))
    seen = [json.loads(await ws.recv()) for _ in range(5)]  # RUN_STARTED, TEXT_MESSAGE_START, 3 chunks
    ws.transport.abort()  # no close frame: a dropped link
    async with websockets.connect(two.base + "/agui/ws", additional_headers=AUTH) as again:
        await again.send(json.dumps({"type": "resume", "threadId": "t-far", "lastSeq": seen[-1]["seq"]}))
        rest = []
        while not rest or rest[-1]["type"] not in ("RUN_FINISHED", "RUN_ERROR"):
            rest.append(json.loads(await asyncio.wait_for(again.recv(), 10)))
    assert rest[0]["seq"] == seen[-1]["seq"] + 1, rest[0]
    events = seen + rest
    assert "".join(e.get("delta", "") for e in events if e["type"] == "TEXT_MESSAGE_CONTENT") == words
    assert [e["type"] for e in events].count("TEXT_MESSAGE_START") == 1
    assert events[-1]["type"] == "RUN_FINISHED"


# --- a process killed -----------------------------------------------------------------


ECHO = '[agents.assistant]\nuse = "echo"\ndelay = 0.02\n'
# A second agent slow to start (its first chunk comes after a minute) and a third done at once.
SLOW = ECHO + '[agents.slow]\nuse = "echo"\ndelay = 60\n[agents.quick]\nuse = "echo"\ndelay = 0\n'


@contextlib.contextmanager
def _launcher(tmp_path: Path, redis_server: RedisServer, name: str) -> Iterator[Any]:
    """``start(config)``: ``python -m connic run`` with ``config`` (TOML) and a ``[store]`` table naming
    ``redis_server``; every process started is killed at the end."""
    env = store_plugin_env(tmp_path / "plugins")
    started: list[CliServer] = []

    async def start(config: str) -> CliServer:
        config_file = tmp_path / f"{name}-{len(started)}.toml"
        config_file.write_text(config + f'[store]\nuse = "redis"\nurl = "{redis_server.url}"\n')
        server = await asyncio.to_thread(start_cli, "--config", str(config_file), env=env)
        started.append(server)
        return server

    try:
        yield start
    finally:
        for server in started:
            server.stop(signal.SIGKILL if server.proc.poll() is None else signal.SIGTERM)


async def resumed_on_b_then_a_killed(session: ResumeSession, a: CliServer, b: CliServer) -> Any:
    """Drop the session's connection, resume it on ``b`` (following ``a``'s reply), then kill -9 ``a``."""
    session.drop()
    conn_b = await session.resume(url=b.url)
    assert conn_b.connected["resumed"] is True
    a.proc.kill()
    await asyncio.to_thread(a.proc.wait, 10)
    return conn_b


@pytest.fixture
def launch(tmp_path: Path, redis_server: RedisServer) -> Iterator[Any]:
    """Start ``python -m connic run`` processes sharing ``redis_server`` (``replay_buffer`` 8); killed at the end.

    ``launch(agents, connector)``: the agents' tables (default :data:`ECHO`) and more keys of
    the connector, in TOML.
    """
    with _launcher(tmp_path, redis_server, "connic") as start:

        async def launch(agents: str = ECHO, connector: str = "") -> CliServer:
            return await start(
                agents + f'[[connectors]]\npath = "/ws"\nsecrets = ["{SECRET}"]\nproducer_timeout = 3\n'
                f"replay_buffer = 8\n{connector}"
            )

        yield launch


async def test_a_reply_longer_than_the_replay_buffer_ends_with_producer_lost_when_its_process_dies(
    launch: Any, clients: Clients
) -> None:
    # PROTOCOL.md §7: when the process answering dies, each unfinished reply ends with
    # producer_lost. Which replies did not end is read from the log, which holds the last
    # replay_buffer frames: a reply longer than that had its stream_start (and ack) trimmed,
    # was not found unfinished, and never ended for the client following it.
    a, b = await launch(), await launch()
    session = ResumeSession(clients, a.url)
    conn = await session.start()
    text = words(500)  # 500 chunks, 20 ms apart: about 10 s, far longer than the test waits
    await conn.send({"type": "message", "id": "m1", "payload": {"message": text}})
    while len(session.transcript.chunks("m1", "assistant")) < 10:
        await conn.recv()
    session.drop()
    conn_b = await session.resume(url=b.url)
    assert conn_b.connected["resumed"] is True
    while len(session.transcript.chunks("m1", "assistant")) < 30:  # B follows A's reply live
        await conn_b.recv()
    a.proc.kill()  # kill -9 mid-reply: A's lease (producer_timeout = 3 s) runs out, B takes over
    await asyncio.to_thread(a.proc.wait, 10)
    frames = await conn_b.until(lambda f: f["type"] in ("error", "stream_end"), timeout=3 + 5)
    assert frames[-1]["type"] == "error" and frames[-1]["code"] == "producer_lost", frames[-1]
    assert frames[-1]["id"] == "m1" and frames[-1]["agent"] == "assistant"
    session.transcript.assert_complete()
    await chat(conn_b, "m2", "after")  # the session goes on, on B
    assert session.transcript.of("m2")[0]["message_number"] == 2


@pytest.fixture
def launch_agui(tmp_path: Path, redis_server: RedisServer) -> Iterator[Any]:
    """Start ``python -m connic run`` processes serving an agui connector at /agui, sharing ``redis_server``.

    Killed at the end. Its echo agent streams a chunk every 20 ms; ``producer_timeout`` is 3 s.
    """
    with _launcher(tmp_path, redis_server, "connic-agui") as start:

        async def launch() -> CliServer:
            return await start(
                ECHO + f'[[connectors]]\ntransport = "agui"\npath = "/agui"\nsecrets = ["{SECRET}"]\n'
                'producer_timeout = 3\non_disconnect = "continue"\n'
            )

        yield launch


async def test_an_agui_run_followed_on_another_process_ends_with_producer_lost_when_its_process_dies(
    launch_agui: Any,
) -> None:
    # docs/agui.md: a resume on another process follows the run in flight; when the process
    # answering it dies, the run ends as a reply a dead process left unfinished does (a
    # RUN_ERROR producer_lost, the text message closed first) and the thread goes on here.
    a, b = await launch_agui(), await launch_agui()
    auth = {"Authorization": f"Bearer {SECRET}"}
    text = words(500)  # 500 chunks, 20 ms apart: about 10 s, far longer than the test waits
    ws = await websockets.connect(f"ws://127.0.0.1:{a.port}/agui/ws", additional_headers=auth)
    await ws.send(json.dumps(run_input("t-dies", text, run_id="r1")))
    seen = [json.loads(await asyncio.wait_for(ws.recv(), 10)) for _ in range(12)]  # started, text start, 10 chunks
    ws.transport.abort()
    async with websockets.connect(f"ws://127.0.0.1:{b.port}/agui/ws", additional_headers=auth) as again:
        await again.send(json.dumps({"type": "resume", "threadId": "t-dies", "lastSeq": seen[-1]["seq"]}))
        rest = [json.loads(await asyncio.wait_for(again.recv(), 10)) for _ in range(20)]  # followed live
        a.proc.kill()  # kill -9 mid-run: its lease (producer_timeout = 3 s) runs out, B takes over
        await asyncio.to_thread(a.proc.wait, 10)
        while rest[-1]["type"] not in ("RUN_FINISHED", "RUN_ERROR"):
            rest.append(json.loads(await asyncio.wait_for(again.recv(), 3 + 5)))
        assert [e["type"] for e in rest[-2:]] == ["TEXT_MESSAGE_END", "RUN_ERROR"], rest[-3:]
        assert rest[-1]["code"] == "producer_lost", rest[-1]
        events = seen + rest
        assert [e["seq"] for e in rest[:1]] == [seen[-1]["seq"] + 1]
        assert [e["seq"] for e in events] == sorted(e["seq"] for e in events)
        assert text.startswith("".join(e.get("delta", "") for e in events if e["type"] == "TEXT_MESSAGE_CONTENT"))
        assert [e["type"] for e in events].count("TEXT_MESSAGE_START") == 1
        # The thread goes on, on B, on this very connection.
        await again.send(json.dumps(run_input("t-dies", "after", run_id="r2")))
        after = [json.loads(await asyncio.wait_for(again.recv(), 10))]
        while after[-1]["type"] not in ("RUN_FINISHED", "RUN_ERROR"):
            after.append(json.loads(await asyncio.wait_for(again.recv(), 10)))
    assert after[0]["type"] == "RUN_STARTED" and after[0]["runId"] == "r2", after[0]
    assert after[-1]["type"] == "RUN_FINISHED", after
    assert "".join(e.get("delta", "") for e in after if e["type"] == "TEXT_MESSAGE_CONTENT") == "after"


async def test_session_timeout_counts_from_the_end_of_a_reply_its_dead_process_left_unfinished(
    launch: Any, clients: Clients
) -> None:
    # On one process session_timeout counts from the end of the last reply. A reply ended by
    # producer_lost ends when the process taking the session over sends it; the session was
    # rebuilt with the activity its dead process last saved (the message's arrival), and
    # expired (4008) as soon as it was taken over when the reply had run session_timeout.
    a = await launch(connector="session_timeout = 3\n")
    b = await launch(connector="session_timeout = 3\n")
    session = ResumeSession(clients, a.url)
    conn = await session.start()
    await conn.send({"type": "message", "id": "m1", "payload": {"message": words(500)}})
    while len(session.transcript.chunks("m1", "assistant")) < 10:
        await conn.recv()
    session.drop()
    conn_b = await session.resume(url=b.url)
    assert conn_b.connected["resumed"] is True
    while len(session.transcript.chunks("m1", "assistant")) < 60:  # B follows A's reply: over 1 s
        await conn_b.recv()
    a.proc.kill()  # its lease (producer_timeout = 3 s) runs out 2 to 3 s later: past session_timeout
    await asyncio.to_thread(a.proc.wait, 10)
    frames = await conn_b.until(lambda f: f["type"] in ("error", "stream_end"), timeout=3 + 5)
    assert frames[-1]["type"] == "error" and frames[-1]["code"] == "producer_lost", frames[-1]
    await chat(conn_b, "m2", "after")  # within session_timeout of the reply's end: answered
    assert session.transcript.of("m2")[0]["message_number"] == 2


async def test_every_agent_of_a_message_ends_with_producer_lost_when_its_process_dies(
    launch: Any, clients: Clients
) -> None:
    # Three agents answer each message; one streams, one has sent nothing yet when the process
    # dies, and one has ended its reply. Only the one whose stream_start was logged got
    # producer_lost: the client waits for the silent one's end for ever. The one that ended
    # its reply gets no second end.
    a, b = await launch(SLOW), await launch(SLOW)
    session = ResumeSession(clients, a.url)
    conn = await session.start()
    await conn.send({"type": "message", "id": "m1", "payload": {"message": words(500)}})
    while len(session.transcript.chunks("m1", "assistant")) < 10 or session.transcript.end("m1", "quick") is None:
        await conn.recv()
    conn_b = await resumed_on_b_then_a_killed(session, a, b)
    await conn_b.until_ended({"m1": ["assistant", "slow"]}, timeout=3 + 5)
    for agent in ("assistant", "slow"):
        end = session.transcript.end("m1", agent)
        assert end is not None and end["type"] == "error" and end["code"] == "producer_lost", end
    assert [f["type"] for f in session.transcript.of("m1", "quick") if f.get("agent") == "quick"][-1] == "stream_end"
    session.transcript.assert_complete()
    await chat(conn_b, "m2", "after")  # the session goes on, on B: each agent answers it
    assert session.transcript.of("m2")[0]["message_number"] == 2


async def test_messages_queued_behind_a_long_reply_end_with_producer_lost_when_its_process_dies(
    launch: Any, clients: Clients
) -> None:
    # Which messages a dead process left unanswered was read from the log alone: their acks.
    # Behind a reply longer than replay_buffer (8 here; 4096 by default, a long LLM answer
    # streamed token by token) the acks of the messages queued behind it were trimmed, and
    # those messages never got an end: the client waited for them for ever. The record lists
    # the messages pending now.
    a, b = await launch(), await launch()
    session = ResumeSession(clients, a.url)
    conn = await session.start()
    await conn.send({"type": "message", "id": "m1", "payload": {"message": words(500)}})
    await conn.send({"type": "message", "id": "m2", "payload": {"message": "queued"}})
    await conn.send({"type": "message", "id": 3, "payload": {"message": "queued too"}})
    while len(session.transcript.chunks("m1", "assistant")) < 20:  # the acks are far behind
        await conn.recv()
    conn_b = await resumed_on_b_then_a_killed(session, a, b)
    await conn_b.until_ended({"m1": ["assistant"], "m2": ["assistant"], 3: ["assistant"]}, timeout=3 + 5)
    for message_id in ("m1", "m2", 3):
        end = session.transcript.end(message_id, "assistant")
        assert end is not None and end["code"] == "producer_lost", end
    session.transcript.assert_complete()
    await chat(conn_b, "m4", "after")
    assert session.transcript.of("m4")[0]["message_number"] == 4


async def test_a_message_that_named_one_agent_loses_only_that_agents_reply_when_its_process_dies(
    launch: Any, clients: Clients
) -> None:
    # PROTOCOL.md §7: each unfinished agent reply ends with producer_lost. A message that named
    # one agent of several (payload.agent) is answered by that agent alone; the log did not say
    # which one it named, and every agent of the connector got producer_lost for it: replies
    # that never existed. Its ack now names the agent, and so does the log.
    a, b = await launch(SLOW), await launch(SLOW)
    session = ResumeSession(clients, a.url)
    conn = await session.start()
    await conn.send({"type": "message", "id": "m1", "payload": {"message": words(500), "agent": "assistant"}})
    ack = await conn.until(lambda f: f["type"] == "ack")
    assert ack[-1]["agent"] == "assistant"
    # Queued behind it, one message for another agent and one for every agent: unanswered when A dies.
    await conn.send({"type": "message", "id": "m2", "payload": {"message": "x", "agent": "quick"}})
    await conn.send({"type": "message", "id": "m3", "payload": {"message": "y"}})
    while len(session.transcript.chunks("m1", "assistant")) < 10 or len(session.transcript.of("m3")) < 1:
        await conn.recv()
    conn_b = await resumed_on_b_then_a_killed(session, a, b)
    await conn_b.until_ended(
        {"m1": ["assistant"], "m2": ["quick"], "m3": ["assistant", "slow", "quick"]}, timeout=3 + 5
    )
    lost = [(f["id"], f["agent"]) for f in session.transcript.ordered() if f.get("code") == "producer_lost"]
    assert sorted(lost) == [("m1", "assistant"), ("m2", "quick"), ("m3", "assistant"), ("m3", "quick"), ("m3", "slow")]
    session.transcript.assert_complete()


# --- cancels --------------------------------------------------------------------------------


async def test_a_cancel_passed_while_the_session_is_being_taken_over_is_answered_once_it_is_live(
    redis_server: RedisServer, redis: Any, start_server: StartServer, clients: Clients
) -> None:
    # A cancel another process passes on (its cancel set, then a message on the cancel channel)
    # is taken at once by the process holding the session live. One arriving while this process
    # had claimed the session but not rebuilt it yet was skipped, and waited for the next lease
    # renewal (producer_timeout / 3: 20 s here) for its answer. The window is made exact by
    # passing the cancel from inside B's store.add, the rebuilt session's hand-over to the store;
    # the claim, the rebuild, the pub/sub listener and Redis are real. A second cancel, for a
    # session live on B, passed after it on the same channel, shows that B's listener handled
    # the first before the add goes on (it handles them in order).
    a = await process(start_server, redis_server.url, {"producer_timeout": 60})
    b = await process(start_server, redis_server.url, {"producer_timeout": 60})
    live = ResumeSession(clients, b.url())
    live_conn = await live.start()
    await lease_renewed(redis, live)  # B's first renewal: its next one is 20 s away
    session = ResumeSession(clients, a.url())
    conn = await session.start()
    await told(conn, session, "m1", "before")
    session.drop()
    await owner_gone(redis, session)
    store = b.server.app[RUNTIME].transports[0].sessions.store
    add = store.add

    async def pass_cancels(sid: str, message_id: str) -> None:
        prefix = store.options.key_prefix
        await redis.rpush(cancel_key(prefix, sid), json.dumps(message_id))
        await redis.publish(cancel_channel(prefix), sid)

    async def add_after_a_cancel(taken: Any) -> None:
        if taken.id == session.session_id:
            await pass_cancels(session.session_id, "m9")
            await pass_cancels(live.session_id, "z9")
            await live_conn.until(lambda f: f["type"] == "error" and f.get("id") == "z9", timeout=5)
        await add(taken)

    store.add = add_after_a_cancel
    conn_b = await session.resume(url=b.url())
    assert conn_b.connected["resumed"] is True

    def answered(frame: dict[str, Any]) -> bool:
        return frame["type"] == "error" and frame.get("id") == "m9"

    if not any(answered(frame) for frame in conn_b.frames):
        await conn_b.until(answered, timeout=5)  # at once, not at the lease renewal 20 s later
    assert [f["code"] for f in conn_b.frames if answered(f)] == ["not_found"]
    assert (await told(conn_b, session, "m2", "after"))["said"] == ["before"]


async def lease_renewed(redis: Any, session: ResumeSession) -> None:
    """Until the lease of the session's owner is renewed once (its key's ttl goes back up): bounded."""
    key = f"connic:{{{session.session_id}}}:owner"
    low = await redis.pttl(key)
    for _ in range(250):
        await asyncio.sleep(0.02)
        ttl = await redis.pttl(key)
        if ttl > low:
            return
        low = ttl
    raise AssertionError("the lease was never renewed")


# --- expiry -------------------------------------------------------------------------------


async def test_a_reply_longer_than_session_timeout_plus_resume_window_keeps_the_session_in_redis(
    redis_server: RedisServer, start_server: StartServer, clients: Clients
) -> None:
    # On one process a session never expires while it answers (PROTOCOL.md §7), and a reply
    # may run for agent_timeout (default 300 s). Its record and history list in Redis expired
    # session_timeout + resume_window after the save that started the reply: a resume on
    # another process meanwhile got a fresh session, and the save at the reply's end wrote a
    # history list holding only that reply.
    Gated.gate = asyncio.Event()
    short = {"session_timeout": 2, "resume_window": 1}
    a = await start_server(config(redis_server.url, short, {"assistant": {"use": "gated"}}), registry=registry())
    b = await start_server(config(redis_server.url, short, {"assistant": {"use": "gated"}}), registry=registry())
    session = ResumeSession(clients, a.url())
    conn = await session.start()
    await conn.send({"type": "message", "id": "m1", "payload": {"message": "take your time"}})
    while not session.transcript.chunks("m1", "assistant"):
        await conn.recv()
    await asyncio.sleep(3.5)  # past session_timeout + resume_window, the reply still running
    conn_b = await session.resume(url=b.url())  # takes A's connection over, follows the reply
    assert conn_b.connected["resumed"] is True and conn_b.connected["session_id"] == session.session_id
    Gated.gate.set()
    await conn_b.until_ended({"m1": ["assistant"]})
    assert [entry["text"] for entry in await history(conn_b)] == ["take your time", "before after"]


async def test_a_session_taken_over_and_kept_quiet_past_resume_window_keeps_its_history(
    redis_server: RedisServer, redis: Any, start_server: StartServer, clients: Clients
) -> None:
    # A session let go lives resume_window in Redis; the process that takes it over holds it,
    # attached, for up to session_timeout without a message (on one process, it keeps it all
    # that time). Its record, history list and log kept the let-go's expiry: they expired
    # under the attached session, and its next save wrote a history list holding only the
    # entries added after (the conversation before the hop was lost for the next process).
    a = await process(start_server, redis_server.url, {"resume_window": 2})
    b = await process(start_server, redis_server.url, {"resume_window": 2})
    session = ResumeSession(clients, a.url())
    conn = await session.start()
    await told(conn, session, "m1", "first")
    session.drop()
    await owner_gone(redis, session)
    conn_b = await session.resume(url=b.url())
    assert conn_b.connected["resumed"] is True
    await asyncio.sleep(2.5)  # connected to B, reading: past resume_window, within session_timeout
    assert (await told(conn_b, session, "m2", "second"))["said"] == ["first"]
    session.drop()
    await owner_gone(redis, session)
    conn_a = await session.resume(url=a.url())
    assert conn_a.connected["resumed"] is True
    assert [entry["text"] for entry in await history(conn_a)][::2] == ["first", "second"]
    assert (await told(conn_a, session, "m3", "third"))["said"] == ["first", "second"]
