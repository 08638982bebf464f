"""Every use of aiohttp below its public WebSocket API, fenced in one module.

connic writes text frames straight to the asyncio transport in batches (one
system call for a burst of chunks, where ``send_str`` makes one per frame),
writes its own pings and pongs, waits on the protocol's flow control, caps
the transport's read size, counts the bytes its client has yet to take
(:func:`unsent`, from the kernel's send queue), drains a socket refused with 1009
(:class:`_Drain`) and closes an AG-UI request whose body stopped coming
(:func:`drop_after`). Each of these reaches under aiohttp's public API.
With compression on, aiohttp frames the text messages and connic still writes
the pings and pongs: control frames are never compressed, and aiohttp writes
each frame within one step of the event loop (a large message is compressed
first, then written), so a control frame written between steps lands between
two frames. Verified on aiohttp 3.14; the black-box tests that pin this
behaviour are tests/reliability/test_heartbeat.py (pings and pongs, with and
without compression), tests/reliability/test_slow_client.py (flow control),
tests/reliability/test_preauth.py (:class:`Socket`, compressed and not),
tests/reliability/test_garbage.py (the 1009 close and ``message_too_large``),
tests/reliability/test_refusal_drain.py (the socket drained after a 1009), and
tests/test_agui_body_bounds.py (:func:`drop_after`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import struct
import sys
import weakref
from collections.abc import Callable
from typing import Any, ClassVar

from aiohttp import WebSocketError, WSCloseCode, WSMessage, WSMsgType, web
from aiohttp.http_websocket import WebSocketWriter
from aiohttp.web_request import BaseRequest

from connic.errors import MessageTooLarge
from connic.frames import ErrorFrame, encode
from connic.transports._aiohttp_auth import AuthBound

__all__ = [
    "HIGH_WATER",
    "Socket",
    "drop_after",
    "limit_read_size",
    "raw_transport",
    "sendable",
    "text_frame",
    "text_header",
    "unsent",
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

if sys.platform == "linux":
    import fcntl
    import termios

    _OUTQ: int | None = termios.TIOCOUTQ  # SIOCOUTQ on a TCP socket: bytes the peer has not acknowledged
else:  # elsewhere, the transport's own buffer alone: the kernel's is not counted
    _OUTQ = None

_LINGER = 2.0
_LINGER_BYTES = 16 * 1024 * 1024
_LINGER_SOCKETS = 256
# A client refused with 1009 is read from (what it sends dropped) at most this long, and this
# much, after the server's close, and at most this many at a time: see ``_Drain``.

_FIN = 0x80
_TEXT_FIN = _FIN | WSMsgType.TEXT.value  # a text frame's first byte (an enum's value is a Python property)


def raw_transport(request: web.Request) -> asyncio.Transport | None:
    """The connection's asyncio transport, which frames can be written to directly (None if it is not one)."""
    io = request.transport
    return io if isinstance(io, asyncio.Transport) else None


def limit_read_size(request: web.Request) -> None:
    """Read the socket at most 64 KiB at a time (see ``_READ_SIZE``)."""
    io: Any = request.transport
    if getattr(io, "max_size", 0) > _READ_SIZE:
        io.max_size = _READ_SIZE


async def wait_writable(request: web.Request) -> None:
    """Wait until the transport's buffer drains below its high-water mark (flow control)."""
    await request.protocol._drain_helper()


def unsent(transport: asyncio.BaseTransport | None) -> int:
    """Bytes written to the connection that its client has yet to take: the transport's buffer and the kernel's.

    The kernel's share is its send queue, what the client's end has not acknowledged (on
    Linux; elsewhere only the transport's buffer counts). It falls as the client reads,
    while the transport's buffer may sit unchanged for seconds: the kernel reports the socket
    writable only once much of a send buffer of megabytes drained.
    """
    if not isinstance(transport, asyncio.WriteTransport):
        return 0
    size = transport.get_write_buffer_size()
    sock = transport.get_extra_info("socket")
    if _OUTQ is not None and sock is not None:
        with contextlib.suppress(OSError, ValueError):  # closed meanwhile, or not a socket that has a queue
            size += int.from_bytes(fcntl.ioctl(sock.fileno(), _OUTQ, bytes(4)), sys.byteorder, signed=True)
    return size


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


def write_control(
    transport: asyncio.Transport | None, kind: WSMsgType, payload: bytes, *, behind: bool = False
) -> None:
    """Write a ping or pong now: control frames may go between any two messages.

    Unless ``behind``, nothing is written while the client is behind on reading: a client that
    sends pings but does not read gets no pongs (nor unbounded buffers). The heartbeat's own
    ping passes ``behind=True``: one per interval is bounded, and a client busy reading a
    backlog must get it (behind the backlog) to answer it.
    """
    if transport is None or transport.is_closing():
        return
    if behind or transport.get_write_buffer_size() <= HIGH_WATER:
        transport.write(bytes((_FIN | kind.value, len(payload))) + payload)


