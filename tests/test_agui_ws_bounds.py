"""``max_body_bytes`` on AG-UI's WebSocket binding (docs/agui.md): a frame up to it is run, one byte
more is refused with a ``RUN_ERROR`` ``message_too_large`` and close 1009, compressed or not.

With permessage-deflate (on by default) the size that counts is the frame's once inflated: a raw
client sends each frame deflated (RSV1), a few hundred bytes on the wire whatever the size.
"""

from __future__ import annotations

import json
import zlib
from typing import Any

import pytest
from deflate_client import RSV1, TAIL, Peer, reset_clients
from reliability.rawws import CLOSE, TEXT, frame, open_raw
from test_agui_abuse import scrape, wait_metric
from test_agui_support import AUTH, agui_config, agui_registry, run_input

from conftest import StartServer

__all__ = ["reset_clients"]  # the fixture, autouse: every test here resets the clients it left open

MAX_BODY = 8192


def body(size: int, thread: str) -> bytes:
    """A RunAgentInput of exactly ``size`` bytes (ASCII)."""
    empty = json.dumps(run_input(thread, "", run_id="r1")).encode()
    data = json.dumps(run_input(thread, "a" * (size - len(empty)), run_id="r1")).encode()
    assert len(data) == size
    return data


def deflated(data: bytes) -> bytes:
    """A masked text frame of ``data`` deflated (RSV1), as a permessage-deflate client sends it."""
    deflater = zlib.compressobj(wbits=-15)
    payload = deflater.compress(data) + deflater.flush(zlib.Z_SYNC_FLUSH)
    assert payload.endswith(TAIL)
    return frame(TEXT, payload[: -len(TAIL)], rsv=RSV1)


async def connect(port: int, compress: bool) -> Peer:
    headers = {**AUTH, "Sec-WebSocket-Extensions": "permessage-deflate"} if compress else AUTH
    ws = await open_raw(port, "/agui/ws", headers=headers)
    from deflate_client import _OPEN

    _OPEN.append(ws)
    return Peer(ws, compress)


async def outcome(peer: Peer) -> tuple[list[dict[str, Any]], int | None]:
    """The events until the run ends (None: it did) or the socket closes (its close code)."""
    events: list[dict[str, Any]] = []
    while True:
        try:
            got = await peer.ws.read_frame(timeout=10)
        except TimeoutError:
            raise AssertionError(f"neither the run's end nor a close came; events: {events}") from None
        if got.opcode == CLOSE:
            return events, got.close_code
        assert got.opcode == TEXT, got
        assert bool(got.rsv & RSV1) == peer.compress, got
        events.append(peer.decode(got))
        if events[-1]["type"] == "RUN_FINISHED":
            return events, None


SIZES = {"max-1": MAX_BODY - 1, "max": MAX_BODY, "max+1": MAX_BODY + 1, "far over": 64 * MAX_BODY}


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "deflate"])
@pytest.mark.parametrize("name", list(SIZES))
async def test_frames_up_to_max_body_bytes_run_and_bigger_ones_close_1009(
    start_server: StartServer, compress: bool, name: str
) -> None:
    server = await start_server(agui_config({"max_body_bytes": MAX_BODY}), registry=agui_registry())
    peer = await connect(int(server.server.port), compress)
    data = body(SIZES[name], f"t{SIZES[name]}")
    await peer.ws.send_raw(deflated(data) if compress else frame(TEXT, data))
    events, closed = await outcome(peer)
    if SIZES[name] <= MAX_BODY:
        assert closed is None and events[-1]["type"] == "RUN_FINISHED", (closed, events)
        return
    assert closed == 1009, (closed, events)
    # Counted as the code sent: aiohttp's own close_code says 1006 once its reader has failed.
    await wait_metric(server.http, 'connic_closes_total{code="1009",connector="/agui"}', 1, timeout=10)
    assert await scrape(server.http, 'connic_closes_total{code="1006",connector="/agui"}') == 0
    assert await scrape(server.http, 'connic_errors_total{code="message_too_large",connector="/agui"}') == 1
    # Told why, as for any frame connic cannot run: a RUN_ERROR naming the bound.
    assert [(e["type"], e.get("code")) for e in events] == [("RUN_ERROR", "message_too_large")], events
    assert "max_body_bytes" in events[0]["message"]


@pytest.mark.parametrize(
    ("data", "code"),
    [(frame(TEXT, b'{"threadId": "\xff"}'), 1007), (frame(TEXT, b"{}", rsv=2), 1002)],
    ids=["1007-invalid-utf8", "1002-protocol-error"],
)
async def test_a_broken_frame_closes_with_its_code_counted_as_sent(
    start_server: StartServer, data: bytes, code: int
) -> None:
    server = await start_server(agui_config(), registry=agui_registry())
    peer = await connect(int(server.server.port), False)
    await peer.ws.send_raw(data)
    events, closed = await outcome(peer)
    assert (events, closed) == ([], code)
    await wait_metric(server.http, f'connic_closes_total{{code="{code}",connector="/agui"}}', 1, timeout=10)
    assert await scrape(server.http, 'connic_closes_total{code="1006",connector="/agui"}') == 0
