"""AG-UI's WebSocket binding resuming on another process while a run streams on the first (``redis`` store).

docs/agui.md, "Resuming on the WebSocket binding": the resume follows the run in flight,
as the Connic protocol's does. Two connic apps share one ``redis-server`` (as in
tests/test_redis_continuity.py); the clients are real ``websockets`` clients.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest
import websockets
from redis_server import (
    RedisServer,
    redis_server_fixture,  # noqa: F401  (a fixture)
    with_store,
)
from test_agui_support import AUTH, SECRET, agui_config, agui_registry, run_input

from conftest import Connect, Server, StartServer
from connic.stores.redis.keys import session_keys
from connic.stores.redis.log import seq_of

aioredis = pytest.importorskip("redis.asyncio", reason="redis-py is not installed (pip install 'connic[redis]')")

WORDS = " ".join(f"w{n}" for n in range(100))  # 100 chunks 50 ms apart: 5 s


async def two_processes(
    redis_server: RedisServer, start_server: StartServer, **connector: Any
) -> tuple[Server, Server]:
    """Two apps sharing ``redis_server``, an echo agent streaming a chunk every 50 ms; ``producer_timeout`` 2 s."""
    start = with_store(start_server, redis_server.url)
    options = {"on_disconnect": "continue", "producer_timeout": 2, **connector}
    agents = {"assistant": {"use": "echo", "delay": 0.05}}
    one = await start(agui_config(options, agents), registry=agui_registry())
    two = await start(agui_config(options, agents), registry=agui_registry())
    return one, two


async def dropped_mid_run(server: Server, thread_id: str, count: int = 5) -> list[dict[str, Any]]:
    """Start a run of :data:`WORDS` on ``server``, read ``count`` events, then drop the link (no close frame)."""
    ws = await websockets.connect(server.base + "/agui/ws", additional_headers=AUTH)
    await ws.send(json.dumps(run_input(thread_id, WORDS, run_id="r1")))
    seen = [json.loads(await asyncio.wait_for(ws.recv(), 10)) for _ in range(count)]
    ws.transport.abort()
    return seen


async def until_run_ends(ws: Any, run_id: str) -> list[dict[str, Any]]:
    """The events up to the ``RUN_FINISHED`` or ``RUN_ERROR`` of ``run_id`` (bounded)."""
    events: list[dict[str, Any]] = []
    while not events or events[-1]["type"] not in ("RUN_FINISHED", "RUN_ERROR") or events[-1].get("runId") != run_id:
        events.append(json.loads(await asyncio.wait_for(ws.recv(), 10)))
        if events[-1]["type"] == "RUN_ERROR" and "runId" not in events[-1]:
            break  # not a run's end: the binding refusing something
    return events


def text(events: list[dict[str, Any]]) -> str:
    return "".join(e.get("delta", "") for e in events if e["type"] == "TEXT_MESSAGE_CONTENT")


def outline(events: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    """The events without their text chunks (how many come before a cancel lands is timing)."""
    return [
        (e["type"], e.get("runId"), e.get("messageId"), e.get("code"), json.dumps(e.get("outcome")))
        for e in events
        if e["type"] != "TEXT_MESSAGE_CONTENT"
    ]


async def resumed(server: Server, thread_id: str, last_seq: int, path: str = "/agui/ws") -> Any:
    """A new connection to ``server`` that resumed ``thread_id`` from ``last_seq`` (the caller closes it)."""
    ws = await websockets.connect(server.base + path, additional_headers=AUTH)
    await ws.send(json.dumps({"type": "resume", "threadId": thread_id, "lastSeq": last_seq}))
    return ws


async def test_a_cancel_sent_while_following_cancels_the_run_on_the_process_answering_it(
    redis_server: RedisServer, start_server: StartServer
) -> None:
    # On one process a cancel of the run in flight ends it at once, RUN_FINISHED with the
    # cancelled outcome. Following another process, the run answered there is cancelled there.
    one, two = await two_processes(redis_server, start_server)
    seen = await dropped_mid_run(one, "t-cancel")
    async with websockets.connect(two.base + "/agui/ws", additional_headers=AUTH) as again:
        await again.send(json.dumps({"type": "resume", "threadId": "t-cancel", "lastSeq": seen[-1]["seq"]}))
        first = json.loads(await asyncio.wait_for(again.recv(), 10))  # following: the run's next chunk
        assert first["type"] == "TEXT_MESSAGE_CONTENT" and first["seq"] == seen[-1]["seq"] + 1, first
        await again.send(json.dumps({"type": "cancel", "runId": "r1"}))
        rest = await until_run_ends(again, "r1")
    assert rest[-1]["type"] == "RUN_FINISHED" and rest[-1]["outcome"] == {"type": "cancelled"}, rest[-1]
    assert [e["type"] for e in rest[-2:]] == ["TEXT_MESSAGE_END", "RUN_FINISHED"]
    assert len(text([*seen, first, *rest]).split()) < 100  # cut short: not the whole reply


async def test_a_run_sent_while_following_runs_after_the_run_in_flight(
    redis_server: RedisServer, start_server: StartServer
) -> None:
    # A run the client sends while the resume follows waits for the thread to come here, then
    # runs, after the run in flight ended: as a run queued behind it on one process.
    one, two = await two_processes(redis_server, start_server)
    seen = await dropped_mid_run(one, "t-next")
    async with websockets.connect(two.base + "/agui/ws", additional_headers=AUTH) as again:
        await again.send(json.dumps({"type": "resume", "threadId": "t-next", "lastSeq": seen[-1]["seq"]}))
        assert json.loads(await asyncio.wait_for(again.recv(), 10))["type"] == "TEXT_MESSAGE_CONTENT"
        await again.send(json.dumps(run_input("t-next", "then this", run_id="r2")))
        first = await until_run_ends(again, "r1")
        second = await until_run_ends(again, "r2")
    assert first[-1]["type"] == "RUN_FINISHED", first[-1]
    assert [e["type"] for e in second][:1] == ["RUN_STARTED"] and second[-1]["type"] == "RUN_FINISHED", second
    assert text(second) == "then this"
    assert second[0]["seq"] > first[-1]["seq"]


async def test_a_client_gone_while_following_leaves_the_thread_to_resume_again(
    redis_server: RedisServer, start_server: StartServer
) -> None:
    # The client leaves while its resume follows: following stops, the run goes on where it
    # streams (on_disconnect = "continue"), and a later resume gets the rest, no gap.
    one, two = await two_processes(redis_server, start_server)
    seen = await dropped_mid_run(one, "t-gone")
    async with websockets.connect(two.base + "/agui/ws", additional_headers=AUTH) as again:
        await again.send(json.dumps({"type": "resume", "threadId": "t-gone", "lastSeq": seen[-1]["seq"]}))
        seen += [json.loads(await asyncio.wait_for(again.recv(), 10)) for _ in range(3)]
    async with websockets.connect(two.base + "/agui/ws", additional_headers=AUTH) as third:
        await third.send(json.dumps({"type": "resume", "threadId": "t-gone", "lastSeq": seen[-1]["seq"]}))
        rest = await until_run_ends(third, "r1")
    assert rest[0]["seq"] == seen[-1]["seq"] + 1, rest[0]
    events = seen + rest
    assert text(events) == WORDS
    assert [e["type"] for e in events].count("TEXT_MESSAGE_START") == 1
    assert events[-1]["type"] == "RUN_FINISHED"


async def test_a_resume_whose_log_lost_the_threads_start_follows_the_run_from_last_seq_as_one_process_does(
    redis_server: RedisServer, start_server: StartServer
) -> None:
    # Following rebuilds the runs' events from the thread's first frame: with replay_buffer 16
    # the log no longer has it. As on one process (a resume there whose log lost the thread's
    # start), the run is followed from the oldest frame held at once: the next event, no error,
    # and live, so that a cancel sent now cuts it short (the run lasts 5 s; the resume used to
    # wait for it to end, then fail with invalid_resume past producer_timeout, 2 s).
    one, two = await two_processes(redis_server, start_server, replay_buffer=16)
    got = {}
    for where, thread_id in ((one, "t-trimmed-1"), (two, "t-trimmed-2")):
        seen = await dropped_mid_run(one, thread_id, count=30)  # the log holds the last 16 frames
        async with await resumed(where, thread_id, seen[-1]["seq"]) as again:
            first = json.loads(await asyncio.wait_for(again.recv(), 10))
            await again.send(json.dumps({"type": "cancel", "runId": "r1"}))
            rest = [first, *await until_run_ends(again, "r1")]
        # The text message the client saw start goes on: not started again.
        assert rest[0].get("seq") == seen[-1]["seq"] + 1 and rest[0]["type"] == "TEXT_MESSAGE_CONTENT", (
            where is two,
            rest[0],
        )
        assert rest[-1]["type"] == "RUN_FINISHED" and rest[-1]["outcome"] == {"type": "cancelled"}, rest[-1]
        said = text(seen + rest)
        assert WORDS.startswith(said) and len(said.split()) < 100, said  # no gap, nothing twice, cut short
        got[where is two] = outline(rest)
    assert got[True] == got[False]


async def test_a_resume_whose_log_lost_even_the_events_after_last_seq_says_so_then_follows_the_run(
    redis_server: RedisServer, start_server: StartServer
) -> None:
    # PROTOCOL.md §7: a resume whose log lost frames after lastSeq gets none of the log (never a
    # tail with a gap), only what comes from then on. So here, on one process and following
    # another one alike: a RUN_ERROR invalid_resume first, saying events after lastSeq are gone,
    # then the run's events from the frames logged next (its text message started again, same
    # id), to its RUN_FINISHED; the same events, but for how many chunks each missed.
    one, two = await two_processes(redis_server, start_server, replay_buffer=8)
    got = {}
    for where, thread_id in ((one, "t-gone-1"), (two, "t-gone-2")):
        seen = await dropped_mid_run(one, thread_id, count=5)
        last_seq = seen[-1]["seq"]
        await log_lost(redis_server, thread_id, last_seq + 1)
        async with await resumed(where, thread_id, last_seq) as again:
            error = json.loads(await asyncio.wait_for(again.recv(), 10))
            rest = await until_run_ends(again, "r1")
        assert error["type"] == "RUN_ERROR" and error["code"] == "invalid_resume", (where is two, error)
        assert f"no longer holds every event after {last_seq}" in error["message"], error
        assert rest[-1]["type"] == "RUN_FINISHED" and rest[0]["seq"] > last_seq + 1, (rest[0], rest[-1])
        assert [e["seq"] for e in rest] == sorted(e["seq"] for e in rest), rest
        said = text(rest)
        assert said and WORDS.endswith(said), said  # from some word on, to the end: nothing twice
        got[where is two] = outline([error, *rest])
    assert got[True] == got[False]


async def log_lost(redis_server: RedisServer, thread_id: str, seq: int) -> None:
    """Wait (bounded) until the thread's log in Redis no longer holds frame ``seq``."""
    redis = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        key = session_keys("connic:", thread_id)[3]  # the thread's log
        deadline = time.monotonic() + 10
        while True:  # an entry holds several frames, one a line, the newest numbered as the entry
            entries = await redis.xrange(key, count=1)
            if entries and seq_of(entries[0][0]) - entries[0][1]["f"].count("\n") > seq:
                return
            assert time.monotonic() < deadline, entries
            await asyncio.sleep(0.02)
    finally:
        await redis.aclose()


