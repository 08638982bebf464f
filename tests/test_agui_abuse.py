"""The agui transport under bad input and bad clients: malformed runs, huge bodies, a reader
that never reads, clients that go away, and many runs at once (docs/agui.md)."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from typing import Any

import aiohttp
import pytest
from resume_helpers import wait_turns
from test_agui_support import AUTH, agui_config, agui_registry, post_run, run_input, text_of

import connic
from conftest import StartServer


async def start(start_server: StartServer, connector: Any = None, agents: Any = None) -> Any:
    return await start_server(agui_config(connector, agents), registry=agui_registry())


async def scrape(http: str, name: str) -> float:
    """One series of /metrics (0 when absent)."""
    async with aiohttp.ClientSession() as session, session.get(http + "/metrics") as response:
        text = await response.text()
    for line in text.splitlines():
        if line.split(" ")[0] == name:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def wait_metric(http: str, name: str, value: float, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while (seen := await scrape(http, name)) < value:
        assert time.monotonic() < deadline, f"{name} is {seen}, expected {value}"
        await asyncio.sleep(0.05)


@pytest.mark.parametrize(
    ("body", "status", "named"),
    [
        ({"runId": "r", "messages": []}, 422, "RunAgentInput.threadId: Field required"),
        ({"threadId": "t", "runId": "r", "messages": "hi"}, 422, "RunAgentInput.messages: "),
        ({"threadId": "t", "runId": "r", "messages": [{"id": "m", "role": "user"}]}, 422, "messages.0.user.content"),
        ({"threadId": "t", "runId": "r", "messages": []}, 422, "RunAgentInput.messages: a run needs at least one"),
        (
            {"threadId": "t", "runId": "r", "messages": [{"id": "m", "role": "assistant", "content": "x"}]},
            422,
            "RunAgentInput.messages.0.role: the last message must be the user's",
        ),
        ({"threadId": "", "runId": "r", "messages": [{"id": "m", "role": "user", "content": "x"}]}, 422, "threadId"),
        (
            {"threadId": "a}b{c", "runId": "r", "messages": [{"id": "m", "role": "user", "content": "x"}]},
            422,
            "RunAgentInput.threadId: must be 1 to 256 letters, digits or . _ : ~ -",
        ),
        (b"{not json", 400, "not valid JSON"),
        (b"\xff\xfe", 400, "not UTF-8"),
        (b"[" * 5000 + b"]" * 5000, 400, "deeper than"),
    ],
)
async def test_a_malformed_run_is_refused_naming_the_field(
    start_server: StartServer, body: Any, status: int, named: str
) -> None:
    server = await start(start_server)
    got, text = await post_run(server.http + "/agui", body)
    assert got == status, text
    assert isinstance(text, str) and named in text and text.count("\n") == 1, text


async def test_a_10_mib_body_is_413(start_server: StartServer) -> None:
    server = await start(start_server)
    huge = json.dumps(run_input("t-big", "x" * (10 * 1024 * 1024))).encode()
    status, text = await post_run(server.http + "/agui", huge)
    assert status == 413 and "at most 1048576" in str(text)


async def test_a_chunked_body_over_the_limit_is_413(start_server: StartServer) -> None:
    server = await start(start_server, {"max_body_bytes": 4096})

    async def body() -> Any:  # no Content-Length: the bound holds while reading
        for _ in range(10):
            yield b" " * 1024

    async with aiohttp.ClientSession() as http, http.post(server.http + "/agui", data=body(), headers=AUTH) as resp:
        assert resp.status == 413
        assert "over 4096 bytes" in await resp.text()


async def test_a_reader_that_never_reads_is_dropped(start_server: StartServer) -> None:
    server = await start(start_server, {"send_queue": 8, "send_timeout": 0.5})
    words = " ".join(["word"] * 200_000)
    body = json.dumps(run_input("t-slow", words)).encode()
    port = int(server.http.rsplit(":", 1)[1])
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # and never read a byte
    try:
        head = f"POST /agui HTTP/1.1\r\nHost: x\r\nAuthorization: {AUTH['Authorization']}\r\n"
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        sock.sendall(head.encode() + body)
        await wait_metric(server.http, 'connic_slow_consumer_closes_total{connector="/agui"}', 1)
        await wait_metric(server.http, 'connic_closes_total{code="4010",connector="/agui"}', 1)
        # on_disconnect = "cancel" (the agui default): the reply stops with its reader.
        await wait_turns(server.http, "assistant", 1, reason="cancelled")
    finally:
        sock.close()


async def test_a_client_that_goes_away_cancels_its_run(start_server: StartServer) -> None:
    server = await start(start_server, agents={"slow": {"use": "slow", "seconds": 30}})
    async with aiohttp.ClientSession() as http:
        response = await http.post(server.http + "/agui", json=run_input("t-gone", "x"), headers=AUTH)
        assert response.status == 200
        await response.content.readuntil(b"started")  # the agent is answering
        response.close()  # drop the connection mid-run
    await wait_turns(server.http, "slow", 1, reason="cancelled")
    await wait_metric(server.http, 'connic_closes_total{code="1006",connector="/agui"}', 1)


async def test_with_on_disconnect_continue_the_reply_goes_on_into_the_thread(start_server: StartServer) -> None:
    agents = {"slow": {"use": "slow", "seconds": 0.3}, "look": {"use": "inspect"}}
    server = await start(start_server, {"on_disconnect": "continue"}, agents)
    async with aiohttp.ClientSession() as http:
        response = await http.post(server.http + "/agui/slow", json=run_input("t-on", "x"), headers=AUTH)
        await response.content.readuntil(b"started")
        response.close()
    await wait_turns(server.http, "slow", 1, reason="stop")
    status, events = await post_run(server.http + "/agui/look", run_input("t-on", "what did slow say?"))
    assert status == 200
    history = json.loads(text_of(events))["history"]  # type: ignore[arg-type]
    assert history[1]["text"] == "started finished"


async def test_a_thousand_concurrent_runs_complete(start_server: StartServer) -> None:
    server = await start(start_server)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as http:

        async def one(n: int) -> list[str]:
            async with http.post(server.http + "/agui", json=run_input(f"t-{n}", f"run {n}"), headers=AUTH) as r:
                assert r.status == 200
                text = await r.text()
            events = [json.loads(block[len("data: ") :]) for block in text.split("\n\n") if block]
            assert "".join(e.get("delta", "") for e in events) == f"run {n}"
            return [e["type"] for e in events]

        results = await asyncio.gather(*(one(n) for n in range(1000)))
    assert all(r[0] == "RUN_STARTED" and r[-1] == "RUN_FINISHED" for r in results)
    assert await scrape(server.http, 'connic_messages_total{connector="/agui"}') == 1000


async def test_shutdown_lets_a_run_finish_its_grace_then_refuses_new_runs(start_server: StartServer) -> None:
    import connic
    from connic.app import drain

    config = agui_config(agents={"slow": {"use": "slow", "seconds": 30}})
    config["server"] = {"shutdown_grace": 0.2}
    app = connic.create_app(config, registry=agui_registry())
    server = await start_server(app=app)
    async with aiohttp.ClientSession() as http:
        response = await http.post(server.http + "/agui", json=run_input("t-drain", "x"), headers=AUTH)
        await response.content.readuntil(b"started")
        draining = asyncio.create_task(drain(app))
        rest = (await asyncio.wait_for(response.content.read(), 10)).decode()
        await asyncio.wait_for(draining, 10)
    last = json.loads(rest.strip().split("\n\n")[-1][len("data: ") :])
    assert last["type"] == "RUN_FINISHED" and last["outcome"] == {"type": "cancelled"}
    status, text = await post_run(server.http + "/agui", run_input("t-after", "x"))
    assert status == 503 and text == "server is shutting down\n"


async def test_concurrent_first_runs_of_one_thread_share_its_session(start_server: StartServer) -> None:
    server = await start(start_server, agents={"look": {"use": "inspect"}})
    url = server.http + "/agui"
    results = await asyncio.gather(*(post_run(url, run_input("t-race", f"run {n}")) for n in range(5)))
    numbers = sorted(json.loads(text_of(events))["number"] for _, events in results)  # type: ignore[arg-type]
    assert numbers == [1, 2, 3, 4, 5]  # one session counted them all


def test_without_ag_ui_protocol_the_connector_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from connic.errors import ConfigError

    monkeypatch.setitem(sys.modules, "ag_ui.encoder", None)  # as if the package were not installed
    with pytest.raises(ConfigError, match=r"pip install 'connic\[agui\]'"):
        connic.create_app(agui_config(), registry=agui_registry())


async def test_overlapping_runs_of_a_thread_stream_their_own_events(start_server: StartServer) -> None:
    server = await start(start_server, agents={"assistant": {"use": "echo", "delay": 0.02}})
    url = server.http + "/agui"
    first, second = await asyncio.gather(
        post_run(url, run_input("t-two", "first run here", run_id="a")),
        post_run(url, run_input("t-two", "second one", run_id="b")),
    )
    for (status, events), (run_id, text) in zip(
        (first, second), [("a", "first run here"), ("b", "second one")], strict=True
    ):
        assert status == 200 and isinstance(events, list)
        assert text_of(events) == text
        assert {e.run_id for e in events if hasattr(e, "run_id")} == {run_id}
        assert events[-1].type.value == "RUN_FINISHED"


async def test_an_earlier_message_connic_cannot_take_is_422_and_opens_no_thread(start_server: StartServer) -> None:
    server = await start(start_server)
    image = {"type": "image", "source": {"type": "url", "value": "https://example.com/cat.png"}}
    before = [{"id": "m0", "role": "user", "content": [image]}]
    status, text = await post_run(server.http + "/agui", run_input("t-img", "and now?", before=before))
    assert status == 422, text
    assert isinstance(text, str) and text.startswith("RunAgentInput.messages.0.content.0: ") and text.count("\n") == 1
    assert await scrape(server.http, 'connic_sessions_total{connector="/agui"}') == 0  # nothing opened, nothing left
