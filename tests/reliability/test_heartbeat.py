"""Heartbeat: a client that stops answering pings is dropped; one behind the app-level ping stays.

The server sends a ping ``heartbeat`` seconds after the last frame it received and drops the
connection when nothing comes back within half of that, so a silent client goes after about
1.5 intervals. It closes the TCP connection without a close frame (the client sees 1006).
Pings the client sends get their pongs, before authentication too. All of it holds with
permessage-deflate on (``compress``), where aiohttp frames the messages and connic still
writes the pings and pongs (control frames are never compressed); tests/test_compress_paths.py
covers each path with compression on and off from a raw client, this file with aiohttp's.
"""

from __future__ import annotations

import asyncio
import json
import os
import time

import aiohttp
import websockets
from aiohttp import WSMsgType

from conftest import SECRET, StartServer, make_config

from .conftest import connic_tasks, eventually, report, runtime, scrape
from .rawws import PING, PONG, TEXT, Closed, RawWS, frame, open_raw

HEARTBEAT = 1.0
BOUND = 2 * HEARTBEAT  # the test's pass criterion: closed within two intervals


async def _dropped_after(ws: RawWS) -> tuple[float, int]:
    """Read (never pong) until the server drops us: (seconds since our last byte, pings seen)."""
    started = time.monotonic()
    pings = 0
    while True:
        try:
            got = await ws.read_frame(timeout=BOUND + 3)
        except Closed:
            return time.monotonic() - started, pings
        pings += got.opcode == PING
        assert got.opcode in (PING, TEXT), got


async def test_client_that_stops_answering_pings_is_closed(start_server: StartServer) -> None:
    server = await start_server(make_config({"heartbeat": HEARTBEAT}))
    port = int(server.server.port)
    results = {}

    async def authenticated() -> float:
        ws = await open_raw(port)
        await ws.send_json({"secret": SECRET})
        elapsed, pings = await _dropped_after(ws)
        assert pings >= 1
        return elapsed

    async def mid_frame() -> float:
        # Stuck in the middle of a frame: the header promises 100 bytes, 10 come.
        ws = await open_raw(port)
        await ws.send_json({"secret": SECRET})
        assert (await ws.recv())["type"] == "connected"
        await ws.send_raw(frame(TEXT, b"x" * 100)[:16])
        elapsed, _ = await _dropped_after(ws)
        return elapsed

    async def never_authenticated() -> float:
        ws = await open_raw(port)
        elapsed, _ = await _dropped_after(ws)
        return elapsed

    for name, case in [("after auth", authenticated), ("mid-frame", mid_frame), ("before auth", never_authenticated)]:
        results[name] = case()
    elapsed = dict(zip(results, await asyncio.gather(*results.values()), strict=True))
    report(
        "heartbeat: silent client dropped after",
        ", ".join(f"{name} {seconds:.2f} s" for name, seconds in elapsed.items()) + f" (heartbeat {HEARTBEAT} s)",
    )
    for name, seconds in elapsed.items():
        assert seconds < BOUND, (name, seconds)

    transport = runtime(server.server.app).transports[0]
    assert await eventually(lambda: not transport.connections and not connic_tasks())
    metrics = await scrape(server.http)
    assert metrics['connic_connections_open{connector="/ws"}'] == 0
    assert metrics['connic_closes_total{code="1006",connector="/ws"}'] == 3


async def test_app_level_ping_keeps_the_session(start_server: StartServer) -> None:
    """Two clients that answer protocol pings (the websockets library does) stay past several intervals:
    one sends only ``{"type": "ping"}`` (less often than the heartbeat), one sends nothing at all."""
    server = await start_server(make_config({"heartbeat": HEARTBEAT}))
    intervals = 4
    metrics = runtime(server.server.app).metrics

    async def client(app_pings: bool) -> tuple[int, str]:
        async with websockets.connect(server.url(), ping_interval=None, open_timeout=5) as ws:
            await ws.send(json.dumps({"secret": SECRET}))
            connected = json.loads(await ws.recv())
            pongs = 0
            started = time.monotonic()
            while time.monotonic() - started < intervals * HEARTBEAT:
                if app_pings:
                    await ws.send('{"type": "ping"}')
                    assert json.loads(await asyncio.wait_for(ws.recv(), 5)) == {"type": "pong"}
                    pongs += 1
                await asyncio.sleep(1.5 * HEARTBEAT if app_pings else HEARTBEAT)
            # Same session: its first message is number 1, and the connection never closed.
            await ws.send(json.dumps({"id": "after", "message": "still here"}))
            ack = json.loads(await asyncio.wait_for(ws.recv(), 5))
            assert ack == {"type": "ack", "id": "after", "message_number": 1, "seq": 1}
            assert ws.close_code is None
            await checked.wait()
            return pongs, connected["session_id"]

    checked = asyncio.Event()
    clients = asyncio.gather(client(True), client(False))
    try:
        assert await eventually(lambda: metrics.messages.get("/ws") == 2, timeout=intervals * HEARTBEAT * 2 + 5)
        # Both sessions still open, nothing closed.
        assert metrics.sessions_open.get("/ws") == 2
        assert not metrics.closes.values
    finally:
        checked.set()
    (pongs, _), (_, _) = await clients
    assert pongs >= 2


