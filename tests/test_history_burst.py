"""A burst of ``{"type": "history"}`` frames from a client that does not read them.

Each 18-byte request was answered with the session's history encoded anew: with a history near
``max_history_bytes`` (4 MB), 300 requests queued 0.9 GB in the server and held its event loop
for over a second. The frames a burst gets are the same, and the server's memory barely moves.
A ``python -m connic run`` subprocess, so that its memory is its own; a raw client.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from reliability.rawws import CLOSE, PING, PONG, TEXT, Closed, Frame, RawWS, frame, open_raw, text

BURST = 300


def rss_mib(pid: int) -> int:
    """The resident memory of process ``pid``, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) // 1024
    raise AssertionError("no VmRSS")


def described(got: Frame) -> str:
    """What a frame that is not a history frame was, for a failure message."""
    if got.opcode == CLOSE:
        return f"a close frame, code {got.close_code}, reason {got.payload[2:]!r}"
    return f"opcode {got.opcode}, {len(got.payload)} bytes: {got.payload[:80]!r}"


async def next_history(ws: RawWS, number: int) -> Frame:
    """The burst's ``number``-th reply; the heartbeat's pings (30 s) are answered on the way, since
    reading the burst's 1 GB through a small window can take longer than that on a busy machine."""
    while True:
        try:
            got = await ws.read_frame(timeout=60)
        except Closed as exc:
            raise AssertionError(f"reply {number} of {BURST}: the server ended the connection ({exc})") from None
        if got.opcode != PING:
            assert got.opcode == TEXT, f"reply {number} of {BURST}: {described(got)}"
            return got
        await ws.send_raw(frame(PONG, got.payload))


async def test_a_burst_of_history_requests_does_not_multiply_the_history_in_memory(cli: Any) -> None:
    server = cli("--secret", "s")
    # The kernel's default receive buffer: the burst's 1 GB dwarfs it all the same, and through a
    # 4 KB window reading it took over 2 minutes on a busy machine.
    ws = await open_raw(server.port, "/ws")
    try:
        await ws.send_json({"type": "auth", "secret": "s"})
        await ws.until("connected")
        for number in range(4):  # the echo agent's replies too: a history of about 3.6 MB
            await ws.send_json({"id": number, "message": "x" * 900_000})
            await ws.until("stream_end", timeout=30)
        await ws.send_json({"type": "history"})
        first = await ws.read_frame(timeout=30)
        assert first.json()["type"] == "history" and len(first.payload) > 3_000_000
        ws.pause_reading()
        base = rss_mib(server.proc.pid)
        for _ in range(BURST):
            await ws.send_raw(text({"type": "history"}))
        ws.resume_reading()
        peak = base
        for number in range(1, BURST + 1):
            got = await next_history(ws, number)
            peak = max(peak, rss_mib(server.proc.pid))
            assert got.payload == first.payload, f"reply {number} of {BURST} differs: {described(got)}"
        # One encoded copy of the history is 3.4 MiB; the burst used to queue ~900 MiB.
        assert peak - base < 250, (base, peak)
    finally:
        await ws.aclose()
