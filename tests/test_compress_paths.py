"""The WebSocket connector's behaviours with ``compress = true`` (permessage-deflate), against ``compress = false``.

Without compression connic writes frames, pings and pongs straight to the asyncio
transport; with it aiohttp frames each message itself and the connection has no raw
transport (``Writer.transport`` is None). Every test here runs both ways, with a raw
client (tests/reliability/rawws.py) that offers permessage-deflate when compression is
on, and checks the server's first text frame came compressed (RSV1), so the offer was
taken. Client frames go uncompressed (allowed under permessage-deflate) unless a test
needs them compressed.

Pings, pongs and the aborts of a dropped or slow client go to the connection's own transport
either way (``Writer.io``); a client with compression on once got no ping, no pong, and was never
dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import string
import time
import zlib
from pathlib import Path
from typing import Any

import pytest
from deflate_client import RSV1, TAIL, Peer, connect, open_client, port_of, reset_clients
from reliability.conftest import report, scrape
from reliability.rawws import CLOSE, PING, PONG, TEXT, Closed, close_frame, frame, text

from conftest import SECRET, StartServer, make_config

PLAIN = pytest.param(False, id="plain")
DEFLATE = pytest.param(True, id="deflate")


__all__ = ["reset_clients"]  # the fixture, autouse: every test here resets the clients it left open

# --- (1) the heartbeat ----------------------------------------------------------------------

HEARTBEAT = 1.0


@pytest.mark.parametrize("compress", [PLAIN, DEFLATE])
async def test_quiet_client_gets_a_heartbeat_ping(start_server: StartServer, compress: bool) -> None:
    server = await start_server(make_config({"heartbeat": HEARTBEAT, "compress": compress}))
    peer, _ = await connect(port_of(server), compress)
    started = time.monotonic()
    got = await peer.ws.read_frame(timeout=HEARTBEAT + 1.0)  # TimeoutError: no ping
    assert got.opcode == PING, got
    assert HEARTBEAT * 0.8 <= time.monotonic() - started <= HEARTBEAT + 1.0


@pytest.mark.parametrize("compress", [PLAIN, DEFLATE])
async def test_client_that_never_answers_pings_is_dropped(start_server: StartServer, compress: bool) -> None:
    server = await start_server(make_config({"heartbeat": HEARTBEAT, "compress": compress}))
    peer, _ = await connect(port_of(server), compress)
    started = time.monotonic()
    with pytest.raises(Closed):  # never a close frame: EOF or reset
        while True:
            got = await peer.ws.read_frame(timeout=3 * HEARTBEAT)  # TimeoutError: never dropped
            assert got.opcode == PING, got  # never answered
    elapsed = time.monotonic() - started
    report(f"compress={compress}: silent client dropped after", f"{elapsed:.2f} s")
    assert 1.2 * HEARTBEAT <= elapsed <= 2.0 * HEARTBEAT, elapsed
    metrics = await scrape(f"http://127.0.0.1:{port_of(server)}")
    assert metrics['connic_closes_total{code="1006",connector="/ws"}'] == 1
    assert metrics['connic_connections_open{connector="/ws"}'] == 0


@pytest.mark.parametrize("compress", [PLAIN, DEFLATE])
async def test_silent_client_dropped_even_when_it_takes_pings(start_server: StartServer, compress: bool) -> None:
    """The drop alone, whatever becomes of the ping: a client that says nothing at all is gone by 2 intervals.

    The connection is quiet from the server's side whether or not the ping was written, so the
    heartbeat's second beat drops it either way (``_pinged`` is set when the ping is attempted).
    """
    server = await start_server(make_config({"heartbeat": HEARTBEAT, "compress": compress}))
    peer, _ = await connect(port_of(server), compress)
    started = time.monotonic()
    with pytest.raises(Closed):
        while True:
            got = await peer.ws.read_frame(timeout=4 * HEARTBEAT - (time.monotonic() - started))
            assert got.opcode == PING, got
    assert time.monotonic() - started <= 2.0 * HEARTBEAT


@pytest.mark.parametrize("compress", [PLAIN, DEFLATE])
async def test_client_that_answers_pings_is_served_after_a_quiet_spell(
    start_server: StartServer, compress: bool
) -> None:
    server = await start_server(make_config({"heartbeat": HEARTBEAT, "compress": compress}))
    peer, _ = await connect(port_of(server), compress)
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(2.5 * HEARTBEAT):
            await peer.recv(timeout=10.0)  # quiet, but every ping answered
    await peer.ws.send_json({"id": "after", "message": "still here"})
    frames = await peer.until("stream_end", timeout=2.0)  # TimeoutError: the reply went nowhere
    assert (frames[0]["type"], frames[0]["id"]) == ("ack", "after"), frames
    assert frames[-1]["full_response"] == "still here"
    assert peer.pings >= 2


@pytest.mark.parametrize("compress", [PLAIN, DEFLATE])
async def test_json_ping_gets_json_pong(start_server: StartServer, compress: bool) -> None:
    """The protocol's own ping (a text frame) is queued like any frame: answered either way."""
    server = await start_server(make_config({"heartbeat": 0, "compress": compress}))
    peer, _ = await connect(port_of(server), compress)
    await peer.ws.send_json({"type": "ping"})
    assert await peer.recv(timeout=2.0) == {"type": "pong"}