async def dropped_with_one_queued(server: Server, thread_id: str, path: str) -> list[dict[str, Any]]:
    """:func:`dropped_mid_run` with a second run, ``r2``, queued behind ``r1`` (its ``RUN_STARTED`` read)."""
    ws = await websockets.connect(server.base + path, additional_headers=AUTH)
    await ws.send(json.dumps(run_input(thread_id, WORDS, run_id="r1")))
    await ws.send(json.dumps(run_input(thread_id, "dropped", run_id="r2")))
    seen: list[dict[str, Any]] = []
    while len(seen) < 8 or not any(e["type"] == "RUN_STARTED" and e["runId"] == "r2" for e in seen):
        seen.append(json.loads(await asyncio.wait_for(ws.recv(), 10)))
    ws.transport.abort()
    return seen


@pytest.mark.parametrize("path", ["/agui/ws", "/agui/ws/assistant"])
async def test_a_cancel_of_a_run_queued_on_the_other_process_drops_it_at_once_as_on_one_process(
    redis_server: RedisServer, start_server: StartServer, path: str
) -> None:
    # On one process a cancel of a queued run drops it at once: RUN_FINISHED cancelled, before
    # the run in flight ends, and it never runs. Following another process, where it is queued,
    # the same: the cancel used to be held until the takeover, after that process had run it.
    # On a connection of one agent its ack names that agent: still queued, not answered.
    one, two = await two_processes(redis_server, start_server)
    got = {}
    for where, thread_id in ((one, "t-queued-1"), (two, "t-queued-2")):
        seen = await dropped_with_one_queued(one, thread_id, path)
        async with await resumed(where, thread_id, seen[-1]["seq"], path) as again:
            first = json.loads(await asyncio.wait_for(again.recv(), 10))
            assert first["type"] == "TEXT_MESSAGE_CONTENT", first
            await again.send(json.dumps({"type": "cancel", "runId": "r2"}))
            dropped = [first, *await until_run_ends(again, "r2")]
            rest = await until_run_ends(again, "r1")
            await again.send(json.dumps(run_input(thread_id, "after", run_id="r3")))
            after = await until_run_ends(again, "r3")
        assert dropped[-1]["type"] == "RUN_FINISHED" and dropped[-1].get("outcome") == {"type": "cancelled"}, (
            where is two,
            dropped,
        )
        assert not any(e["type"] == "RUN_FINISHED" and e["runId"] == "r1" for e in dropped), dropped  # r1 streams on
        assert rest[-1]["type"] == "RUN_FINISHED" and rest[-1].get("outcome") is None, rest[-1]
        assert text(seen + dropped + rest) == WORDS  # r2 never said anything
        assert text(after) == "after"
        # RUN_STARTED carries the seq of r3's ack: r2 ran nowhere, no frames of it were numbered.
        got[where is two] = (outline(dropped), outline(after), after[0]["seq"])
    assert got[True] == got[False]


