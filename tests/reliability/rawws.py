"""A small raw WebSocket client for the reliability tests: every byte under the test's control.

The handshake is written by hand over an asyncio socket; frames are built by
:func:`frame` with whatever masking, reserved bits, fragmentation and declared
length a test wants, valid or not. Server frames are read one by one, so a test
sees exactly what connic sent (including close frames and their codes) and can
tell a close frame from a bare TCP close (EOF) or a reset.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import socket
import struct
from typing import Any

__all__ = [
    "BINARY",
    "CLOSE",
    "CONTINUATION",
    "PING",
    "PONG",
    "TEXT",
    "Closed",
    "Frame",
    "HandshakeRefused",
    "RawWS",
    "close_frame",
    "frame",
    "open_raw",
    "text",
]

CONTINUATION, TEXT, BINARY, CLOSE, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def frame(
    opcode: int,
    payload: bytes = b"",
    *,
    fin: bool = True,
    mask: bool = True,
    rsv: int = 0,
    length: int | None = None,
    key: bytes | None = None,
) -> bytes:
    """One RFC 6455 frame as a client would send it (masked), or broken as asked.

    ``rsv`` is the three reserved bits (0-7, RSV1 is 4); ``length`` declares a
    payload length other than the real one (for oversized-header tests).
    """
    declared = len(payload) if length is None else length
    head = bytes([(0x80 if fin else 0) | (rsv & 7) << 4 | (opcode & 0xF)])
    bit = 0x80 if mask else 0
    if declared < 126:
        head += bytes([bit | declared])
    elif declared < 65536:
        head += bytes([bit | 126]) + struct.pack("!H", declared)
    else:
        head += bytes([bit | 127]) + struct.pack("!Q", declared)
    if not mask:
        return head + payload
    key = key if key is not None else os.urandom(4)
    return head + key + _mask(key, payload)


def _mask(key: bytes, payload: bytes) -> bytes:
    if not payload:
        return b""
    # XOR with the key repeated over the payload, as one big integer operation.
    repeated = (key * (len(payload) // 4 + 1))[: len(payload)]
    size = len(payload)
    return (int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")).to_bytes(size, "big")


def text(data: str | dict[str, Any], **kwargs: Any) -> bytes:
    """A masked text frame of ``data`` (a dict is sent as JSON)."""
    body = data if isinstance(data, str) else json.dumps(data)
    return frame(TEXT, body.encode(), **kwargs)


def close_frame(code: int | None = 1000, reason: bytes = b"", **kwargs: Any) -> bytes:
    """A masked close frame (``code=None``: an empty one)."""
    payload = b"" if code is None else struct.pack("!H", code) + reason
    return frame(CLOSE, payload, **kwargs)


class HandshakeRefused(Exception):
    """The server answered the upgrade with something other than 101."""

    def __init__(self, status: int, head: str) -> None:
        super().__init__(f"handshake refused: HTTP {status}")
        self.status = status
        self.head = head


class Closed(Exception):
    """The TCP connection ended (EOF or reset) without a close frame."""

    def __init__(self, reset: bool) -> None:
        super().__init__("connection reset" if reset else "connection closed (EOF)")
        self.reset = reset


class Frame:
    """One frame from the server."""

    __slots__ = ("fin", "opcode", "payload", "rsv")

    def __init__(self, fin: bool, rsv: int, opcode: int, payload: bytes) -> None:
        self.fin = fin
        self.rsv = rsv
        self.opcode = opcode
        self.payload = payload

    @property
    def close_code(self) -> int | None:
        """The code of a close frame (None when it has no payload)."""
        return struct.unpack("!H", self.payload[:2])[0] if len(self.payload) >= 2 else None

    def json(self) -> dict[str, Any]:
        """The payload of a text frame, parsed."""
        value: dict[str, Any] = json.loads(self.payload)
        return value

    def __repr__(self) -> str:
        return f"Frame(opcode={self.opcode}, fin={self.fin}, payload={self.payload[:80]!r})"


class RawWS:
    """An open raw WebSocket connection (after a 101)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.received = 0  # payload bytes of server frames read so far

    # --- sending -----------------------------------------------------------------

    async def send_raw(self, data: bytes) -> None:
        """Write bytes as they are, and drain."""
        self.writer.write(data)
        await self.writer.drain()

    async def send_json(self, data: dict[str, Any]) -> None:
        """Send one well-formed masked text frame of JSON."""
        await self.send_raw(text(data))

    # --- reading -----------------------------------------------------------------

    async def read_frame(self, timeout: float = 5.0) -> Frame:
        """The next server frame; :class:`Closed` on EOF or reset, TimeoutError if none comes."""
        async with asyncio.timeout(timeout):
            try:
                head = await self.reader.readexactly(2)
                length = head[1] & 0x7F
                if length == 126:
                    length = struct.unpack("!H", await self.reader.readexactly(2))[0]
                elif length == 127:
                    length = struct.unpack("!Q", await self.reader.readexactly(8))[0]
                key = await self.reader.readexactly(4) if head[1] & 0x80 else None
                payload = await self.reader.readexactly(length) if length else b""
            except asyncio.IncompleteReadError:
                raise Closed(reset=False) from None
            except ConnectionResetError:
                raise Closed(reset=True) from None
        if key is not None:
            payload = _mask(key, payload)
        self.received += len(payload)
        return Frame(bool(head[0] & 0x80), head[0] >> 4 & 7, head[0] & 0xF, payload)

    async def recv(self, timeout: float = 5.0) -> dict[str, Any]:
        """The next JSON text frame; pings are answered, anything else non-text is an error."""
        while True:
            got = await self.read_frame(timeout)
            if got.opcode == PING:
                await self.send_raw(frame(PONG, got.payload))
                continue
            if got.opcode == TEXT:
                data = got.json()
                data.pop("seq", None)  # sequence numbers are checked by the resume tests
                return data
            raise AssertionError(f"expected a text frame, got {got!r}")

    async def until(self, kind: str, timeout: float = 5.0) -> list[dict[str, Any]]:
        """JSON frames up to and including the first of type ``kind``."""
        frames = []
        while True:
            got = await self.recv(timeout)
            frames.append(got)
            if got.get("type") == kind:
                return frames

    async def closed(self, timeout: float = 5.0) -> tuple[int | None, list[dict[str, Any]], bool]:
        """Read to the end: (close code or None, JSON frames before it, whether a close frame came).

        A close frame is answered as a well-behaved client would. Without one, the
        connection ended with EOF or a reset (code None, False).
        """
        frames: list[dict[str, Any]] = []
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            remaining = deadline - asyncio.get_running_loop().time()
            try:
                got = await self.read_frame(max(remaining, 0.001))
            except Closed:
                return None, frames, False
            if got.opcode == TEXT:
                frames.append(got.json())
            elif got.opcode == PING:
                await self._quietly(frame(PONG, got.payload))
            elif got.opcode == CLOSE:
                await self._quietly(close_frame(got.close_code))
                return got.close_code, frames, True

    async def _quietly(self, data: bytes) -> None:
        with contextlib.suppress(ConnectionError, RuntimeError):
            await self.send_raw(data)

    # --- ending ------------------------------------------------------------------

    def pause_reading(self) -> None:
        """Stop taking bytes from the kernel: the client 'never reads' from now on."""
        self.writer.transport.pause_reading()  # type: ignore[attr-defined]

    def resume_reading(self) -> None:
        """Take bytes from the kernel again."""
        self.writer.transport.resume_reading()  # type: ignore[attr-defined]

    def reset(self) -> None:
        """Vanish: close with SO_LINGER 0, so the kernel sends a TCP RST and no close frame."""
        sock = self.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()

    def shutdown_write(self) -> None:
        """Send FIN (no more bytes from us), keep reading."""
        if self.writer.can_write_eof():
            self.writer.write_eof()

    async def aclose(self) -> None:
        """Close the TCP connection (FIN), without a close frame."""
        self.writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self.writer.wait_closed()


