"""Before authentication a client may send small frames only (``max_auth_frame_bytes``).

An unauthenticated socket could otherwise make the server buffer all but the
last byte of a ``max_frame_bytes`` frame, and keep it for ``auth_timeout``.
Once authenticated, frames up to ``max_frame_bytes`` are read as before, with
or without compression, and whatever the client sent right behind its auth
frame (before ``connected``) is read under the large bound.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import inspect
import json
import logging
import os
import time
from collections.abc import Callable

import aiohttp
import pytest
import websockets
from aiohttp import web, web_protocol
from aiohttp._websocket import reader_py

from conftest import SECRET, Connect, StartServer, make_config

from .conftest import Proc, assert_no_traceback, eventually, kib, report
from .rawws import CONTINUATION, GUID, TEXT, RawWS, close_frame, connect_tcp, frame, open_raw, text

TOO_BIG = 1009
AUTH = text({"secret": SECRET})


@pytest.fixture(autouse=True)
def _capture_everything(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)


async def _refused_too_big(ws: RawWS) -> None:
    code, frames, got_close = await ws.closed(timeout=3)
    assert got_close and code == TOO_BIG, (code, frames)
    assert [(f["type"], f["code"]) for f in frames] == [("error", "message_too_large")]
    assert "max_auth_frame_bytes" in frames[0]["message"]


async def test_a_20_kib_frame_header_before_auth_is_1009_at_once(
    start_server: StartServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Only the header of a 20 KiB frame (under max_frame_bytes): refused on the declared length."""
    server = await start_server(make_config())
    ws = await open_raw(int(server.server.port))
    started = time.monotonic()
    await ws.send_raw(frame(TEXT, b"", length=20 * 1024))
    await _refused_too_big(ws)
    assert time.monotonic() - started < 3
    assert_no_traceback(caplog)


async def test_fragments_over_the_bound_before_auth_are_1009(
    start_server: StartServer, caplog: pytest.LogCaptureFixture
) -> None:
    server = await start_server(make_config({"max_auth_frame_bytes": 1000}))
    ws = await open_raw(int(server.server.port))
    await ws.send_raw(frame(TEXT, b'{"secret": "' + b"x" * 600, fin=False) + frame(CONTINUATION, b"y" * 600))
    await _refused_too_big(ws)
    assert_no_traceback(caplog)


async def test_frames_up_to_max_frame_bytes_after_auth(start_server: StartServer, connect: Connect) -> None:
    server = await start_server(make_config({"max_frame_bytes": 300_000, "max_auth_frame_bytes": 100}))
    client = await connect(server.url(), max_size=None)
    for size in (200, 150_000, 299_000):
        frames = await client.reply({"message": "m" * size})
        assert frames[-1]["full_response"] == "m" * size
    await client.send({"message": "m" * 300_001})
    code, frames = await client.closed()
    assert code == TOO_BIG and frames[-1]["code"] == "message_too_large"
    assert "max_frame_bytes" in frames[-1]["message"] and "auth" not in frames[-1]["message"]


async def test_the_bound_does_not_apply_when_the_handshake_authenticated(
    start_server: StartServer, connect: Connect
) -> None:
    server = await start_server(make_config({"max_auth_frame_bytes": 100}))
    client = await connect(server.url(), secret=None, additional_headers={"X-Connic-Secret": SECRET})
    frames = await client.reply({"message": "h" * 5000})
    assert frames[-1]["full_response"] == "h" * 5000


