"""Reading a POSTed run's body (docs/agui.md): bounded in bytes (``max_body_bytes``), and counted
against the connection caps while it is read, so a client that sends bodies slowly, or says it
will send more than it does, cannot hold more than ``max_connections_per_ip`` of them."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator

import pytest
from test_agui_abuse import scrape
from test_agui_support import AUTH, agui_config, agui_registry, post_run, run_input

from conftest import StartServer

PER_IP = 2


@pytest.fixture
def sockets() -> Iterator[list[socket.socket]]:
    opened: list[socket.socket] = []
    yield opened
    for sock in opened:
        sock.close()


def stalled(port: int, declared: int, sent: int, opened: list[socket.socket]) -> socket.socket:
    """A POST that declares ``declared`` body bytes, sends ``sent`` of them and stops."""
    sock = socket.create_connection(("127.0.0.1", port))
    opened.append(sock)
    head = f"POST /agui HTTP/1.1\r\nHost: x\r\nAuthorization: {AUTH['Authorization']}\r\n"
    head += f"Content-Type: application/json\r\nContent-Length: {declared}\r\n\r\n"
    sock.sendall(head.encode() + b" " * sent)
    return sock


async def test_bodies_being_read_count_against_max_connections_per_ip(
    start_server: StartServer, sockets: list[socket.socket]
) -> None:
    config = agui_config({"max_body_bytes": 1024 * 1024})
    config["server"] = {"max_connections_per_ip": PER_IP}
    server = await start_server(config, registry=agui_registry())
    port = int(server.http.rsplit(":", 1)[1])
    for _ in range(PER_IP):  # each says 1 MiB is coming, sends 512 KiB, and waits
        stalled(port, 1024 * 1024, 512 * 1024, sockets)
    await asyncio.sleep(0.5)  # the server has them
    status, text = await post_run(server.http + "/agui", run_input("t-third", "hi"))
    assert (status, text) == (429, "too many connections\n"), (status, text)
    assert await scrape(server.http, 'connic_handshakes_refused_total{connector="/agui",status="429"}') == 1
    for sock in sockets:
        sock.close()
    for _ in range(200):  # their slots come back once the server sees them gone
        status, _ = await post_run(server.http + "/agui", run_input("t-after", "hi"))
        if status == 200:
            break
        await asyncio.sleep(0.05)
    assert status == 200


def response_of(sock: socket.socket) -> bytes:
    """What the server answers before it closes (blocking: run in a thread)."""
    sock.settimeout(30)
    got = b""
    while chunk := sock.recv(65536):
        got += chunk
    return got


@pytest.mark.parametrize(("declared", "sent"), [(4096, 100), (4096, 0)], ids=["part_of_it", "none_of_it"])
async def test_a_body_that_stops_coming_is_408_after_body_timeout(
    start_server: StartServer, sockets: list[socket.socket], declared: int, sent: int
) -> None:
    server = await start_server(agui_config({"body_timeout": 1}), registry=agui_registry())
    port = int(server.http.rsplit(":", 1)[1])
    started = asyncio.get_running_loop().time()
    answer = await asyncio.to_thread(response_of, stalled(port, declared, sent, sockets))
    took = asyncio.get_running_loop().time() - started
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
    assert b"the body did not arrive within 1 s" in answer, answer
    assert b"\r\nConnection: close\r\n" in answer, answer  # not kept for more of a body that stopped
    assert 0.5 < took < 8, took  # closed at body_timeout, not after aiohttp's 10 s of reading on
    assert await scrape(server.http, 'connic_handshakes_refused_total{connector="/agui",status="408"}') == 1