async def drop_after(request: web.Request, response: web.Response) -> None:
    """Send ``response`` now, then close the connection, not reading the rest of the request's body.

    aiohttp would read on (and drop) what is left of the body for 10 s before it closes, and
    of a body that stopped coming nothing is left to read: the connection would stay, uncounted.
    """
    response.force_close()
    await response.prepare(request)
    await response.write_eof()
    request.protocol.force_close()


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
        return _HEADER16.pack(_TEXT_FIN, 126, size)
    return _HEADER64.pack(_TEXT_FIN, 127, size)


_HEADER16 = struct.Struct("!BBH")
_HEADER64 = struct.Struct("!BBQ")
_SMALL_HEADERS = tuple(bytes((_TEXT_FIN, size)) for size in range(126))


class Socket(web.WebSocketResponse):
    """aiohttp's WebSocketResponse, telling the client why before closing with 1009.

    aiohttp closes by itself when a frame is over ``max_msg_size``; the protocol
    wants a ``message_too_large`` error frame first. Until :meth:`authenticated`,
    frames are read under ``auth_frame_bytes`` rather than ``max_msg_size``
    (``_aiohttp_auth``), so that unauthenticated sockets cannot make the server
    buffer large frames.
    """

    # Slots, not the instance dict: aiohttp's own attributes nearly fill the keys a dict may
    # share with its class's other instances (30 in CPython 3.11), and one more turns every
    # connection's dict into one of its own, some 1.3 KB larger (docs/performance.md, M).
    __slots__ = ("_auth_bound", "_auth_frame_bytes", "_counted", "_frame_bytes", "_transport", "sent_code")

    sent_code: int | None
    """The first close code sent (aiohttp later overwrites ``close_code`` with what it hears back)."""

    def __init__(
        self,
        *,
        max_msg_size: int,
        auth_frame_bytes: int | None = None,
        counted: Callable[[str], None] | None = None,
        **kwargs: Any,
    ) -> None:
        """``counted``: called with the code of each error frame this socket sends (the metrics' errors)."""
        super().__init__(max_msg_size=max_msg_size, **kwargs)
        self._counted = counted
        self.sent_code = None
        self._frame_bytes = max_msg_size
        self._auth_frame_bytes = auth_frame_bytes
        self._auth_bound: AuthBound | None = None
        self._transport: asyncio.Transport | None = None

    def _post_start(self, request: BaseRequest, protocol: str | None, writer: WebSocketWriter) -> None:
        self._transport = writer.transport
        bound = self._auth_frame_bytes
        if bound is None:
            super()._post_start(request, protocol, writer)
            return
        post_start = super()._post_start
        # aiohttp refuses sizes >= its bound.
        self._auth_bound = AuthBound.start(self, request, bound + 1, lambda: post_start(request, protocol, writer))

    def authenticated(self) -> None:
        """The connection authenticated: read frames up to ``max_msg_size`` from now on."""
        bound = self._auth_bound
        if bound is not None:
            self._auth_bound = None
            bound.lift(self._frame_bytes)

    async def receive(self, timeout: float | None = None) -> WSMessage:  # noqa: ASYNC109 (aiohttp's signature)
        """The next message; with compression, one inflated past the bound is refused (1009).

        aiohttp holds an inflated message to ``max_msg_size`` *inclusive* but a frame read as
        it is to ``max_msg_size`` exclusive, so with one bound for both, an inflated message
        one byte over the limit would pass.
        """
        msg = await super().receive(timeout)
        if msg.type is WSMsgType.TEXT and self.compress and self._over(msg.data):
            await self.close(code=WSCloseCode.MESSAGE_TOO_BIG)
            return WSMessage(WSMsgType.ERROR, WebSocketError(WSCloseCode.MESSAGE_TOO_BIG, "too large"), None)
        return msg

    def _over(self, text: str) -> bool:
        limit = self._auth_frame_bytes if self._auth_bound is not None else self._frame_bytes - 1
        assert limit is not None
        if len(text) > limit:
            return True
        # UTF-8 takes at most 4 bytes a character: only a text near the limit is encoded.
        return len(text) * 4 > limit and len(text.encode()) > limit

    async def close(self, *, code: int = WSCloseCode.OK, message: bytes = b"", drain: bool = True) -> bool:
        """Close, first sending ``message_too_large`` when the close is aiohttp's 1009."""
        bound = self._auth_bound
        if bound is not None:
            bound.release()  # refused before authenticating: the close handshake reads on, bounded
        transport = self._transport
        if not self.closed and self.sent_code is None and transport is not None and not transport.is_closing():
            # Sent, or at least written. When the client has already gone (a reset, or a TCP
            # close without a close frame), aiohttp's close finds the transport closing, sends
            # nothing and sets close_code to 1006, which is what the connection reports.
            self.sent_code = code
        if code == WSCloseCode.MESSAGE_TOO_BIG and not self.closed:
            limit = "max_auth_frame_bytes before authentication" if bound is not None else "max_frame_bytes"
            if self._counted is not None:
                self._counted(MessageTooLarge.code)
            with contextlib.suppress(ConnectionError, RuntimeError):
                await self.send_str(self.too_large(limit))
            message = message or MessageTooLarge.code.encode()
        try:
            return await super().close(code=code, message=message, drain=drain)
        finally:
            exc = self.exception()
            if exc is not None:
                # aiohttp keeps why the close failed (usually: the client had gone) for
                # exception(), which connic does not use. Its traceback holds the frames
                # of the callers, the connection's included, while this socket holds it:
                # a reference cycle that would keep the connection until the cyclic
                # garbage collector ran.
                exc.__traceback__ = exc.__context__ = exc.__cause__ = None

    def too_large(self, limit: str) -> str:
        """The frame that tells the client why it is closed 1009: its frame is over ``limit`` (a key's name)."""
        return encode(ErrorFrame(id=None, code=MessageTooLarge.code, message=f"the frame is larger than {limit}"))

    def _close_transport(self) -> None:
        """aiohttp ends the connection; after a 1009, what the client still sends is drained a while."""
        transport = self._transport
        if self.sent_code == WSCloseCode.MESSAGE_TOO_BIG and transport is not None and not transport.is_closing():
            _Drain.start(transport)
        super()._close_transport()


