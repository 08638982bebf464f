"""A connection's keepalive: connic's own heartbeat, rather than aiohttp's.

aiohttp's heartbeat reschedules a callback for every frame received; this one
keeps a timestamp per frame (:attr:`Heartbeat.last_seen`, set by the reader) and
one timer that fires only when the connection has gone quiet. After
``interval`` seconds of quiet it writes a ping; if still nothing has come half
an interval later, it drops the connection without a close frame (1006).
"""

from __future__ import annotations

import asyncio
import logging

from aiohttp import WSMsgType

from connic.transports._aiohttp_raw import write_control
from connic.transports.ws_writer import Writer

__all__ = ["Heartbeat"]

log = logging.getLogger("connic.websocket")


class Heartbeat:
    """Pings a quiet connection and drops one whose pong does not come back."""

    __slots__ = ("_handle", "_loop", "_pinged", "interval", "last_seen", "writer")

    def __init__(self, writer: Writer, interval: float) -> None:
        self.writer = writer
        self.interval = interval  # 0: no pings
        self._loop = asyncio.get_running_loop()
        self.last_seen = self._loop.time()  # when a frame last came in (any frame)
        self._pinged: float | None = None  # when the unanswered ping went out
        self._handle: asyncio.TimerHandle | None = None

    def start(self) -> None:
        """Start watching (a no-op with ``interval`` 0)."""
        if self.interval:
            self._handle = self._loop.call_later(self.interval, self._beat)

    def stop(self) -> None:
        """Stop watching: the connection is over."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _beat(self) -> None:
        self._handle = None
        writer = self.writer
        if writer.closing:
            return
        interval = self.interval
        now = self._loop.time()
        if self._pinged is not None:
            if self.last_seen < self._pinged:
                log.info("session %s: no pong within %g s of a ping; dropping", writer.name, interval / 2)
                writer.drop()
                return
            self._pinged = None  # the pong (or anything else) came back
        quiet = now - self.last_seen
        if quiet < interval:
            self._handle = self._loop.call_later(interval - quiet, self._beat)
            return
        # Written even while the client is behind on reading (a large reply in flight): a ping
        # left unwritten would drop a client that reads steadily but has nothing to send.
        self._pinged = now
        write_control(writer.io, WSMsgType.PING, b"", behind=True)
        self._handle = self._loop.call_later(interval / 2, self._beat)
