"""A raw WebSocket client that can offer permessage-deflate and read the server's compressed messages.

Built on tests/reliability/rawws.py: every byte stays under the test's control (it can stop
reading, leave pings unanswered), and the server's RSV1 messages are inflated with one inflater
per connection (context takeover, RFC 7692). Clients are reset at the end of each test that
uses :func:`reset_clients`, before its server stops.
"""

from __future__ import annotations

import contextlib
import json
import time
import zlib
from typing import Any

import pytest
from reliability.rawws import CLOSE, PING, PONG, TEXT, Closed, Frame, RawWS, close_frame, frame, open_raw

from conftest import SECRET, StartServer

__all__ = ["RSV1", "TAIL", "Peer", "connect", "open_client", "port_of", "reset_clients"]

RSV1 = 4
TAIL = b"\x00\x00\xff\xff"  # what a deflate sender strips from the end of each message (RFC 7692)


class Peer:
    """A raw client that inflates the server's compressed messages (context takeover: one inflater)."""

    def __init__(self, ws: RawWS, compress: bool) -> None:
        self.ws = ws
        self.compress = compress
        self._inflater = zlib.decompressobj(-15)
        self.pings = 0

    def decode(self, got: Frame) -> dict[str, Any]:
        """A text frame's JSON, inflated if it came compressed (RSV1)."""
        payload = got.payload
        if got.rsv & RSV1:
            payload = self._inflater.decompress(payload + TAIL)
        value: dict[str, Any] = json.loads(payload)
        return value

    async def recv(self, timeout: float = 5.0) -> dict[str, Any]:
        """The next JSON frame; pings are answered."""
        while True:
            got = await self.ws.read_frame(timeout)
            if got.opcode == PING:
                self.pings += 1
                await self.ws.send_raw(frame(PONG, got.payload))
                continue
            assert got.opcode == TEXT, got
            return self.decode(got)

    async def until(self, kind: str, timeout: float = 5.0) -> list[dict[str, Any]]:
        """JSON frames up to and including the first of type ``kind``."""
        frames = []
        while True:
            frames.append(await self.recv(timeout))
            if frames[-1].get("type") == kind:
                return frames

    async def closed(self, timeout: float) -> tuple[int | None, list[dict[str, Any]]]:
        """Read to the end: (the close frame's code, or None on EOF/reset; JSON frames before it)."""
        frames: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout
        while True:
            try:
                got = await self.ws.read_frame(max(deadline - time.monotonic(), 0.001))
            except Closed:
                return None, frames
            if got.opcode == TEXT:
                frames.append(self.decode(got))
            elif got.opcode == PING:
                await self.ws.send_raw(frame(PONG, got.payload))
            elif got.opcode == CLOSE:
                with contextlib.suppress(ConnectionError, RuntimeError):
                    await self.ws.send_raw(close_frame(got.close_code))
                return got.close_code, frames


_OPEN: list[RawWS] = []


@pytest.fixture(autouse=True)
def reset_clients(start_server: StartServer) -> Any:
    """Reset every raw client a test left open (before its server stops: one it never closed would hold it 60 s)."""
    yield
    while _OPEN:
        with contextlib.suppress(OSError, AttributeError):
            _OPEN.pop().reset()


async def open_client(port: int, compress: bool, path: str = "/ws", rcvbuf: int | None = None) -> RawWS:
    """A raw connection, offering permessage-deflate if ``compress``."""
    headers = {"Sec-WebSocket-Extensions": "permessage-deflate"} if compress else None
    ws = await open_raw(port, path, headers=headers, rcvbuf=rcvbuf)
    _OPEN.append(ws)
    return ws


async def connect(
    port: int, compress: bool, *, path: str = "/ws", auth: dict[str, Any] | None = None, rcvbuf: int | None = None
) -> tuple[Peer, dict[str, Any]]:
    """Open a raw connection (offering permessage-deflate if ``compress``), authenticate, read ``connected``."""
    ws = await open_client(port, compress, path, rcvbuf)
    peer = Peer(ws, compress)
    await ws.send_json(auth if auth is not None else {"secret": SECRET})
    got = await ws.read_frame()
    assert got.opcode == TEXT, got
    assert bool(got.rsv & RSV1) == compress, "permessage-deflate was not negotiated as asked"
    connected = peer.decode(got)
    assert connected["type"] == "connected", connected
    return peer, connected


def port_of(server: Any) -> int:
    return int(server.server.port)
