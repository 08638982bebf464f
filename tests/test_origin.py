"""Browser Origins on a connector without auth: no drive-by use from a foreign web page."""

from __future__ import annotations

import asyncio
import base64
import os
from collections.abc import Callable

import pytest
import websockets

from conftest import CliServer, Connect, StartServer, make_config

NO_AUTH = {"require_auth": False, "secrets": []}


async def _status(port: int, origin: str | None, host: str | None = None) -> int:
    """The HTTP status of a WebSocket handshake with this Origin and Host (101: upgraded)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        lines = [
            "GET /ws HTTP/1.1",
            f"Host: {host or f'127.0.0.1:{port}'}",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}",
            "Sec-WebSocket-Version: 13",
            *([f"Origin: {origin}"] if origin is not None else []),
        ]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        return int(head.split(b" ", 2)[1])
    finally:
        writer.close()


async def test_no_auth_refuses_foreign_origins(start_server: StartServer, connect: Connect) -> None:
    server = await start_server(make_config(NO_AUTH))
    port = int(server.server.port)
    for origin in ("http://evil.example", "https://evil.example", f"http://evil.example:{port}", "null", "file://"):
        with pytest.raises(websockets.InvalidStatus) as refused:
            await connect(server.url(), secret=None, origin=origin)
        assert refused.value.response.status_code == 403, origin
    for origin in (
        f"http://127.0.0.1:{port}",
        f"http://localhost:{port}",
        "http://localhost:3000",
        "http://[::1]:5173",
    ):
        client = await connect(server.url(), secret=None, origin=origin)
        assert client.connected["type"] == "connected", origin
    client = await connect(server.url(), secret=None)  # no Origin: not a browser
    assert client.connected["type"] == "connected"


async def test_no_auth_same_origin_by_ip_but_not_by_name(start_server: StartServer) -> None:
    server = await start_server(make_config(NO_AUTH))
    port = int(server.server.port)
    # The server's own origin, reached by IP address (the playground on a LAN address).
    assert await _status(port, "http://10.1.2.3:8080", host="10.1.2.3:8080") == 101
    assert await _status(port, "http://10.1.2.4:8080", host="10.1.2.3:8080") == 403
    # A name is not trusted from Host: with DNS rebinding, evil.example's page reaches this
    # server under its own name, and its Origin then equals Host.
    assert await _status(port, "http://evil.example:8080", host="evil.example:8080") == 403
    assert await _status(port, None, host="evil.example:8080") == 101


async def test_allowed_origins_still_rule_without_auth(start_server: StartServer, connect: Connect) -> None:
    server = await start_server(make_config({**NO_AUTH, "allowed_origins": ["https://app.example.com"]}))
    await connect(server.url(), secret=None, origin="https://app.example.com")
    with pytest.raises(websockets.InvalidStatus):
        await connect(server.url(), secret=None, origin=f"http://localhost:{server.server.port}")


async def test_with_auth_any_origin_still_connects(start_server: StartServer, connect: Connect) -> None:
    server = await start_server()
    client = await connect(server.url(), origin="http://evil.example")
    assert client.connected["type"] == "connected"


def test_no_auth_warns_on_start(cli: Callable[..., CliServer]) -> None:
    server = cli("--no-auth")
    assert any("warning: --no-auth" in line for line in server.banner), server.banner
    code, _ = server.stop()
    assert code == 0