async def connect_tcp(
    host: str, port: int, *, rcvbuf: int | None = None, source: str | None = None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A TCP connection, with a receive buffer set before connecting (so the window stays small)
    and, if asked, from another loopback address (``source="127.0.0.2"``)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if source is not None:
        sock.bind((source, 0))
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    try:
        await asyncio.get_running_loop().sock_connect(sock, (host, port))
    except BaseException:
        sock.close()
        raise
    return await asyncio.open_connection(sock=sock)


async def open_raw(
    port: int,
    path: str = "/ws",
    *,
    host: str = "127.0.0.1",
    headers: dict[str, str] | None = None,
    rcvbuf: int | None = None,
    source: str | None = None,
    timeout: float = 5.0,
) -> RawWS:
    """Connect and upgrade; :class:`HandshakeRefused` when the server answers other than 101."""
    async with asyncio.timeout(timeout):
        reader, writer = await connect_tcp(host, port, rcvbuf=rcvbuf, source=source)
        try:
            key = base64.b64encode(os.urandom(16)).decode()
            lines = [
                f"GET {path} HTTP/1.1",
                f"Host: {host}:{port}",
                "Upgrade: websocket",
                "Connection: Upgrade",
                f"Sec-WebSocket-Key: {key}",
                "Sec-WebSocket-Version: 13",
                *(f"{name}: {value}" for name, value in (headers or {}).items()),
            ]
            writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
            status = int(head.split(" ", 2)[1])
            if status != 101:
                raise HandshakeRefused(status, head)
            accept = base64.b64encode(hashlib.sha1((key + GUID).encode()).digest()).decode()
            assert f"sec-websocket-accept: {accept.lower()}" in head.lower(), head
        except BaseException:
            writer.transport.abort()
            raise
    return RawWS(reader, writer)