# --- pongs to the client's pings ------------------------------------------------------------


@pytest.mark.parametrize("compress", [PLAIN, DEFLATE])
@pytest.mark.parametrize("authenticated", [True, False], ids=["after_auth", "before_auth"])
async def test_client_ping_gets_its_pong(start_server: StartServer, compress: bool, authenticated: bool) -> None:
    server = await start_server(make_config({"heartbeat": 0, "compress": compress}))
    if authenticated:
        peer, _ = await connect(port_of(server), compress)
        ws = peer.ws
    else:
        ws = await open_client(port_of(server), compress)
    await ws.send_raw(frame(PING, b"are you there"))
    got = await ws.read_frame(timeout=2.0)  # TimeoutError: no pong
    assert (got.opcode, got.payload) == (PONG, b"are you there")


# --- (2) a client that stops reading ---------------------------------------------------------

SEND_TIMEOUT = 1.0
_CLOSE_DEADLINE = 3.0  # ws_writer: what a slow consumer gets to take the close frame
# Random letters: deflate cannot shrink them much, so the reply fills the kernel's buffers either way.
_WORD_SIZE = 1000
_WORDS = 8192  # about 8 MiB of reply, over the loopback send and receive buffers


def _incompressible_words(count: int) -> str:
    rng = random.Random(7)
    letters = string.ascii_letters + string.digits
    return " ".join("".join(rng.choices(letters, k=_WORD_SIZE)) for _ in range(count))


async def _stop_reading_under_a_big_reply(start_server: StartServer, compress: bool) -> tuple[Peer, str]:
    """A client that stops reading, then asks for a reply of about 8 MiB: (the client, the server's base URL)."""
    message = _incompressible_words(_WORDS)
    options = {"compress": compress, "send_timeout": SEND_TIMEOUT, "send_queue": 16, "heartbeat": 0}
    server = await start_server(
        make_config({**options, "max_frame_bytes": 2 * len(message), "on_disconnect": "cancel"})
    )
    peer, _ = await connect(port_of(server), compress, rcvbuf=16 * 1024)
    peer.ws.pause_reading()
    await peer.ws.send_raw(text({"id": "big", "message": message}))
    return peer, f"http://127.0.0.1:{port_of(server)}"


@pytest.mark.parametrize("compress", [PLAIN, DEFLATE])
async def test_client_that_stops_reading_is_closed_slow_consumer(start_server: StartServer, compress: bool) -> None:
    peer, base = await _stop_reading_under_a_big_reply(start_server, compress)
    sent = time.monotonic()
    slow = 'connic_slow_consumer_closes_total{connector="/ws"}'
    released = None
    deadline = sent + SEND_TIMEOUT + _CLOSE_DEADLINE + 5.0
    while time.monotonic() < deadline:
        metrics = await scrape(base)
        if metrics.get(slow, 0) >= 1 and metrics['connic_connections_open{connector="/ws"}'] == 0:
            released = time.monotonic() - sent
            break
        await asyncio.sleep(0.1)
    metrics = await scrape(base)
    assert metrics.get(slow, 0) == 1, "never counted as a slow consumer"
    assert released is not None, "counted as a slow consumer, but the connection was never released"
    report(f"compress={compress}: slow consumer released after", f"{released:.2f} s")
    assert released <= SEND_TIMEOUT + _CLOSE_DEADLINE + 2.0, released
    assert metrics['connic_closes_total{code="4010",connector="/ws"}'] == 1
    peer.ws.resume_reading()
    code, _ = await peer.closed(timeout=5.0)
    assert code in (4010, None)