async def test_a_second_resume_on_the_following_process_takes_the_first_over_at_once(
    redis_server: RedisServer, start_server: StartServer
) -> None:
    # The Connic protocol's resume takes an older one over at once (session_taken_over), even one
    # following another process. So here: the second resume follows the run at once (a cancel
    # cuts it short), rather than waiting for the first one's follow to end with the run.
    one, two = await two_processes(redis_server, start_server)
    seen = await dropped_mid_run(one, "t-twice")
    async with await resumed(two, "t-twice", seen[-1]["seq"]) as older:
        assert json.loads(await asyncio.wait_for(older.recv(), 10))["type"] == "TEXT_MESSAGE_CONTENT"
        async with await resumed(two, "t-twice", seen[-1]["seq"]) as newer:
            first = json.loads(await asyncio.wait_for(newer.recv(), 10))
            await newer.send(json.dumps({"type": "cancel", "runId": "r1"}))
            rest = [first, *await until_run_ends(newer, "r1")]
            ended: list[dict[str, Any]] = []
            with pytest.raises(websockets.ConnectionClosed) as closed:
                while True:
                    ended.append(json.loads(await asyncio.wait_for(older.recv(), 10)))
    assert first["seq"] == seen[-1]["seq"] + 1, first
    assert rest[-1]["type"] == "RUN_FINISHED" and rest[-1]["outcome"] == {"type": "cancelled"}, rest[-1]
    assert len(text([*seen, *rest]).split()) < 100
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4011, closed.value
    assert [(e["type"], e.get("code")) for e in ended if e["type"] == "RUN_ERROR"] == [
        ("RUN_ERROR", "session_taken_over")
    ], ended


