"""A socket's frame parser, held to a small size bound until the connection authenticates.

aiohttp takes ``max_msg_size`` once, when the response is made, and its parser
(compiled with Cython) keeps it where Python cannot change it. Before
authentication connic wants a much smaller bound (``max_auth_frame_bytes``):
otherwise every unauthenticated socket may make the server buffer all but the
last byte of a ``max_frame_bytes`` frame. So, until the connection authenticates:

- without compression, a second parser of aiohttp's, built with the small bound,
  reads the socket. :class:`AuthBound` stands in front of it and passes it the
  bytes up to the end of the first whole message (the auth frame) only; what
  comes after waits, with the socket paused once anything does, until :meth:`AuthBound.lift` hands
  it to aiohttp's own parser (the large bound), which has seen nothing yet. Both
  parsers feed the same message queue, so nothing is lost or read twice.
- with permessage-deflate, the inflater's window carries over from one message
  to the next, so the parser cannot be swapped: the socket gets aiohttp's
  pure-Python parser instead, whose bound :meth:`AuthBound.lift` raises before
  it is handed what came after the auth frame (held the same way: parsed
  earlier, a message sent right behind the auth frame would meet the small bound).

Every access to aiohttp's private attributes is in this module (and the socket's
``_post_start`` override that calls :meth:`AuthBound.start`, in websocket.py); the tests
in tests/reliability/test_preauth.py pin them (aiohttp 3.14.5).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from aiohttp import web
from aiohttp._websocket import reader_py
from aiohttp.http_websocket import WebSocketReader

__all__ = ["AuthBound"]


class AuthBound:
    """Reads a socket under a small frame bound until :meth:`lift`.

    It takes the place of aiohttp's parser in the connection's protocol (which
    calls ``feed_data`` for every read and ``feed_eof`` at the end).
    """

    __slots__ = ("_big", "_ended", "_head", "_held", "_inner", "_paused", "_protocol", "_skip")

    @classmethod
    def start(
        cls, ws: web.WebSocketResponse, request: web.BaseRequest, limit: int, post_start: Callable[[], None]
    ) -> AuthBound:
        """Run aiohttp's ``post_start`` (which makes the socket's parser), then read under ``limit``.

        Bytes the client sent right behind its handshake, which aiohttp keeps until
        the parser exists, go to the bounded reader too.
        """
        handler: Any = request.protocol
        tail, handler._message_tail = handler._message_tail, b""
        post_start()
        return cls(ws, request, limit, tail)

    def __init__(self, ws: web.WebSocketResponse, request: web.BaseRequest, limit: int, tail: bytes) -> None:
        protocol: Any = request.protocol
        self._protocol = protocol
        self._big: Any = ws._parser  # aiohttp's own parser, with the large bound; it has read nothing yet
        self._head = bytearray()  # the bytes read so far of the header of the next frame
        self._skip = 0  # payload bytes of the current frame not read yet
        self._ended = False  # the current frame ends a data message (FIN on text, binary or continuation)
        self._held: list[bytes] | None = None  # bytes after the first message, kept for the large parser
        self._paused = False  # whether this paused the socket (bytes came after the first message)
        if ws.compress:
            # The inflater's state must survive authentication: one parser for the whole connection.
            loop = asyncio.get_running_loop()
            queue = reader_py.WebSocketDataQueue(protocol, 2**16, loop=loop)  # aiohttp's size, DEFAULT_CHUNK_SIZE
            self._inner: Any = reader_py.WebSocketReader(queue, limit, compress=True, decode_text=ws._decode_text)
            ws._reader = queue
            ws._parser = self._inner
            self._big = None
        else:
            assert ws._reader is not None
            self._inner = WebSocketReader(ws._reader, limit, compress=False, decode_text=ws._decode_text)
        protocol._payload_parser = self
        if tail:
            protocol.data_received(tail)

    # --- aiohttp's parser interface -----------------------------------------------------

    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        """Pass ``data`` to the small parser, up to the end of the first message."""
        if self._held is not None:
            self._hold(data)
            return False, b""
        cut = self._message_end(data)
        if cut is None:
            result: tuple[bool, bytes] = self._inner.feed_data(data)
            return result
        # The first message (the auth frame) ends here: what comes after waits for the verdict.
        self._held = []
        if cut < len(data):
            self._hold(data[cut:])
        result = self._inner.feed_data(data[:cut])
        return result

    def _hold(self, data: bytes) -> None:
        # Bytes before the verdict are kept, and the socket is paused so that no more pile
        # up: at most one read's worth is held. Paused only once such bytes come: a client
        # that waits for ``connected`` (nearly every one) costs no pause and resume, two
        # system calls each, which a burst of reconnecting clients would pay one by one.
        assert self._held is not None
        self._held.append(bytes(data))
        if not self._paused:
            self._paused = True
            self._protocol.pause_reading()

    def feed_eof(self) -> None:
        """The connection ended."""
        self._inner.feed_eof()

    # --- the verdict ------------------------------------------------------------------------

    def lift(self, limit: int) -> None:
        """The connection authenticated: from now on frames up to ``limit`` (exclusive) are read."""
        protocol = self._protocol
        big = self._big
        if big is None:  # compression: the same parser, with a larger bound
            big = self._inner
            big._max_msg_size = limit
            big._max_fragments = max(1024, limit // 256)
        held = b"".join(self._held or ())
        self._held = None
        protocol._payload_parser = big
        if self._paused:
            protocol.resume_reading()
        if held:
            protocol.data_received(held)

    def release(self) -> None:
        """The connection is refused: what waits is read under the small bound (the close handshake)."""
        held = self._held
        if held is None:
            return
        self._protocol._payload_parser = self._inner
        self._held = None
        if self._paused:
            self._protocol.resume_reading()
        data = b"".join(held)
        if data:
            self._protocol.data_received(data)

    # --- finding the end of the first message ---------------------------------------------

    def _message_end(self, data: bytes) -> int | None:
        """The offset in ``data`` just after the first message ends, if it ends in ``data``.

        Only frame lengths are read here; everything else (reserved bits, opcodes,
        the bound itself) is the parser's to check.
        """
        pos = 0
        size = len(data)
        head = self._head
        while pos < size:
            if self._skip:
                step = min(self._skip, size - pos)
                pos += step
                self._skip -= step
                if not self._skip and self._ended:
                    return pos
                continue
            head.append(data[pos])
            pos += 1
            if len(head) < 2:
                continue
            flag = head[1] & 0x7F
            needed = 2 + (2 if flag == 126 else 8 if flag == 127 else 0) + (4 if head[1] & 0x80 else 0)
            if len(head) < needed:
                continue
            if flag == 126:
                length = int.from_bytes(head[2:4], "big")
            elif flag == 127:
                length = int.from_bytes(head[2:10], "big")
            else:
                length = flag
            self._ended = bool(head[0] & 0x80) and (head[0] & 0x0F) in (0x0, 0x1, 0x2)
            head.clear()
            self._skip = length
            if not length and self._ended:
                return pos
        return None
