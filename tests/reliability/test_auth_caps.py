"""Authentication and handshake refusals hold: deadlines, wrong secrets, Origin, connection caps."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import SECRET, StartServer, make_config, start_cli

from .conftest import eventually, report, runtime, scrape
from .rawws import BINARY, PING, PONG, TEXT, Closed, HandshakeRefused, RawWS, frame, open_raw

AUTH_TIMEOUT = 0.5
Frame = dict[str, Any]  # a JSON frame from the server


async def _until_closed(
    ws: RawWS, ping_every: float | None, limit: float, opened: float | None = None
) -> tuple[float, int | None, list[Frame]]:
    """Answer the server's pings (and, with ``ping_every``, send our own), but never authenticate.

    Returns (seconds until the close frame, its code, the JSON frames before it), counted from
    ``opened`` (the handshake's end; by default now); gives up after ``limit``.
    """
    started = time.monotonic() if opened is None else opened
    frames = []
    next_ping = started
    while time.monotonic() - started < limit:
        if ping_every is not None and time.monotonic() >= next_ping:
            await ws.send_raw(frame(PING, b"keepalive"))
            next_ping += ping_every
        try:
            got = await ws.read_frame(timeout=ping_every or limit)
        except TimeoutError:
            continue
        if got.opcode == PING:
            await ws.send_raw(frame(PONG, got.payload))
        elif got.opcode == TEXT:
            frames.append(got.json())
        elif got.opcode != PONG:
            return time.monotonic() - started, got.close_code, frames
    return time.monotonic() - started, None, frames


async def test_no_secret_is_4002_after_auth_timeout(start_server: StartServer) -> None:
    server = await start_server(make_config({"auth_timeout": AUTH_TIMEOUT}))
    port = int(server.server.port)
    # Timed from each client's handshake: opening 20 one after the other takes a while on a loaded machine.
    clients = [(await open_raw(port), time.monotonic()) for _ in range(20)]
    results = await asyncio.gather(*(_until_closed(ws, None, AUTH_TIMEOUT + 5, opened) for ws, opened in clients))
    slowest = max(elapsed for elapsed, _, _ in results)
    report(
        "auth: no secret, closed 4002 after",
        f"{min(r[0] for r in results):.2f}-{slowest:.2f} s (auth_timeout {AUTH_TIMEOUT} s, 20 clients)",
    )
    for elapsed, code, frames in results:
        assert code == 4002
        assert [(f["type"], f["code"]) for f in frames] == [("error", "auth_timeout")]
        assert AUTH_TIMEOUT - 0.05 <= elapsed < AUTH_TIMEOUT + 2.0, elapsed


@pytest.mark.parametrize(
    ("heartbeat", "ping_every"),
    [pytest.param(30.0, 0.1, id="client-pings"), pytest.param(0.2, None, id="answers-heartbeat")],
)
async def test_pings_do_not_extend_the_auth_deadline(
    start_server: StartServer, heartbeat: float, ping_every: float | None
) -> None:
    server = await start_server(make_config({"auth_timeout": AUTH_TIMEOUT, "heartbeat": heartbeat}))
    ws = await open_raw(int(server.server.port))
    elapsed, code, frames = await _until_closed(ws, ping_every, AUTH_TIMEOUT + 2.0)
    assert code == 4002, f"still unauthenticated and open after {elapsed:.1f} s"
    assert [(f["type"], f["code"]) for f in frames] == [("error", "auth_timeout")]


async def _refused_code(
    port: int, first: bytes | None = None, path: str = "/ws", headers: dict[str, str] | None = None
) -> tuple[int | None, list[Frame]]:
    ws = await open_raw(port, path, headers=headers)
    if first is not None:
        await ws.send_raw(first)
    code, frames, got_close = await ws.closed(timeout=5)
    assert got_close
    return code, frames


async def test_wrong_secret_is_4001(start_server: StartServer) -> None:
    server = await start_server(make_config({"auth_timeout": 5}))
    port = int(server.server.port)
    cases: dict[str, dict[str, Any]] = {
        "wrong secret frame": {"first": frame(TEXT, b'{"secret": "nope"}')},
        "auth-type frame, wrong": {"first": frame(TEXT, b'{"type": "auth", "secret": "nope"}')},
        "empty secret": {"first": frame(TEXT, b'{"secret": ""}')},
        "message before auth": {"first": frame(TEXT, b'{"message": "hi"}')},
        "binary before auth": {"first": frame(BINARY, b"\x00")},
        "not JSON before auth": {"first": frame(TEXT, b"secret")},
        "wrong secret header": {"headers": {"X-Connic-Secret": "nope"}},
        "wrong secret query": {"path": "/ws?secret=nope"},
    }
    for name, kwargs in cases.items():
        code, frames = await _refused_code(port, **kwargs)
        assert code == 4001, name
        assert [(f["type"], f["code"]) for f in frames] == [("error", "unauthorized")], name
        assert SECRET not in str(frames)
    # The right secret at the handshake works.
    ws = await open_raw(port, path=f"/ws?secret={SECRET}")
    assert (await ws.recv())["type"] == "connected"


async def test_bad_origin_is_403_before_the_upgrade(start_server: StartServer) -> None:
    server = await start_server(make_config({"allowed_origins": ["https://app.example.com", "https://*.trusted.dev"]}))
    port = int(server.server.port)
    for origin in ("https://evil.example.com", "http://app.example.com", "https://trusted.dev.evil.com", "null"):
        with pytest.raises(HandshakeRefused) as refused:
            await open_raw(port, headers={"Origin": origin})
        assert refused.value.status == 403, origin
    for origin in ("https://app.example.com", "https://eu.trusted.dev", "HTTPS://APP.EXAMPLE.COM"):
        ws = await open_raw(port, headers={"Origin": origin})
        await ws.send_json({"secret": SECRET})
        assert (await ws.recv())["type"] == "connected", origin
    metrics = await scrape(server.http)
    assert metrics['connic_handshakes_refused_total{connector="/ws",status="403"}'] == 4
    assert metrics['connic_connections_total{connector="/ws"}'] == 3


async def _try(port: int, source: str) -> RawWS | int:
    try:
        return await open_raw(port, source=source)
    except HandshakeRefused as refused:
        return refused.status


async def test_connection_caps_are_503_and_429(start_server: StartServer) -> None:
    config = make_config()
    # Every socket here stays unauthenticated: let all of them count against the total cap.
    config["server"] = {"max_connections": 10, "max_connections_per_ip": 4, "max_unauthenticated": 10}
    server = await start_server(config)
    port = int(server.server.port)
    app = server.server.app
    # Per address: 4 from 127.0.0.1, the 5th is 429; then 4 from 127.0.0.2; then 127.0.0.3 hits the total: 503.
    a = await asyncio.gather(*(_try(port, "127.0.0.1") for _ in range(6)))
    assert sorted(r for r in a if isinstance(r, int)) == [429, 429]
    b = await asyncio.gather(*(_try(port, "127.0.0.2") for _ in range(4)))
    assert not [r for r in b if isinstance(r, int)]
    c = [await _try(port, "127.0.0.3") for _ in range(4)]
    assert [r if isinstance(r, int) else "ok" for r in c] == ["ok", "ok", 503, 503]
    gate = runtime(app).gate
    assert gate.total == 10
    metrics = await scrape(server.http)
    assert metrics['connic_handshakes_refused_total{connector="/ws",status="429"}'] == 2
    assert metrics['connic_handshakes_refused_total{connector="/ws",status="503"}'] == 2
    assert metrics['connic_connections_total{connector="/ws"}'] == 10  # refused ones never upgraded
    # Abrupt resets free their slots too.
    for ws in [*a, *b, *c]:
        if isinstance(ws, RawWS):
            ws.reset()
    assert await eventually(lambda: gate.total == 0 and not gate.per_ip)
    again = await asyncio.gather(*(_try(port, "127.0.0.1") for _ in range(4)))
    assert all(isinstance(ws, RawWS) for ws in again)


async def test_cap_holds_under_a_handshake_storm(start_server: StartServer) -> None:
    config = make_config()
    config["server"] = {"max_connections": 20, "max_unauthenticated": 20}
    server = await start_server(config)
    port = int(server.server.port)
    results = await asyncio.gather(*(_try(port, "127.0.0.1") for _ in range(80)))
    opened = [r for r in results if isinstance(r, RawWS)]
    assert len(opened) == 20
    assert sorted({r for r in results if isinstance(r, int)}) == [503]
    assert runtime(server.server.app).gate.total == 20
    # Every admitted one is a working connection.
    for ws in opened:
        await ws.send_json({"secret": SECRET})
    for ws in opened:
        assert (await ws.recv())["type"] == "connected"


async def test_a_silent_tcp_connection_is_closed_after_handshake_timeout(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('[server]\nhandshake_timeout = 0.5\n[agents.e]\nuse = "echo"\n[[connectors]]\nsecrets = ["s"]\n')
    server = start_cli("--config", str(config))
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET /ws HTTP/1.1\r\nHost: x")  # an unfinished request
        started = time.monotonic()
        assert await asyncio.wait_for(reader.read(), 5) == b""
        assert time.monotonic() - started < 3
        writer.close()
    finally:
        code, _ = server.stop()
    assert code == 0


async def _gone(ws: RawWS) -> bool:
    """Whether the server dropped this socket (EOF or reset, no close frame)."""
    try:
        got = await ws.read_frame(timeout=2.0)
    except Closed:
        return True
    raise AssertionError(f"expected the socket dropped, got {got!r}")


async def test_unauthenticated_sockets_cannot_starve_authenticated_clients(start_server: StartServer) -> None:
    # The issue: 300 sockets that never authenticate filled max_connections = 300, and a client
    # with the right secret got 503 for as long as they kept coming back. Now at most 100 of
    # them (by default a tenth of the cap, at least 100, at most half) are held at a time: each
    # newcomer over that pushes out the oldest one.
    config = make_config({"auth_timeout": 30})
    config["server"] = {"max_connections": 300}
    server = await start_server(config)
    port = int(server.server.port)
    gate = runtime(server.server.app).gate
    squatters: list[RawWS] = []
    for _ in range(6):  # 50 at a time: a storm, within the listen backlog
        squatters += await asyncio.gather(*(open_raw(port) for _ in range(50)))
    # The right secret, at the handshake or in the first frame: connected at once.
    clients = [await open_raw(port, headers={"X-Connic-Secret": SECRET}) for _ in range(3)]
    assert gate.unauthenticated == 100 and gate.evicted == 200
    assert await eventually(lambda: gate.total == 103)  # the pushed-out ones are gone
    for _ in range(3):
        clients.append(await open_raw(port))
        await clients[-1].send_json({"secret": SECRET})
    for ws in clients:
        assert (await ws.recv())["type"] == "connected"
    # The first of them pushed out one squatter; having authenticated, it left a slot free.
    assert gate.unauthenticated == 99 and gate.evicted == 201
    # The newest squatter authenticates: its slot is free at once, and the next newcomers need not push anyone out.
    await squatters[-1].send_json({"secret": SECRET})
    assert (await squatters[-1].recv())["type"] == "connected"
    assert gate.unauthenticated == 98
    late = [await open_raw(port) for _ in range(2)]
    assert gate.unauthenticated == 100 and gate.evicted == 201
    assert len(late) == 2
    metrics = await scrape(server.http)
    assert metrics.get('connic_handshakes_refused_total{connector="/ws",status="503"}', 0) == 0


async def test_max_unauthenticated_pushes_out_the_oldest(start_server: StartServer) -> None:
    config = make_config({"auth_timeout": 30})
    config["server"] = {"max_connections": 20, "max_unauthenticated": 5}
    server = await start_server(config)
    port = int(server.server.port)
    gate = runtime(server.server.app).gate
    squatters = [await open_raw(port) for _ in range(8)]
    assert gate.unauthenticated == 5 and gate.evicted == 3
    assert [await _gone(ws) for ws in squatters[:3]] == [True] * 3
    for ws in squatters[3:]:  # the five newest are still open and may still authenticate
        await ws.send_json({"secret": SECRET})
        assert (await ws.recv())["type"] == "connected"
    assert await eventually(lambda: gate.unauthenticated == 0 and gate.total == 5)
