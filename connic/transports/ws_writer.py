"""The outgoing side of one WebSocket connection: a bounded outbox written in batches.

Frames queue in the outbox; a callback scheduled once per burst writes
everything queued in one system call (up to about ``HIGH_WATER`` characters;
a writer task writes the rest as the client reads). While the client is behind (the
transport's buffer above its high-water mark) or compression is on, a writer
task takes over and waits on flow control. Reply frames wait for room in the
outbox, for as long as the client takes something (frames from the outbox, or bytes from the
socket's buffers) within every ``send_timeout``; control frames (acks, pongs, errors) never
wait and may use a second outbox's worth of room, beyond what a replay queued. A client that takes
nothing for ``send_timeout`` is a slow consumer: its connection is dropped (4010).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from aiohttp import web

from connic.errors import SlowConsumer
from connic.flow import wait_in_turns
from connic.metrics import Metrics
from connic.transports._aiohttp_raw import HIGH_WATER, sendable, unsent, wait_writable, write_texts

__all__ = ["Close", "Writer"]

log = logging.getLogger("connic.websocket")

_CLOSE_DEADLINE = 3.0  # seconds a slow consumer gets to take the close frame before the socket is dropped


class Close:
    """A request, queued after the frames before it, to close the socket."""

    __slots__ = ("code", "reason")

    def __init__(self, code: int, reason: str) -> None:
        self.code = code
        self.reason = reason

    def __len__(self) -> int:
        """No text to write: what a close adds to the size of a write."""
        return 0


class Writer:
    """One connection's outbox and the writing of it."""

    __slots__ = (
        "_abort_task",
        "_backlog",
        "_loop",
        "_room",
        "_scheduled",
        "_task",
        "close_code",
        "io",
        "items",
        "label",
        "limit",
        "metrics",
        "name",
        "request",
        "send_timeout",
        "transport",
        "ws",
    )

    def __init__(
        self,
        ws: web.WebSocketResponse,
        request: web.Request,
        io: asyncio.Transport | None,
        *,
        compress: bool,
        limit: int,
        send_timeout: float,
        metrics: Metrics,
        label: str,
    ) -> None:
        self.ws = ws
        self.request = request
        self.io = io  # the connection's transport: pings, pongs and drops go through it, compressed or not
        self.transport = None if compress else io  # None: aiohttp frames each message (compression on)
        self.limit = limit
        self.send_timeout = send_timeout
        self.metrics = metrics
        self.label = label
        self.name = "-"  # the session id, for the logs, once there is one
        self.items: list[str | Close] = []
        # How many of the items a replay queued beyond the limit (extend) are still there: room for
        # control frames behind them, which are the client's to read, not a sign it stopped reading.
        self._backlog = 0
        self.close_code: int | None = None  # set once a close is queued or the socket is dropped
        self._loop = asyncio.get_running_loop()
        self._room: asyncio.Event | None = None
        self._scheduled = False
        self._task: asyncio.Task[None] | None = None
        self._abort_task: asyncio.Task[None] | None = None

    @property
    def closing(self) -> bool:
        """Whether nothing more will be written (a close is queued, or the socket was dropped)."""
        return self.close_code is not None

    @property
    def full(self) -> bool:
        """Whether reply frames would have to wait."""
        return len(self.items) >= self.limit

    # --- queueing -------------------------------------------------------------

    def _put(self, item: str | Close, room: int) -> bool:
        if len(self.items) >= room:
            return False
        self.items.append(item)
        if not self._scheduled and (self._task is None or self._task.done()):
            if self.transport is None:
                self._task = asyncio.create_task(self._write_loop())
            else:
                # After the current step, everything queued meanwhile goes out in one write.
                self._scheduled = True
                self._loop.call_soon(self._flush)
        return True

    def send_nowait(self, data: str) -> None:
        """Queue a control frame; a client that let two outboxes' worth pile up (after a replay) is dropped."""
        if self.close_code is None and not self._put(data, 2 * self.limit + self._backlog):
            self.slow_consumer()

    def extend(self, frames: list[str]) -> None:
        """Queue frames beyond the limit (a replay: its size was bounded by the log)."""
        if self.close_code is None and frames:
            self.items.extend(frames[:-1])
            self._put(frames[-1], len(self.items) + 1)
            self._backlog = len(self.items)

    def offer(self, data: str) -> bool:
        """Queue a reply frame if the outbox has room (or nothing more is written); False if it is full."""
        return self.close_code is not None or self._put(data, self.limit)

    async def send(self, data: str) -> None:
        """Queue a reply frame, waiting up to ``send_timeout`` for room."""
        if self.close_code is not None or self._put(data, self.limit):
            return
        if not await self.wait_for_room(self.send_timeout):
            self.slow_consumer()
        elif self.close_code is None:
            self._put(data, self.limit)

    async def wait_for_room(self, wait: float) -> bool:
        """Wait for room in the outbox; False if the client took nothing for ``wait`` seconds (or closed).

        Nothing: neither frames from the outbox nor bytes from the socket's buffers. Several
        agents waiting for room take turns at it (:func:`~connic.flow.wait_in_turns`).
        """
        if not self.full:
            return self.close_code is None
        if self._room is None:
            self._room = asyncio.Event()
        return await wait_in_turns(self._room, wait, self._waiting, self._unsent) and self.close_code is None

    def _waiting(self) -> bool:
        return self.full and self.close_code is None

    def _unsent(self) -> int:
        return unsent(self.io)

    def _taken(self) -> list[str | Close]:
        items, self.items = self.items, []
        self._backlog = 0
        if self._room is not None:
            self._room.set()
        return items

    def _batch(self) -> list[str | Close]:
        """What one write takes: everything queued, or the first items up to about ``HIGH_WATER`` characters.

        Written all at once, a queue of large frames was copied whole into the transport's
        buffer (and once more joined), whatever the client read: 300 history frames of 3.6 MB
        asked for in 5 KB held 1.8 GB. The rest waits for the client to catch up (:meth:`_write_loop`).
        """
        items = self.items
        if len(items) > 1 and sum(map(len, items)) > HIGH_WATER:  # rarely: almost always one write takes all
            size = 0
            for index, item in enumerate(items):
                size += len(item)  # a Close counts 0
                if size > HIGH_WATER and index:
                    self.items = items[index:]
                    self._backlog = max(0, self._backlog - index)
                    if self._room is not None:
                        self._room.set()
                    return items[:index]
        return self._taken()

    # --- closing --------------------------------------------------------------

    def close(self, code: int, reason: str) -> None:
        """Close the socket after what is queued."""
        if self.close_code is not None:
            return
        if not self._put(Close(code, reason), 2 * self.limit + self._backlog + 1):
            self.abort(code, reason)
            return
        self.close_code = code
        if self._room is not None:
            self._room.set()  # reply frames waiting for room go nowhere now

    def abort(self, code: int, reason: str) -> None:
        """Close now, without waiting for queued frames (the client is not reading)."""
        self.close_code = code
        if self._room is not None:
            self._room.set()
        if self._task is not None:
            self._task.cancel()
        if self._abort_task is None:
            self._abort_task = asyncio.create_task(self._hard_close(code, reason))

    def drop(self) -> None:
        """Drop the connection without a close frame (1006): the client stopped answering pings."""
        self.close_code = 1006
        if self._room is not None:
            self._room.set()
        if self.io is not None:
            self.io.abort()

    def slow_consumer(self) -> None:
        """The client stopped reading: drop it with 4010."""
        if self.close_code is None:
            self.metrics.slow_consumers.inc(self.label)
            log.warning("session %s: client stopped reading; closing 4010", self.name)
            self.abort(SlowConsumer.close_code or 4010, SlowConsumer.code)

    async def finish(self) -> None:
        """The connection is over: write what a close left queued, then stop every task."""
        if self.close_code is not None and self.items:
            self._flush()
        task = self._task
        if task is not None and not task.done() and self.close_code is not None:
            await asyncio.wait({task}, timeout=self.send_timeout)
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if self._abort_task is not None:
            await asyncio.gather(self._abort_task, return_exceptions=True)
        self.items = []
        self._backlog = 0
        self._task = self._abort_task = None

    # --- writing --------------------------------------------------------------

    def flush(self) -> None:
        """Write what is queued now, not at the end of this step (unless the writer task has it)."""
        pending = self._scheduled
        self._flush()
        self._scheduled = pending  # a flush already scheduled still runs, and finds nothing or what came since

    def _flush(self) -> None:
        # The callback of every burst (hot path): write everything queued, in one call.
        self._scheduled = False
        transport = self.transport
        if transport is None or (self._task is not None and not self._task.done()) or not self.items:
            return
        try:
            if transport.is_closing():
                self._taken()
                if self.close_code is None:
                    self.close_code = 1006
                return
            if transport.get_write_buffer_size() > HIGH_WATER:
                self._task = asyncio.create_task(self._write_loop())  # waits for the client to catch up
                return
            close = self._write_now(transport)
        except Exception:
            log.exception("session %s: sending failed; closing 1011", self.name)
            self.abort(1011, "internal_error")
            return
        if close is not None:
            self._task = asyncio.create_task(self._close_socket(close))
        elif self.items:
            self._task = asyncio.create_task(self._write_loop())  # more than one write's worth was queued

    def _write_now(self, transport: asyncio.Transport) -> Close | None:
        """Write one batch (:meth:`_batch`) in one call; return a close met on the way (nothing after it is sent)."""
        texts: list[str] = []
        for item in self._batch():
            if isinstance(item, Close):
                if texts:
                    write_texts(transport, texts)
                return item
            texts.append(item)
        if texts:
            write_texts(transport, texts)
        return None

    async def _close_socket(self, close: Close) -> None:
        with contextlib.suppress(ConnectionError, RuntimeError):
            await self.ws.close(code=close.code, message=close.reason.encode())

    async def _write_loop(self) -> None:
        """The slow path: compression on, or a client behind on reading."""
        ws = self.ws
        transport = self.transport
        try:
            while self.items:
                if transport is None:  # compression on: aiohttp frames each message itself
                    # One write's worth at a time, as without compression, and each frame sent
                    # tells an agent waiting for room that the client reads: send_str waits on
                    # flow control wherever aiohttp's own count falls, maybe several times in one
                    # batch, and a client that reads steadily is not a slow consumer however long
                    # the batch takes it.
                    for item in self._batch():
                        if isinstance(item, Close):
                            await ws.close(code=item.code, message=item.reason.encode())
                            return
                        await ws.send_str(sendable(item))
                        if self._room is not None and self.full:
                            self._room.set()
                    continue
                if transport.is_closing():
                    raise ConnectionResetError("the connection is closing")
                if transport.get_write_buffer_size() > HIGH_WATER:
                    # The client is behind: the outbox fills meanwhile, and a client that
                    # never catches up becomes a slow consumer.
                    await wait_writable(self.request)
                    continue
                close = self._write_now(transport)
                if close is not None:
                    await ws.close(code=close.code, message=close.reason.encode())
                    return
        except (ConnectionError, RuntimeError):
            # The socket closed under us; the reader sees it and ends the connection.
            if self.close_code is None:
                self.close_code = 1006
        except Exception:
            log.exception("session %s: sending failed; closing 1011", self.name)
            self.abort(1011, "internal_error")

    async def _hard_close(self, code: int, reason: str) -> None:
        try:
            async with asyncio.timeout(_CLOSE_DEADLINE):
                await self.ws.close(code=code, message=reason.encode(), drain=False)
        except (TimeoutError, ConnectionError, RuntimeError):
            pass
        finally:
            # A client that does not read would keep our unsent buffer, and the socket,
            # forever: asyncio's close() waits to flush it. Drop the connection instead.
            raw = self.io
            if raw is not None and (not raw.is_closing() or raw.get_write_buffer_size()):
                raw.abort()