async def test_pings_get_pongs_with_their_payload(start_server: StartServer) -> None:
    """Before and after authentication, while an agent streams and while idle: every ping gets its pong."""
    agents = {"e": {"use": "echo", "delay": 0.05}}
    server = await start_server(make_config({"heartbeat": 30}, agents))
    ws = await open_raw(int(server.server.port))
    await ws.send_raw(frame(PING, b"before auth"))
    got = await ws.read_frame()
    assert (got.opcode, got.payload) == (PONG, b"before auth")
    await ws.send_json({"secret": SECRET})
    assert (await ws.recv())["type"] == "connected"
    await ws.send_json({"id": "m", "message": "one two three four"})
    await ws.send_raw(frame(PING, b"mid-reply"))
    await ws.send_raw(frame(PING, b""))
    seen: list[bytes | str] = []
    while "stream_end" not in seen:
        got = await ws.read_frame()
        seen.append(got.payload if got.opcode == PONG else got.json()["type"])
    assert [s for s in seen if isinstance(s, bytes)] == [b"mid-reply", b""]
    assert seen.index(b"") < seen.index("stream_end")  # the pongs did not wait for the reply to end
    await ws.send_raw(frame(PING, b"x" * 125))  # the largest control payload
    got = await ws.read_frame()
    assert (got.opcode, got.payload) == (PONG, b"x" * 125)
    await ws.aclose()


async def test_client_behind_on_a_backlog_gets_the_ping_and_stays(start_server: StartServer) -> None:
    """A client behind on reading a backlog, sending nothing meanwhile, gets the heartbeat's ping
    behind the backlog, answers it, and keeps its connection.

    The ping used to be skipped while the transport's buffer was above its high-water mark, yet
    counted as sent: a client behind on a large download was dropped (1006, "no pong") though no
    ping had reached it.
    """
    heartbeat = 4.0  # half of it must cover reading what the kernel buffers ahead of the ping (4 MiB)
    server = await start_server(make_config({"heartbeat": heartbeat}))
    ws = await open_raw(int(server.server.port), rcvbuf=4096)
    await ws.send_json({"secret": SECRET})
    assert (await ws.recv())["type"] == "connected"
    await ws.send_json({"id": "big", "message": "x" * 200_000})  # echoed: a history of about 400 KB
    await ws.until("stream_end")
    requests = 40  # 16 MB: far more than the kernel's buffers, so the server's own stays full
    ws.pause_reading()
    for _ in range(requests):
        await ws.send_json({"type": "history"})
    quiet_since = time.monotonic()
    await asyncio.sleep(heartbeat + 0.2)  # the beat finds the client behind; the ping is due
    ws.resume_reading()
    started = time.monotonic()
    histories = pings = 0
    while histories < requests:
        got = await ws.read_frame(timeout=heartbeat)
        if got.opcode == PING:
            pings += 1
            await ws.send_raw(frame(PONG, got.payload))
        else:
            assert got.opcode == TEXT and got.json()["type"] == "history", got
            histories += 1
    report(
        "heartbeat: client behind on a backlog",
        f"{requests} history frames read in {time.monotonic() - started:.2f} s after {heartbeat + 0.2} s "
        f"without reading, {pings} pings (heartbeat {heartbeat} s)",
    )
    assert pings >= 1
    # Past the deadline of a ping that went unanswered, the connection is still there.
    await asyncio.sleep(max(0.0, quiet_since + 1.5 * heartbeat + 0.5 - time.monotonic()))
    await ws.send_json({"id": "after", "message": "still here"})
    assert (await ws.recv())["type"] == "ack"
    assert not runtime(server.server.app).metrics.closes.values
    await ws.aclose()


# --- with permessage-deflate --------------------------------------------------------------