async def test_a_resume_with_a_wrong_token_takes_no_resume_following_another_process_over(
    redis_server: RedisServer, start_server: StartServer, connect: Connect
) -> None:
    # A session of the websocket connector is resumed over AG-UI with its resume token. A
    # newer resume with a wrong one is refused (invalid_resume) and takes nothing over: the
    # Connic protocol's claim checks the token before it takes an older resume over.
    start = with_store(start_server, redis_server.url)
    options = {"on_disconnect": "continue", "producer_timeout": 2}
    cfg = agui_config(options, {"assistant": {"use": "echo", "delay": 0.05}}, websocket=options)
    one = await start(cfg, registry=agui_registry())
    two = await start(cfg, registry=agui_registry())
    ws = await connect(one.url("/ws"), secret=SECRET)
    session_id, token = ws.connected["session_id"], ws.connected["resume_token"]  # type: ignore[attr-defined]
    await ws.send({"type": "message", "id": "m1", "payload": {"message": WORDS}})
    frames = [await ws.recv() for _ in range(6)]  # ack, stream_start, chunks
    await ws.ws.close(4000)  # not 1000: the session stays, its reply goes on there
    last_seq = len(frames)  # a new session's frames are numbered from 1, each of these one
    resume = {"type": "resume", "threadId": session_id, "lastSeq": last_seq}
    async with websockets.connect(two.base + "/agui/ws", additional_headers=AUTH) as older:
        await older.send(json.dumps({**resume, "resumeToken": token}))
        first = json.loads(await asyncio.wait_for(older.recv(), 10))
        assert first["type"] == "TEXT_MESSAGE_CONTENT" and first["seq"] == last_seq + 1, first
        async with websockets.connect(two.base + "/agui/ws", additional_headers=AUTH) as newer:
            await newer.send(json.dumps({**resume, "resumeToken": "wrong"}))
            refused = json.loads(await asyncio.wait_for(newer.recv(), 10))
        rest = await until_run_ends(older, "m1")
    assert refused["type"] == "RUN_ERROR" and refused["code"] == "invalid_resume", refused
    assert rest[-1]["type"] == "RUN_FINISHED", rest[-1]
    said = "".join(f["chunk"] for f in frames if f["type"] == "stream_chunk") + text([first, *rest])
    assert said == WORDS


