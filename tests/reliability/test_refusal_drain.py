"""A client refused with 1009 while it is still sending its frame reads the close frame, then FIN.

The server stops reading the connection at the oversized frame's header. Closed right after
the close frame, its socket would hold (or soon get) the rest of that frame, and the kernel
answers that with a reset: Chromium, still writing the frame, then reports 1006 and no reason
(tests/test_browser_bounds.py). So the server sends FIN after the close frame and reads on,
dropping what comes, until the client closes too, for a bounded time and number of bytes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import pytest
from deflate_client import connect, reset_clients

from conftest import StartServer, make_config

from .conftest import Proc, assert_no_traceback, report, wait_metric
from .rawws import CLOSE, TEXT, Closed, RawWS, close_frame, frame, open_raw

__all__ = ["reset_clients"]  # the fixture, autouse: every test here resets the clients it left open

MAX_FRAME = 4096
BIG = 1024 * 1024
SENT_FIRST = 64 * 1024  # of the big frame, before the refusal is read


@pytest.fixture(autouse=True)
def _capture_everything(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)


@pytest.fixture(params=[False, True], ids=["plain", "deflate"])
async def refused(start_server: StartServer, request: pytest.FixtureRequest) -> tuple[RawWS, bytes]:
    """Authenticate, send the start of a 1 MiB frame, read the refusal: (the socket, the frame's rest)."""
    compress: bool = request.param
    server = await start_server(make_config({"max_frame_bytes": MAX_FRAME, "heartbeat": 0, "compress": compress}))
    peer, _ = await connect(int(server.server.port), compress)
    ws = peer.ws
    whole = frame(TEXT, b"x" * BIG)
    await ws.send_raw(whole[:SENT_FIRST])
    error = await ws.read_frame(timeout=10)
    assert error.opcode == TEXT and peer.decode(error)["code"] == "message_too_large", error
    closing = await ws.read_frame(timeout=10)
    assert (closing.opcode, closing.close_code) == (CLOSE, 1009), closing
    return ws, whole[SENT_FIRST:]


async def test_the_rest_of_a_refused_frame_is_read_and_the_connection_ends_with_fin(
    refused: tuple[RawWS, bytes], caplog: pytest.LogCaptureFixture
) -> None:
    ws, rest = refused
    # As a browser does: the frame it was writing goes out whole, then its close frame.
    for start in range(0, len(rest), SENT_FIRST):
        await ws.send_raw(rest[start : start + SENT_FIRST])
    await ws.send_raw(close_frame(1009))
    with pytest.raises(Closed) as ended:
        await ws.read_frame(timeout=10)
    assert not ended.value.reset, "the server reset the connection"
    await ws.aclose()
    assert_no_traceback(caplog)


async def test_a_refused_client_that_sends_on_is_dropped(refused: tuple[RawWS, bytes]) -> None:
    ws, _ = refused
    started = time.monotonic()
    sent = 0
    with pytest.raises(ConnectionError):
        while time.monotonic() - started < 60:
            await ws.send_raw(b"\x00" * SENT_FIRST)
            sent += SENT_FIRST
            await asyncio.sleep(0.02)  # some 3 MiB/s at most: the time bound ends it, not the bytes
    took = time.monotonic() - started
    report("a refused client sending on: dropped after", f"{took:.2f} s, {sent / 2**20:.1f} MiB")
    assert took < 20, took


SERVER_TOML = """
[agents.assistant]
use = "echo"

[[connectors]]
secrets = ["test-secret"]
heartbeat = 0
"""
BURST = 400


async def test_sockets_drained_at_once_are_capped(run_cli: Callable[..., Proc]) -> None:
    """400 clients refused at the same moment, none closing: at most 256 are drained, the rest closed."""
    server = run_cli(SERVER_TOML, "--log-level", "WARNING")
    idle = server.sockets()
    slots = asyncio.Semaphore(50)

    async def one() -> RawWS:
        async with slots:
            return await open_raw(server.port, timeout=30)

    clients = await asyncio.gather(*(one() for _ in range(BURST)))
    # The header of a 1 MiB frame before authenticating: refused at once (max_auth_frame_bytes).
    header = frame(TEXT, b"", length=1024 * 1024)
    await asyncio.gather(*(ws.send_raw(header) for ws in clients))
    closes = await asyncio.gather(*(ws.closed(timeout=30) for ws in clients))
    assert all(code == 1009 for code, _, _ in closes), {code for code, _, _ in closes}
    # Once connic has ended them all (counted as closed), only the drained sockets are left.
    closed = await wait_metric(server.http, 'connic_closes_total{code="1009",connector="/ws"}', BURST)
    assert closed['connic_closes_total{code="1009",connector="/ws"}'] == BURST
    held = server.sockets() - idle  # the clients' sockets still open on the server
    report(f"{BURST} clients refused with 1009 at once, none closing: sockets the server holds", str(held))
    assert held <= 256 + 16, held  # some slack: the metrics scrape's own connection may not be gone yet