class _Drain:
    """Reads and drops what a client refused with 1009 still sends, then closes its socket.

    Closed at once, the socket would still have the rest of the oversized frame to read, or
    get it soon: the kernel answers that with a reset, and a client that gets the reset before
    it has read the close frame (Chromium, still sending the large frame) drops what it had
    unread and reports 1006 with no reason. The connection ends for connic as before; a
    duplicate of its socket's descriptor keeps the TCP connection open, sends FIN after the
    close frame and reads until the client closes too, ``_LINGER`` seconds or ``_LINGER_BYTES``
    bytes, whichever comes first: a bounded cost, with no buffer and no task. The sockets
    drained are outside the connection caps, so there are at most ``_LINGER_SOCKETS`` of them
    (past that a refused socket is closed at once, as it was before): clients refused in a
    burst, never closing, cannot run the process out of file descriptors.
    """

    __slots__ = ("_budget", "_loop", "_sock", "_timer")

    # Sockets being drained now, per event loop (a loop stopped meanwhile takes its count along).
    _draining: ClassVar[weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, int]] = weakref.WeakKeyDictionary()

    @classmethod
    def start(cls, transport: asyncio.Transport) -> None:
        """Drain the socket of ``transport``, which is about to be closed."""
        sock = transport.get_extra_info("socket")
        busy = cls._draining.get(asyncio.get_running_loop(), 0) >= _LINGER_SOCKETS
        if sock is None or busy or transport.get_extra_info("sslcontext") is not None:
            return  # (under TLS the close frame may still wait in the TLS layer: FIN would cut it off)
        try:
            copy = socket.socket(sock.family, sock.type, sock.proto, fileno=os.dup(sock.fileno()))
        except OSError:
            return
        copy.setblocking(False)
        if not transport.get_write_buffer_size():
            # The close frame is in the kernel: FIN behind it. (Not when it waits in
            # asyncio's buffer: the socket would refuse it then.)
            with contextlib.suppress(OSError):
                copy.shutdown(socket.SHUT_WR)
        cls(copy)

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._budget = _LINGER_BYTES
        self._loop = asyncio.get_running_loop()
        self._draining[self._loop] = self._draining.get(self._loop, 0) + 1
        self._loop.add_reader(sock.fileno(), self._read)
        self._timer = self._loop.call_later(_LINGER, self._end)

    def _read(self) -> None:
        try:
            data = self._sock.recv(_READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        self._budget -= len(data)
        if not data or self._budget <= 0:
            self._end()

    def _end(self) -> None:
        if self._sock.fileno() < 0:
            return
        self._timer.cancel()
        self._loop.remove_reader(self._sock.fileno())
        self._sock.close()
        self._draining[self._loop] -= 1
