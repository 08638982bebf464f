"""AG-UI's WebSocket binding (docs/agui.md): RunAgentInput frames in, the events as JSON text frames
out, each with connic's seq; several runs over one connection; resuming a dropped connection the
PROTOCOL.md §7 way. A real ``websockets`` client, every event parsed with ag-ui-protocol's models."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
import websockets
from reliability.rawws import open_raw, text
from test_agui_abuse import scrape, wait_metric
from test_agui_support import AUTH, EVENT, SECRET, agui_config, agui_registry, run_input

from conftest import StartServer


async def start(start_server: StartServer, connector: Any = None, agents: Any = None) -> Any:
    return await start_server(agui_config(connector, agents), registry=agui_registry())


async def run_events(ws: Any, timeout: float = 10) -> list[dict[str, Any]]:
    """Events up to the end of a run (RUN_FINISHED or RUN_ERROR), each parsed by ag-ui-protocol."""
    events = []
    while True:
        data = json.loads(await asyncio.wait_for(ws.recv(), timeout))
        EVENT.validate_python(data)  # seq is an extra field, which the models keep
        events.append(data)
        if data["type"] in ("RUN_FINISHED", "RUN_ERROR"):
            return events


async def test_several_runs_over_one_connection_each_event_with_seq(start_server: StartServer) -> None:
    server = await start(start_server, agents={"assistant": {"use": "echo", "demo_tools": True}})
    async with websockets.connect(server.base + "/agui/ws", additional_headers=AUTH) as ws:
        await ws.send(json.dumps(run_input("t-ws", "hello world", run_id="r1")))
        first = await run_events(ws)
        await ws.send(json.dumps(run_input("t-ws", "again", run_id="r2")))
        second = await run_events(ws)
    assert [e["type"] for e in first][:2] == ["RUN_STARTED", "STEP_STARTED"]
    assert first[-1]["type"] == "RUN_FINISHED" and first[-1]["runId"] == "r1"
    assert second[-1]["type"] == "RUN_FINISHED" and second[-1]["runId"] == "r2"
    seqs = [e["seq"] for e in first + second]
    assert seqs == sorted(seqs) and seqs[0] == 1  # RUN_STARTED carries the ack's seq
    texts = ["".join(e.get("delta", "") for e in run if e["type"] == "TEXT_MESSAGE_CONTENT") for run in (first, second)]
    assert texts == ["hello world", "again"]


async def test_a_wrong_secret_is_401_before_the_upgrade(start_server: StartServer) -> None:
    server = await start(start_server)
    with pytest.raises(websockets.InvalidStatus) as caught:
        async with websockets.connect(server.base + "/agui/ws", additional_headers={"Authorization": "Bearer no"}):
            pass
    assert caught.value.response.status_code == 401
    async with websockets.connect(server.base + f"/agui/ws?secret={SECRET}") as ws:  # browsers: the query
        await ws.send(json.dumps(run_input("t-q", "hi")))
        assert (await run_events(ws))[-1]["type"] == "RUN_FINISHED"


async def test_a_bad_frame_is_run_error_naming_the_field(start_server: StartServer) -> None:
    server = await start(start_server)
    async with websockets.connect(server.base + "/agui/ws", additional_headers=AUTH) as ws:
        await ws.send(json.dumps({"runId": "r", "messages": []}))
        error = json.loads(await ws.recv())
        assert error == {
            "type": "RUN_ERROR",
            "message": "RunAgentInput.threadId: Field required",
            "code": "invalid_message",
        }
        await ws.send(json.dumps(run_input("t-ok", "still open")))
        assert (await run_events(ws))[-1]["type"] == "RUN_FINISHED"


async def test_a_dropped_connection_resumes_from_its_last_seq(start_server: StartServer) -> None:
    agents = {"assistant": {"use": "echo", "delay": 0.05}}
    server = await start(start_server, {"on_disconnect": "continue"}, agents)
    words = " ".join(f"w{n}" for n in range(20))
    ws = await websockets.connect(server.base + "/agui/ws", additional_headers=AUTH)
    await ws.send(json.dumps(run_input("t-res", words, run_id="r1")))
    seen = [json.loads(await ws.recv()) for _ in range(5)]  # RUN_STARTED, TEXT_MESSAGE_START, 3 chunks
    ws.transport.abort()  # no close frame: a dropped link
    await asyncio.sleep(0.1)
    async with websockets.connect(server.base + "/agui/ws", additional_headers=AUTH) as again:
        await again.send(json.dumps({"type": "resume", "threadId": "t-res", "lastSeq": seen[-1]["seq"]}))
        rest = await run_events(again)
    assert rest[0]["seq"] == seen[-1]["seq"] + 1
    events = seen + rest
    assert "".join(e.get("delta", "") for e in events if e["type"] == "TEXT_MESSAGE_CONTENT") == words
    assert [e["type"] for e in events].count("TEXT_MESSAGE_START") == 1
    assert events[-1]["type"] == "RUN_FINISHED"


async def test_cancel_a_run_being_answered_and_a_queued_one(start_server: StartServer) -> None:
    server = await start(start_server, agents={"slow": {"use": "slow", "seconds": 30}})
    async with websockets.connect(server.base + "/agui/ws", additional_headers=AUTH) as ws:
        await ws.send(json.dumps(run_input("t-c", "one", run_id="r1")))
        await ws.send(json.dumps(run_input("t-c", "two", run_id="r2")))
        first = [json.loads(await ws.recv()) for _ in range(4)]  # r1 and r2 start, r1's text begins
        assert sorted(e["type"] for e in first) == sorted(
            ["RUN_STARTED", "RUN_STARTED", "TEXT_MESSAGE_START", "TEXT_MESSAGE_CONTENT"]
        )
        await ws.send(json.dumps({"type": "cancel", "runId": "r2"}))  # queued: dropped
        dropped = json.loads(await ws.recv())
        assert dropped["type"] == "RUN_FINISHED" and dropped["runId"] == "r2"
        assert dropped["outcome"] == {"type": "cancelled"}
        await ws.send(json.dumps({"type": "cancel", "runId": "r1"}))  # being answered: it ends
        ended = await run_events(ws)
        assert [e["type"] for e in ended] == ["TEXT_MESSAGE_END", "RUN_FINISHED"]
        assert ended[-1]["runId"] == "r1" and ended[-1]["outcome"] == {"type": "cancelled"}
        await ws.send(json.dumps({"type": "cancel", "runId": "r1"}))  # over already
        error = json.loads(await ws.recv())
        assert error["type"] == "RUN_ERROR" and error["code"] == "not_found" and "seq" not in error


async def test_shutdown_ends_open_runs_and_closes_1001(start_server: StartServer) -> None:
    import connic
    from connic.app import drain

    config = agui_config(agents={"slow": {"use": "slow", "seconds": 30}})
    config["server"] = {"shutdown_grace": 0.2}
    app = connic.create_app(config, registry=agui_registry())
    server = await start_server(app=app)
    async with websockets.connect(server.base + "/agui/ws", additional_headers=AUTH) as ws:
        await ws.send(json.dumps(run_input("t-down", "x", run_id="r1")))
        assert [json.loads(await ws.recv())["type"] for _ in range(3)] == [
            "RUN_STARTED",
            "TEXT_MESSAGE_START",
            "TEXT_MESSAGE_CONTENT",
        ]
        draining = asyncio.create_task(drain(app))
        ended = await run_events(ws)
        assert ended[-1]["type"] == "RUN_FINISHED" and ended[-1]["outcome"] == {"type": "cancelled"}
        with pytest.raises(websockets.ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 10)
        assert ws.close_code == 1001
        await asyncio.wait_for(draining, 10)


async def test_a_client_that_never_reads_and_sends_bad_frames_is_dropped(start_server: StartServer) -> None:
    # A long send_timeout: only the outbox's bound can drop this client within the wait below.
    server = await start(start_server, {"send_queue": 4, "send_timeout": 120})
    port = int(server.http.rsplit(":", 1)[1])
    ws = await open_raw(port, "/agui/ws", headers=AUTH, rcvbuf=4096)
    ws.pause_reading()  # and never read a byte
    bad = text({"type": "cancel", "runId": "x" * 4096})  # each answered with a RUN_ERROR
    sent = 0
    try:
        while sent < 20_000:  # 80 MiB at most, were the client never dropped
            await asyncio.wait_for(ws.send_raw(bad), 30)
            sent += 1
    except (ConnectionError, OSError):
        pass  # dropped: the server aborted the connection
    finally:
        ws.writer.transport.abort()
    await wait_metric(server.http, 'connic_slow_consumer_closes_total{connector="/agui"}', 1)
    await wait_metric(server.http, 'connic_closes_total{code="4010",connector="/agui"}', 1)
    assert sent < 20_000, "the server took every bad frame and never dropped the client"


async def test_an_error_quotes_a_huge_run_id_cut_short(start_server: StartServer) -> None:
    server = await start(start_server)
    async with websockets.connect(server.base + "/agui/ws", additional_headers=AUTH) as ws:
        await ws.send(json.dumps({"type": "cancel", "runId": "x" * 100_000}))
        error = json.loads(await ws.recv())
    assert error["type"] == "RUN_ERROR" and error["code"] == "not_found"
    assert error["message"].startswith("no run of this connection has runId 'xxx") and len(error["message"]) < 200


async def test_an_earlier_message_connic_cannot_take_is_run_error_and_opens_no_thread(
    start_server: StartServer,
) -> None:
    server = await start(start_server)
    image = {"type": "image", "source": {"type": "url", "value": "https://example.com/cat.png"}}
    before = [{"id": "m0", "role": "user", "content": [image]}]
    async with websockets.connect(server.base + "/agui/ws", additional_headers=AUTH) as ws:
        await ws.send(json.dumps(run_input("t-img", "and now?", before=before)))
        error = json.loads(await ws.recv())
        assert error["type"] == "RUN_ERROR" and error["code"] == "invalid_message"
        assert error["message"].startswith("RunAgentInput.messages.0.content.0: "), error
        assert await scrape(server.http, 'connic_sessions_total{connector="/agui"}') == 0
        await ws.send(json.dumps(run_input("t-img", "text only")))  # the connection goes on
        assert (await run_events(ws))[-1]["type"] == "RUN_FINISHED"
    assert await scrape(server.http, 'connic_sessions_total{connector="/agui"}') == 1


async def test_a_failed_resume_opens_nothing_and_counts_as_a_failed_authentication(
    start_server: StartServer,
) -> None:
    server = await start(start_server, {"max_auth_failures": 3})
    async with websockets.connect(server.base + "/agui/ws", additional_headers=AUTH) as ws:
        for thread_id in ("a}b{c", "t-never-was", "x" * 300):
            await ws.send(json.dumps({"type": "resume", "threadId": thread_id, "lastSeq": 0}))
            error = json.loads(await ws.recv())
            assert error["type"] == "RUN_ERROR" and error["code"] == "invalid_resume", error
            assert len(error["message"]) < 200
        # Braked now: a resume is refused without looking the thread up, and so is a new connection.
        await ws.send(json.dumps({"type": "resume", "threadId": "t-never-was", "lastSeq": 0}))
        assert "too many failed authentications" in json.loads(await ws.recv())["message"]
    assert await scrape(server.http, 'connic_sessions_total{connector="/agui"}') == 0  # nothing opened
    assert await scrape(server.http, 'connic_resumes_total{connector="/agui",result="failed"}') == 3
    with pytest.raises(websockets.InvalidStatus) as caught:
        async with websockets.connect(server.base + "/agui/ws", additional_headers=AUTH):
            pass
    assert caught.value.response.status_code == 429
