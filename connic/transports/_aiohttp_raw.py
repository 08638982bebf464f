"""Every use of aiohttp below its public WebSocket API, fenced in one module.

connic writes text frames straight to the asyncio transport in batches (one
system call for a burst of chunks, where ``send_str`` makes one per frame),
writes its own pings and pongs, waits on the protocol's flow control, and caps
the transport's read size. Each of these reaches under aiohttp's public API;
:func:`check` says at start-up whether this aiohttp still has what they need,
and tests/test_aiohttp_raw.py pins them. Verified on aiohttp 3.14.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import struct
from typing import Any

from aiohttp import WSCloseCode, WSMsgType, web

from connic.errors import MessageTooLarge
from connic.frames import ErrorFrame, encode

__all__ = [
    "HIGH_WATER",
    "Socket",
    "check",
    "limit_read_size",
    "raw_transport",
    "sendable",
    "text_frame",
    "text_header",
    "wait_writable",
    "write_control",
    "write_texts",
]

HIGH_WATER = 64 * 1024
"""Bytes buffered in the transport above which the client counts as behind (asyncio's own default)."""

_READ_SIZE = 64 * 1024
# asyncio's selector transport reads up to 256 KiB at a time into a new bytes object:
# above glibc's mmap threshold, so a process can settle into mapping and unmapping that
# buffer for every small frame (CPython issue 85451; docs/performance.md).

_FIN = 0x80


def check() -> None:
    """Fail at start-up, not per connection, if this aiohttp lacks what this module uses."""
    if not hasattr(web.BaseRequest, "protocol") or not hasattr(_protocol_class(), "_drain_helper"):
        raise RuntimeError("this aiohttp version is not supported by connic's WebSocket writer")


def _protocol_class() -> type:
    from aiohttp.base_protocol import BaseProtocol

    return BaseProtocol


def raw_transport(request: web.Request, compress: bool) -> asyncio.Transport | None:
    """The asyncio transport frames can be written to directly, or None (compression on)."""
    io = request.transport
    return io if isinstance(io, asyncio.Transport) and not compress else None


def limit_read_size(request: web.Request) -> None:
    """Read the socket at most 64 KiB at a time (see ``_READ_SIZE``)."""
    io: Any = request.transport
    if getattr(io, "max_size", 0) > _READ_SIZE:
        io.max_size = _READ_SIZE


async def wait_writable(request: web.Request) -> None:
    """Wait until the transport's buffer drains below its high-water mark (flow control)."""
    await request.protocol._drain_helper()


def write_texts(transport: asyncio.Transport, texts: list[str]) -> None:
    """Write text frames in one call."""
    batch: list[bytes] = []
    for text in texts:
        try:
            payload = text.encode()
        except UnicodeEncodeError:
            payload = sendable(text).encode()
        batch.append(text_header(len(payload)))
        batch.append(payload)
    transport.write(b"".join(batch))


def write_control(transport: asyncio.Transport | None, kind: WSMsgType, payload: bytes) -> None:
    """Write a ping or pong now: control frames may go between any two messages."""
    # A client that sends pings but does not read gets no pongs (nor unbounded buffers).
    if transport is not None and not transport.is_closing() and transport.get_write_buffer_size() <= HIGH_WATER:
        transport.write(bytes((_FIN | kind.value, len(payload))) + payload)


def sendable(text: str) -> str:
    """``text`` as valid UTF-8: lone surrogates (from ``"\\ud800"`` in a client's JSON) JSON-escaped."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(json.loads(text), separators=(",", ":"))
    return text


def text_frame(text: str) -> bytes:
    """One unmasked, unfragmented RFC 6455 text frame (a server never masks)."""
    payload = sendable(text).encode("utf-8")
    return text_header(len(payload)) + payload


def text_header(size: int) -> bytes:
    """The header of an unmasked, unfragmented text frame of ``size`` payload bytes."""
    if size < 126:
        return _SMALL_HEADERS[size]
    if size < 65536:
        return _HEADER16.pack(_FIN | WSMsgType.TEXT.value, 126, size)
    return _HEADER64.pack(_FIN | WSMsgType.TEXT.value, 127, size)


_HEADER16 = struct.Struct("!BBH")
_HEADER64 = struct.Struct("!BBQ")
_SMALL_HEADERS = tuple(bytes((_FIN | WSMsgType.TEXT.value, size)) for size in range(126))


class Socket(web.WebSocketResponse):
    """aiohttp's WebSocketResponse, telling the client why before closing with 1009.

    aiohttp closes by itself when a frame is over ``max_msg_size``; the protocol
    wants a ``message_too_large`` error frame first.
    """

    sent_code: int | None = None
    """The first close code sent (aiohttp later overwrites ``close_code`` with what it hears back)."""

    async def close(self, *, code: int = WSCloseCode.OK, message: bytes = b"", drain: bool = True) -> bool:
        """Close, first sending ``message_too_large`` when the close is aiohttp's 1009."""
        if not self.closed and self.sent_code is None:
            self.sent_code = code
        if code == WSCloseCode.MESSAGE_TOO_BIG and not self.closed:
            frame = ErrorFrame(id=None, code=MessageTooLarge.code, message="the frame is larger than max_frame_bytes")
            with contextlib.suppress(ConnectionError, RuntimeError):
                await self.send_str(encode(frame))
            message = message or MessageTooLarge.code.encode()
        return await super().close(code=code, message=message, drain=drain)