async def logged_past(redis_server: RedisServer, thread_id: str, seq: int) -> None:
    """Wait (bounded) until the thread's log in Redis holds a frame numbered above ``seq``."""
    redis = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        key = session_keys("connic:", thread_id)[3]  # the thread's log
        deadline = time.monotonic() + 10
        while not (entries := await redis.xrevrange(key, count=1)) or seq_of(entries[0][0]) <= seq:
            assert time.monotonic() < deadline, entries
            await asyncio.sleep(0.01)
    finally:
        await redis.aclose()


@pytest.mark.parametrize("replay_buffer", [4096, 16])
async def test_a_cancel_sent_right_behind_the_resume_cancels_the_run_at_once_as_on_one_process(
    redis_server: RedisServer, start_server: StartServer, replay_buffer: int
) -> None:
    # The client sends its cancel right behind its resume, before any event came back. On one
    # process the run is cancelled at once. Following another process, the cancel came before
    # the first frames did (the follow not begun yet): it was held until the thread was taken
    # over, after the run's natural end (5 s), then answered not_found. With replay_buffer 16
    # the log lost the thread's start: the follow begins again from lastSeq, the cancel the same
    # (once the log holds a frame after lastSeq: the run in flight is known from it).
    one, two = await two_processes(redis_server, start_server, replay_buffer=replay_buffer)
    got = {}
    for where, thread_id in ((one, "t-early-1"), (two, "t-early-2")):
        seen = await dropped_mid_run(one, thread_id, count=30)
        await logged_past(redis_server, thread_id, seen[-1]["seq"])
        async with websockets.connect(where.base + "/agui/ws", additional_headers=AUTH) as again:
            resume = {"type": "resume", "threadId": thread_id, "lastSeq": seen[-1]["seq"]}
            await again.send(json.dumps(resume))
            await again.send(json.dumps({"type": "cancel", "runId": "r1"}))
            rest = await until_run_ends(again, "r1")
        assert rest[-1]["type"] == "RUN_FINISHED" and rest[-1].get("outcome") == {"type": "cancelled"}, (
            where is two,
            rest[-1],
        )
        said = text(seen + rest)
        assert WORDS.startswith(said) and len(said.split()) < 100, said  # no gap, nothing twice, cut short
        got[where is two] = outline(rest)
    assert got[True] == got[False]


async def test_a_cancel_right_behind_a_resume_from_the_newest_frame_cancels_the_run_as_on_one_process(
    redis_server: RedisServer, start_server: StartServer
) -> None:
    # The log lost the thread's start (replay_buffer 16) and the client resumes from the newest
    # frame logged (or one behind it: the log in Redis may lag the process writing it). Read
    # from the oldest frame held, the run's text message is known open: the cancel is passed at
    # once and the message ends (no START again, which read from lastSeq it would have been, nor
    # a RUN_FINISHED leaving it open), on one process and following another one alike.
    one, two = await two_processes(redis_server, start_server, replay_buffer=16)
    redis = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    got = {}
    try:
        for where, thread_id in ((one, "t-newest-1"), (two, "t-newest-2")):
            await dropped_mid_run(one, thread_id, count=30)
            newest = await redis.xrevrange(session_keys("connic:", thread_id)[3], count=1)
            last_seq = seq_of(newest[0][0])  # the client is told no more than that: it had it all
            async with await resumed(where, thread_id, last_seq) as again:
                await again.send(json.dumps({"type": "cancel", "runId": "r1"}))
                rest = await until_run_ends(again, "r1")
            assert rest[-1]["type"] == "RUN_FINISHED" and rest[-1].get("outcome") == {"type": "cancelled"}, (
                where is two,
                rest[-1],
            )
            assert rest[0]["seq"] > last_seq and len(rest) < 20, rest  # cut short: not 70 chunks more
            got[where is two] = [(e["type"], e.get("messageId")) for e in rest if e["type"] != "TEXT_MESSAGE_CONTENT"]
    finally:
        await redis.aclose()
    assert got[False] == [("TEXT_MESSAGE_END", "r1:assistant"), ("RUN_FINISHED", None)], got[False]
    assert got[True] == got[False]