@pytest.mark.parametrize("compress", [PLAIN, DEFLATE])
async def test_slow_consumer_socket_is_not_kept(start_server: StartServer, compress: bool) -> None:
    """Past the close deadline the server lets go of a client that still does not read, and of what it buffered.

    Read only once the deadline is over, the connection has ended without a close frame; had the
    server kept the socket, the client would get everything buffered for it, then the 4010 frame.
    """
    peer, base = await _stop_reading_under_a_big_reply(start_server, compress)
    slow = 'connic_slow_consumer_closes_total{connector="/ws"}'
    for _ in range(100):
        if (await scrape(base)).get(slow, 0) >= 1:
            break
        await asyncio.sleep(0.1)
    await asyncio.sleep(_CLOSE_DEADLINE + 1.0)
    peer.ws.resume_reading()
    code, frames = await peer.closed(timeout=10.0)
    report(
        f"compress={compress}: slow consumer reading after the deadline",
        f"close {code}, {len(frames)} frames, {peer.ws.received} bytes",
    )
    assert code is None, (
        f"the socket was kept: {peer.ws.received} bytes, then close {code}"
    )  # the close frame, if it made it out before the abort


# --- (3) SIGTERM drain -------------------------------------------------------------------------


def _shutdown_toml(tmp_path: Path, compress: bool, grace: float) -> Path:
    path = tmp_path / "compress.toml"
    path.write_text(
        f"[server]\nshutdown_grace = {grace}\n\n"
        '[agents.echo]\nuse = "echo"\ndelay = 0.05\n\n'
        f'[[connectors]]\nsecrets = ["s"]\ncompress = {str(compress).lower()}\nheartbeat = 0\n'
        f"send_timeout = {SEND_TIMEOUT}\nmax_frame_bytes = {4 * 2**20}\n",
        encoding="utf-8",
    )
    return path


THIRTY = " ".join(f"word{i}" for i in range(30))


@pytest.mark.parametrize("compress", [PLAIN, DEFLATE])
async def test_sigterm_finishes_the_reply_then_closes_1001(tmp_path: Path, cli: Any, compress: bool) -> None:
    grace = 5.0
    server = cli("--config", str(_shutdown_toml(tmp_path, compress, grace)))
    peer, _ = await connect(server.port, compress, auth={"secret": "s"})
    await peer.ws.send_json({"id": "m1", "message": THIRTY})
    before = await peer.until("stream_chunk")
    signalled = time.monotonic()
    server.proc.send_signal(15)
    code, after = await peer.closed(timeout=grace + 5.0)
    took = time.monotonic() - signalled
    report(f"compress={compress}: SIGTERM to close {code}", f"{took:.2f} s")
    frames = before + after
    chunks = [f["chunk"] for f in frames if f.get("type") == "stream_chunk"]
    assert "".join(chunks) == THIRTY
    assert [f["code"] for f in frames if f["type"] == "error"] == ["server_shutting_down"]
    assert code == 1001
    assert took <= grace, took
    server.proc.communicate(timeout=20)
    assert server.proc.returncode == 0


@pytest.mark.parametrize("compress", [PLAIN, DEFLATE])
async def test_sigterm_with_a_client_that_stopped_reading_exits(tmp_path: Path, cli: Any, compress: bool) -> None:
    """A client that stopped reading mid-reply holds shutdown for grace + send_timeout + the close deadline at most."""
    grace = 1.0
    server = cli("--config", str(_shutdown_toml(tmp_path, compress, grace)))
    peer, _ = await connect(server.port, compress, auth={"secret": "s"}, rcvbuf=16 * 1024)
    peer.ws.pause_reading()
    await peer.ws.send_json({"id": "big", "message": _incompressible_words(2048)})
    await asyncio.sleep(1.0)  # the reply backs up into the kernel's buffers
    signalled = time.monotonic()
    server.proc.send_signal(15)
    try:
        await asyncio.to_thread(server.proc.communicate, timeout=grace + SEND_TIMEOUT + _CLOSE_DEADLINE + 10.0)
    except Exception:
        server.proc.kill()
        raise
    took = time.monotonic() - signalled
    report(f"compress={compress}: SIGTERM to exit, a client not reading", f"{took:.2f} s")
    assert server.proc.returncode == 0
    assert took <= grace + SEND_TIMEOUT + _CLOSE_DEADLINE + 2.0, took


# --- (4) frames over the size bounds -----------------------------------------------------------

MAX_FRAME = 4096
MAX_AUTH_FRAME = 512


def _compressed_text(data: bytes) -> bytes:
    """A masked text frame of ``data`` deflated (RSV1), as a permessage-deflate client sends it."""
    deflater = zlib.compressobj(wbits=-15)
    payload = deflater.compress(data) + deflater.flush(zlib.Z_SYNC_FLUSH)
    assert payload.endswith(TAIL)
    return frame(TEXT, payload[: -len(TAIL)], rsv=RSV1)