async def _compressed(session: aiohttp.ClientSession, url: str) -> aiohttp.ClientWebSocketResponse:
    """An authenticated client that negotiated permessage-deflate and answers no ping by itself."""
    ws = await session.ws_connect(url, compress=15, autoping=False)
    assert ws.compress == 15, "permessage-deflate was not negotiated"
    await ws.send_json({"secret": SECRET})
    assert (await ws.receive_json(timeout=5))["type"] == "connected"
    return ws


async def test_compressed_idle_client_gets_pings_and_stays(start_server: StartServer) -> None:
    """An idle client with compression on gets the heartbeat's pings, answers them, and keeps its
    connection well past the 1.5 intervals after which a silent one is dropped.

    With compression on, the pings used to go nowhere (connic writes them itself, and had no
    transport to write them to there) yet counted as sent: every idle browser tab was dropped.
    """
    server = await start_server(make_config({"heartbeat": HEARTBEAT, "compress": True}))
    intervals = 4
    async with aiohttp.ClientSession() as session:
        ws = await _compressed(session, server.url())
        pings = 0
        deadline = time.monotonic() + intervals * HEARTBEAT
        while (left := deadline - time.monotonic()) > 0:
            try:
                msg = await ws.receive(timeout=left)
            except TimeoutError:
                break
            assert msg.type is WSMsgType.PING, msg
            pings += 1
            await ws.pong(msg.data)
        report(
            "heartbeat: idle compressed client",
            f"{pings} pings in {intervals * HEARTBEAT:g} s (heartbeat {HEARTBEAT} s)",
        )
        assert pings >= intervals - 1
        await ws.send_json({"id": "after", "message": "still here"})
        while (msg := await ws.receive(timeout=5)).type is WSMsgType.PING:
            await ws.pong(msg.data)  # a ping due as the loop ended
        assert msg.type is WSMsgType.TEXT, msg
        assert json.loads(msg.data) == {"type": "ack", "id": "after", "message_number": 1, "seq": 1}
        assert not runtime(server.server.app).metrics.closes.values
        await ws.close()


async def test_compressed_pings_get_pongs(start_server: StartServer) -> None:
    """With compression on, every ping gets its pong: before and after authentication, while idle
    and between the compressed frames of a reply (aiohttp's reader refuses a compressed pong)."""
    agents = {"e": {"use": "echo", "delay": 0.05}}
    server = await start_server(make_config({"heartbeat": 30, "compress": True}, agents))
    async with aiohttp.ClientSession() as session:
        ws = await session.ws_connect(server.url(), compress=15, autoping=False)
        assert ws.compress == 15, "permessage-deflate was not negotiated"
        await ws.ping(b"before auth")
        msg = await ws.receive(timeout=5)
        assert (msg.type, msg.data) == (WSMsgType.PONG, b"before auth")
        await ws.send_json({"secret": SECRET})
        assert (await ws.receive_json(timeout=5))["type"] == "connected"
        await ws.send_json({"id": "m", "message": "one two three four"})
        await ws.ping(b"mid-reply")
        seen: list[bytes | str] = []
        while "stream_end" not in seen:
            msg = await ws.receive(timeout=5)
            assert msg.type in (WSMsgType.PONG, WSMsgType.TEXT), msg
            seen.append(msg.data if msg.type is WSMsgType.PONG else json.loads(msg.data)["type"])
        assert b"mid-reply" in seen and seen.index(b"mid-reply") < seen.index("stream_end")
        await ws.ping(b"x" * 125)  # the largest control payload
        msg = await ws.receive(timeout=5)
        assert (msg.type, msg.data) == (WSMsgType.PONG, b"x" * 125)
        # History frames of some 100 KB, which aiohttp compresses off the event loop, with pings
        # among them: each pong must land between two frames, not inside one.
        big = os.urandom(25_000).hex()
        await ws.send_json({"id": "big", "message": big})
        while json.loads((await ws.receive(timeout=5)).data)["type"] != "stream_end":
            pass
        for n in range(5):
            await ws.send_json({"type": "history"})
            await ws.ping(b"%d" % n)
        pongs: list[bytes] = []
        histories = 0
        while histories < 5 or len(pongs) < 5:
            msg = await ws.receive(timeout=5)
            if msg.type is WSMsgType.PONG:
                pongs.append(msg.data)
            else:
                assert msg.type is WSMsgType.TEXT, msg
                assert [entry["text"] for entry in json.loads(msg.data)["entries"]][2:] == [big, big]
                histories += 1
        assert pongs == [b"0", b"1", b"2", b"3", b"4"]
        await ws.close()
