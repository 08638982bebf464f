"""Rate limit, connection caps and the metrics endpoint."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
import websockets

from conftest import Connect, StartServer, make_config


async def test_rate_limited_with_retry_after(start_server: StartServer, connect: Connect) -> None:
    server = await start_server(make_config({"rate_limit": {"messages": 2, "per": 60}}))
    client = await connect(server.url())
    for _ in range(2):
        frames = await client.reply({"message": "ok"})
        assert frames[-1]["type"] == "stream_end"
    frames = await client.reply({"id": "r", "message": "too many"})
    assert len(frames) == 1
    error = frames[0]
    assert error["type"] == "error" and error["code"] == "rate_limited" and error["id"] == "r"
    assert 0 < error["retry_after"] <= 30
    await client.send({"type": "ping"})
    assert (await client.recv()) == {"type": "pong"}  # the connection stays


async def test_connection_caps(start_server: StartServer, connect: Connect) -> None:
    config = make_config()
    config["server"] = {"max_connections": 3, "max_connections_per_ip": 2}
    server = await start_server(config)
    a = await connect(server.url())
    await connect(server.url())
    with pytest.raises(websockets.InvalidStatus) as refused:
        await connect(server.url())
    assert refused.value.response.status_code == 429
    await a.ws.close()
    await a.ws.wait_closed()
    for _ in range(50):  # the server counts the connection out once its handler has finished
        try:
            await connect(server.url())
            break
        except websockets.InvalidStatus:
            pass
    else:
        pytest.fail("a freed slot was never reused")


async def test_server_cap_is_503(start_server: StartServer, connect: Connect) -> None:
    config = make_config()
    config["server"] = {"max_connections": 1}
    server = await start_server(config)
    await connect(server.url())
    with pytest.raises(websockets.InvalidStatus) as refused:
        await connect(server.url())
    assert refused.value.response.status_code == 503


async def test_plain_http_get_on_the_ws_path_is_400(server) -> None:
    async with aiohttp.ClientSession() as http, http.get(server.http + "/ws") as response:
        assert response.status == 400
        assert "WebSocket endpoint" in await response.text()


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or (line.startswith(name + "{") and line.split(" ")[0] == name):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_metrics_match_what_the_client_saw(start_server: StartServer, connect: Connect) -> None:
    server = await start_server(make_config({"max_queued": 1}))
    client = await connect(server.url())
    usage = [0, 0]
    for text in ("one two", "three four five"):
        frames = await client.reply({"message": text})
        usage[0] += frames[-1]["token_usage"]["prompt_tokens"]
        usage[1] += frames[-1]["token_usage"]["candidates_tokens"]
    await client.send("not json")
    assert (await client.recv())["code"] == "invalid_json"
    bad = await connect(server.url(), secret="wrong", expect_connected=False)
    code, _ = await bad.closed()
    assert code == 4001
    async with aiohttp.ClientSession() as http:
        for _ in range(50):  # the server accounts for a close once its side of the handshake is done
            async with http.get(server.http + "/metrics") as response:
                assert response.status == 200
                assert response.content_type == "text/plain"
                text = await response.text()
            if metric(text, 'connic_closes_total{code="4001",connector="/ws"}'):
                break
            await asyncio.sleep(0.05)
    assert metric(text, 'connic_messages_total{connector="/ws"}') == 2
    assert metric(text, 'connic_tokens_total{agent="assistant",kind="prompt"}') == usage[0] == 5
    assert metric(text, 'connic_tokens_total{agent="assistant",kind="candidates"}') == usage[1]
    assert metric(text, 'connic_errors_total{code="invalid_json",connector="/ws"}') == 1
    assert metric(text, 'connic_errors_total{code="unauthorized",connector="/ws"}') == 1
    assert metric(text, 'connic_closes_total{code="4001",connector="/ws"}') == 1
    assert metric(text, 'connic_connections_total{connector="/ws"}') == 2
    assert metric(text, 'connic_connections_open{connector="/ws"}') == 1
    assert metric(text, 'connic_sessions_open{connector="/ws"}') == 1
    assert metric(text, 'connic_turns_total{agent="assistant",reason="stop"}') == 2
    assert metric(text, 'connic_turn_duration_seconds_count{agent="assistant"}') == 2
    assert metric(text, 'connic_time_to_first_chunk_seconds_count{agent="assistant"}') == 2
    assert 'connic_turn_duration_seconds_bucket{agent="assistant",le="+Inf"} 2' in text


async def test_metrics_can_be_switched_off(start_server: StartServer) -> None:
    config = make_config()
    config["server"] = {"metrics": False}
    server = await start_server(config)
    async with aiohttp.ClientSession() as http, http.get(server.http + "/metrics") as response:
        assert response.status == 404


async def test_metrics_on_their_own_port(start_server: StartServer, unused_tcp_port: int) -> None:
    config = make_config()
    config["server"] = {"metrics_port": unused_tcp_port}
    server = await start_server(config)
    async with aiohttp.ClientSession() as http:
        async with http.get(server.http + "/metrics") as response:
            assert response.status == 404
        async with http.get(f"http://127.0.0.1:{unused_tcp_port}/metrics") as response:
            assert response.status == 200
            assert "connic_connections_open" in await response.text()


@pytest.mark.parametrize(
    ("server", "connector", "message"),
    [
        ({"metrics_path": "metrics"}, {}, r"server\.metrics_path: must start with '/'"),
        ({}, {"path": "/metrics"}, r"connectors\[0\]\.path: '/metrics' is server\.metrics_path"),
    ],
)
def test_metrics_path_conflicts_are_config_errors(server: dict, connector: dict, message: str) -> None:
    import connic

    config = make_config(connector)
    config["server"] = server
    with pytest.raises(connic.ConfigError, match=message):
        connic.create_app(config)