async def _refused_too_large(peer: Peer, base: str, answer: int) -> None:
    """The server says message_too_large, closes 1009 (the client answers ``answer``) and counts a 1009."""
    got = await peer.ws.read_frame()
    assert got.opcode == TEXT, got
    error = peer.decode(got)
    assert (error["type"], error["code"]) == ("error", "message_too_large"), error
    got = await peer.ws.read_frame()
    assert (got.opcode, got.close_code) == (CLOSE, 1009), got
    with contextlib.suppress(ConnectionError):
        await peer.ws.send_raw(close_frame(answer))
    for _ in range(100):
        metrics = await scrape(base)
        if metrics['connic_connections_open{connector="/ws"}'] == 0:
            break
        await asyncio.sleep(0.05)
    counted = {k: v for k, v in metrics.items() if k.startswith("connic_closes_total")}
    assert counted == {'connic_closes_total{code="1009",connector="/ws"}': 1.0}, counted


def _size_config(compress: bool) -> dict[str, Any]:
    return make_config(
        {"compress": compress, "heartbeat": 0, "max_frame_bytes": MAX_FRAME, "max_auth_frame_bytes": MAX_AUTH_FRAME}
    )


@pytest.mark.parametrize("compress", [PLAIN, DEFLATE])
async def test_frame_over_max_frame_bytes_is_refused(start_server: StartServer, compress: bool) -> None:
    server = await start_server(_size_config(compress))
    peer, _ = await connect(port_of(server), compress)
    await peer.ws.send_raw(text({"message": "x" * MAX_FRAME}))
    await _refused_too_large(peer, f"http://127.0.0.1:{port_of(server)}", 1009)


async def test_compressed_frame_inflating_over_max_frame_bytes_is_refused(start_server: StartServer) -> None:
    """A few hundred bytes on the wire that inflate past the bound: the bound is on the inflated message."""
    server = await start_server(_size_config(True))
    peer, _ = await connect(port_of(server), True)
    bomb = _compressed_text(json.dumps({"message": "x" * (64 * MAX_FRAME)}).encode())
    assert len(bomb) < MAX_FRAME // 4
    await peer.ws.send_raw(bomb)
    await _refused_too_large(peer, f"http://127.0.0.1:{port_of(server)}", 1009)


@pytest.mark.parametrize("compressed", [False, True], ids=["plain_frame", "deflated_frame"])
async def test_frame_over_max_auth_frame_bytes_before_auth_is_refused(
    start_server: StartServer, compressed: bool
) -> None:
    server = await start_server(_size_config(True))
    ws = await open_client(port_of(server), True)
    data = json.dumps({"secret": SECRET, "pad": "x" * (8 * MAX_AUTH_FRAME)}).encode()
    await ws.send_raw(_compressed_text(data) if compressed else frame(TEXT, data))
    await _refused_too_large(Peer(ws, True), f"http://127.0.0.1:{port_of(server)}", 1009)


@pytest.mark.parametrize("compress", [PLAIN, DEFLATE])
async def test_refusal_counted_1009_whatever_the_client_answers(start_server: StartServer, compress: bool) -> None:
    server = await start_server(_size_config(compress))
    peer, _ = await connect(port_of(server), compress)
    await peer.ws.send_raw(text({"message": "x" * MAX_FRAME}))
    await _refused_too_large(peer, f"http://127.0.0.1:{port_of(server)}", 1000)


# --- (5) a drop mid-stream, then resume --------------------------------------------------------


@pytest.mark.parametrize("compress", [PLAIN, DEFLATE])
async def test_resume_after_a_mid_stream_drop_replays_the_rest(start_server: StartServer, compress: bool) -> None:
    words = [f"w{i}-" + "y" * 200 for i in range(40)]
    config = make_config({"compress": compress, "heartbeat": 0}, agents={"assistant": {"use": "echo", "delay": 0.02}})
    server = await start_server(config)
    peer, connected = await connect(port_of(server), compress)
    await peer.ws.send_json({"id": "m1", "message": " ".join(words)})
    before = await peer.until("stream_chunk")
    while len([f for f in before if f["type"] == "stream_chunk"]) < 5:
        before.append(await peer.recv())
    peer.ws.reset()
    await asyncio.sleep(0.3)  # the reply goes on meanwhile, into the replay log
    last_seq = before[-1]["seq"]
    resumed, hello = await connect(
        port_of(server),
        compress,
        auth={
            "type": "resume",
            "session_id": connected["session_id"],
            "resume_token": connected["resume_token"],
            "last_seq": last_seq,
            "secret": SECRET,
        },
    )
    assert hello["resumed"] is True, hello
    after = await resumed.until("stream_end")
    seqs = [f["seq"] for f in before + after]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), seqs
    chunks = "".join(f["chunk"] for f in before + after if f["type"] == "stream_chunk")
    assert chunks == " ".join(words)
    assert after[-1]["full_response"] == " ".join(words)