async def test_big_frames_behind_the_auth_frame_before_connected(
    start_server: StartServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A client that does not wait for ``connected``: its next frames are read under the large bound."""
    server = await start_server(make_config({"max_auth_frame_bytes": 100}))
    port = int(server.server.port)
    big = text({"id": "big", "message": "b" * 50_000})
    # The auth frame and a big message in one write.
    ws = await open_raw(port)
    await ws.send_raw(AUTH + big)
    assert (await ws.recv())["type"] == "connected"
    assert (await ws.until("stream_end"))[-1]["full_response"] == "b" * 50_000
    # The auth frame and the first part of a big frame in one write, the rest after `connected`.
    ws = await open_raw(port)
    await ws.send_raw(AUTH + big[:1000])
    assert (await ws.recv())["type"] == "connected"
    await ws.send_raw(big[1000:])
    assert (await ws.until("stream_end"))[-1]["full_response"] == "b" * 50_000
    # The auth frame alone, then a big message in a write of its own without waiting: read
    # before the verdict (held, the socket paused) or after it (the large parser), whole.
    ws = await open_raw(port)
    await ws.send_raw(AUTH)
    await ws.send_raw(big)
    assert (await ws.recv())["type"] == "connected"
    assert (await ws.until("stream_end"))[-1]["full_response"] == "b" * 50_000
    # The same, the auth frame cut in two and fragmented.
    ws = await open_raw(port)
    auth = frame(TEXT, b'{"secr', fin=False) + frame(CONTINUATION, b'et": "' + SECRET.encode() + b'"}')
    await ws.send_raw(auth[:9])
    await ws.send_raw(auth[9:] + big[:3])
    assert (await ws.recv())["type"] == "connected"
    await ws.send_raw(big[3:])
    assert (await ws.until("stream_end"))[-1]["full_response"] == "b" * 50_000
    assert_no_traceback(caplog)


async def _upgrade(port: int, extra_header: bytes = b"", then: bytes = b"") -> RawWS:
    """A raw upgrade with any header bytes, and ``then`` written in the same write as the request."""
    reader, writer = await connect_tcp("127.0.0.1", port)
    key = base64.b64encode(os.urandom(16)).decode()
    handshake = (
        f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
    ).encode()
    writer.write(handshake + extra_header + b"\r\n" + then)
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
    accept = base64.b64encode(hashlib.sha1((key + GUID).encode()).digest()).decode()
    assert " 101 " in head and accept in head, head
    return RawWS(reader, writer)


async def test_frames_sent_with_the_handshake(start_server: StartServer, caplog: pytest.LogCaptureFixture) -> None:
    """Frames written right behind the upgrade request (before the 101) are read as well."""
    server = await start_server(make_config({"max_auth_frame_bytes": 100}))
    ws = await _upgrade(int(server.server.port), then=AUTH + text({"message": "c" * 5000}))
    assert (await ws.recv())["type"] == "connected"
    assert (await ws.until("stream_end"))[-1]["full_response"] == "c" * 5000
    assert_no_traceback(caplog)


@pytest.mark.parametrize(
    ("header", "first_frame"),
    [
        (b"", b'{"secret": "\\ud800"}'),  # JSON's escape of a lone surrogate
        (b"", b'{"type": "auth", "secret": "\\udcff\\ud800x"}'),
        (b"X-Connic-Secret: \xff\r\n", None),  # a header byte that is not UTF-8
        (b"X-Connic-Secret: t\xc3\r\n", None),  # a cut UTF-8 sequence
    ],
)
async def test_a_secret_that_is_not_valid_unicode_is_unauthorized(
    start_server: StartServer, caplog: pytest.LogCaptureFixture, header: bytes, first_frame: bytes | None
) -> None:
    server = await start_server(make_config())
    ws = await _upgrade(int(server.server.port), extra_header=header)
    if first_frame is not None:
        await ws.send_raw(frame(TEXT, first_frame))
    code, frames, got_close = await ws.closed(timeout=3)
    assert got_close and code == 4001, (code, frames)
    assert [(f["type"], f["code"]) for f in frames] == [("error", "unauthorized")]
    assert await eventually(lambda: "code=4001 authenticated=False" in caplog.text)  # the close is logged
    assert_no_traceback(caplog)


async def test_a_refused_auth_with_more_frames_behind_it_closes_4001_at_once(
    start_server: StartServer, caplog: pytest.LogCaptureFixture
) -> None:
    server = await start_server(make_config({"max_auth_frame_bytes": 100}))
    ws = await open_raw(int(server.server.port))
    started = time.monotonic()
    await ws.send_raw(text({"secret": "wrong"}) + text({"message": "x"}) + close_frame(1000))
    code, frames, got_close = await ws.closed(timeout=3)
    assert got_close and code == 4001 and frames[0]["code"] == "unauthorized"
    assert time.monotonic() - started < 1.5  # not aiohttp's 2 s wait for a close frame
    assert_no_traceback(caplog)


@pytest.mark.parametrize("auth_in_handshake", [False, True])
async def test_compressed_connection(start_server: StartServer, auth_in_handshake: bool) -> None:
    """permessage-deflate: the inflater's window carries over authentication (context takeover)."""
    server = await start_server(make_config({"compress": True, "max_auth_frame_bytes": 200}))
    headers = {"X-Connic-Secret": SECRET} if auth_in_handshake else {}
    async with websockets.connect(server.url(), max_size=None, additional_headers=headers) as ws:
        assert ws.protocol.extensions, "permessage-deflate was not negotiated"
        if not auth_in_handshake:
            await ws.send(json.dumps({"secret": SECRET, "padding": "p" * 150}))
        assert json.loads(await ws.recv())["type"] == "connected"
        for size in (50, 100_000, 100_000, 600_000):
            await ws.send(json.dumps({"message": "z" * size}))
            while (got := json.loads(await ws.recv()))["type"] != "stream_end":
                pass
            assert got["full_response"] == "z" * size
    # Before authentication the bound holds, compressed or not.
    async with websockets.connect(server.url(), max_size=None) as ws:
        await ws.send(os.urandom(300).hex())
        error = json.loads(await ws.recv())
        assert error["code"] == "message_too_large"
        await asyncio.wait_for(ws.wait_closed(), 3)
        assert ws.close_code == TOO_BIG


def test_the_aiohttp_internals_the_bounded_reader_uses() -> None:
    """connic.transports._aiohttp_auth relies on these private names of aiohttp (3.14.5); the tests
    above show they still behave as it expects."""
    assert aiohttp.__version__ == "3.14.5", "check connic/transports/_aiohttp_auth.py against this aiohttp"
    handler_slots = web_protocol.RequestHandler.__slots__
    assert "_payload_parser" in handler_slots and "_message_tail" in handler_slots
    post_start = inspect.signature(web.WebSocketResponse._post_start)
    assert list(post_start.parameters) == ["self", "request", "protocol", "writer"]
    assert "set_parser(self._parser" in inspect.getsource(web.WebSocketResponse._post_start)
    ws = web.WebSocketResponse(max_msg_size=123)
    assert (ws._max_msg_size, ws._decode_text, ws._parser, ws._reader, ws._loop) == (123, True, None, None, None)
    loop = asyncio.new_event_loop()
    try:
        queue = reader_py.WebSocketDataQueue(_Protocol(), 2**16, loop=loop)  # type: ignore[arg-type]
        py_reader = reader_py.WebSocketReader(queue, 100, compress=True, decode_text=True)
    finally:
        loop.close()
    assert (py_reader._max_msg_size, py_reader._max_fragments) == (100, 1024)


class _Protocol:
    _reading_paused = False


# --- memory ---------------------------------------------------------------------------------

SOCKETS = 1000
SERVER_TOML = """
[agents.assistant]
use = "echo"

[[connectors]]
secrets = ["test-secret"]
"""


async def _partial_frames(server: Proc, declared: int, sent: int) -> list[RawWS]:
    """SOCKETS unauthenticated sockets, each sending the header of a ``declared``-byte frame and ``sent`` bytes."""
    data = frame(TEXT, b"p" * sent, length=declared)
    slots = asyncio.Semaphore(50)

    async def one() -> RawWS:
        async with slots:
            ws = await open_raw(server.port, timeout=20)
            await ws.send_raw(data)
            return ws

    return await asyncio.gather(*(one() for _ in range(SOCKETS)))


async def _settle(server: Proc) -> int:
    """RSS once it has stopped growing (bounded wait)."""
    last = server.rss_kib()
    for _ in range(40):
        await asyncio.sleep(0.25)
        now = server.rss_kib()
        if abs(now - last) < 256:
            return now
        last = now
    return last


async def test_memory_of_unauthenticated_sockets_holding_partial_frames(run_cli: Callable[..., Proc]) -> None:
    """1,000 unauthenticated sockets each hold a partial frame: measured in docs/reliability.md."""
    server = run_cli(SERVER_TOML, "--log-level", "WARNING")
    start = await _settle(server)
    # Frames of max_frame_bytes (the default, 1 MiB): refused on their header, nothing buffered.
    sockets = await _partial_frames(server, 1024 * 1024, 4096)
    peak = await _settle(server)
    codes = await asyncio.gather(*(ws.closed(timeout=10) for ws in sockets))
    assert all(code == TOO_BIG for code, _, _ in codes), {c for c, _, _ in codes}
    for ws in sockets:
        await ws.aclose()
    # Frames just under max_auth_frame_bytes (16 KiB): kept until auth_timeout, the most one may pin.
    before = await _settle(server)
    sockets = await _partial_frames(server, 16 * 1024 - 1, 16 * 1024 - 2)
    held = await _settle(server)
    for ws in sockets:
        ws.reset()
    report(
        f"pre-auth: RSS with {SOCKETS} unauthenticated sockets",
        f"{kib(start)} at start; {kib(peak)} ({(peak - start) / 1024:+.1f} MiB) while sending 1 MiB frames "
        f"(all refused 1009); {kib(held)} ({(held - before) / 1024:+.1f} MiB) holding 16 KiB - 2 bytes each",
    )
    assert "Traceback" not in server.output, server.output[-3000:]
