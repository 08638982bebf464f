"""The low-level pieces of a WebSocket connection: its outbox, flags, rate bucket and frame bytes."""

from __future__ import annotations

import asyncio
import contextvars
import json
import struct
import time
from collections.abc import Callable

__all__ = ["Close", "Flag", "Flusher", "Outbox", "TokenBucket", "sendable", "text_frame", "text_header"]


class Close:
    """A request, queued after the frames before it, to close the socket."""

    __slots__ = ("code", "reason")

    def __init__(self, code: int, reason: str) -> None:
        self.code = code
        self.reason = reason


class Outbox:
    """A bounded FIFO of encoded frames.

    Agent frames wait for room (backpressure on the agent); control frames from
    the reader never wait, and may use a second ``limit`` of room, so acks and
    pongs are not stuck behind a long stream. ``on_put`` is called after every
    put, so the owner can start a writer only when there is something to write.
    """

    __slots__ = ("_on_put", "_room", "items", "limit")

    def __init__(self, limit: int, on_put: Callable[[], None]) -> None:
        self.limit = limit
        self.items: list[str | Close] = []
        self._room: asyncio.Event | None = None
        self._on_put = on_put

    def put_nowait(self, item: str | Close, *, control: bool = False) -> bool:
        """Queue ``item`` if there is room; False when the client is not reading."""
        if len(self.items) >= (2 * self.limit if control else self.limit):
            return False
        self.items.append(item)
        self._on_put()
        return True

    async def put(self, item: str, wait: float) -> bool:
        """Queue ``item``, waiting up to ``wait`` seconds for room."""
        if self.put_nowait(item):
            return True
        return await self.wait_for_room(wait) and self.put_nowait(item)

    async def wait_for_room(self, wait: float) -> bool:
        """Wait up to ``wait`` seconds until the outbox is below its limit."""
        deadline = time.monotonic() + wait
        while len(self.items) >= self.limit:
            if self._room is None:
                self._room = asyncio.Event()
            self._room.clear()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            try:
                async with asyncio.timeout(remaining):
                    await self._room.wait()
            except TimeoutError:
                return False
        return True

    def detach(self) -> None:
        """Forget the owner's callback: the connection has ended, and the outbox must not keep it alive.

        ``on_put`` is usually a bound method of the owner, which holds the outbox: a
        reference cycle that only the cyclic garbage collector would free, with the
        session's whole history in it.
        """
        self._on_put = _nothing

    def take_all(self) -> list[str | Close]:
        """Everything queued, oldest first; the outbox is empty afterwards."""
        items, self.items = self.items, []
        if self._room is not None:
            self._room.set()
        return items


def _nothing() -> None:
    pass


class Flusher:
    """Runs, in one event-loop callback, the flushes that connections asked for meanwhile.

    A connection that queues frames wants them written once its current step is
    over, so that everything it queues in that step leaves in one write. Many
    connections are served in one turn of the loop (every socket that became
    readable), so one shared callback instead of one per connection saves a
    callback (a handle, its scheduling and its run) on most messages. The flushes
    run in an empty ``contextvars`` context, not the first asker's: a connection
    starts its own tasks in its own context.
    """

    __slots__ = ("_loop", "_waiting")

    def __init__(self) -> None:
        self._waiting: list[Callable[[], None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None

    def add(self, loop: asyncio.AbstractEventLoop, flush: Callable[[], None]) -> None:
        """Call ``flush`` soon, in the next round of the loop's callbacks."""
        waiting = self._waiting
        if loop is not self._loop or not waiting:
            # Each callback owns its list: one on another (or a stopped) loop keeps its own.
            self._loop, self._waiting = loop, waiting = loop, []
            loop.call_soon(self._run, waiting, context=contextvars.Context())
        waiting.append(flush)

    def _run(self, waiting: list[Callable[[], None]]) -> None:
        if waiting is self._waiting:
            self._waiting = []
        for index, flush in enumerate(waiting):
            try:
                flush()
            except (SystemExit, KeyboardInterrupt):
                rest = waiting[index + 1 :]
                if rest:  # as their own callbacks would, the others run if the loop goes on
                    asyncio.get_running_loop().call_soon(self._run, rest, context=contextvars.Context())
                raise
            except BaseException as exc:  # one connection's failure must not keep the others' frames
                asyncio.get_running_loop().call_exception_handler(
                    {"message": "flushing a connection failed", "exception": exc}
                )


class Flag:
    """A set/clear flag to wait on, like asyncio.Event, that allocates nothing until awaited.

    An Event carries a deque of waiters from birth; with two per connection that is
    over a kilobyte for each of thousands of idle sessions.
    """

    __slots__ = ("_set", "_waiters")

    def __init__(self, value: bool = False) -> None:
        self._set = value
        self._waiters: list[asyncio.Future[None]] | None = None

    def is_set(self) -> bool:
        """Whether the flag is set."""
        return self._set

    def set(self) -> None:
        """Set the flag and wake every waiter."""
        self._set = True
        waiters, self._waiters = self._waiters, None
        for waiter in waiters or ():
            if not waiter.done():
                waiter.set_result(None)

    def clear(self) -> None:
        """Clear the flag."""
        self._set = False

    async def wait(self) -> None:
        """Return once the flag is set."""
        if self._set:
            return
        waiter = asyncio.get_running_loop().create_future()
        if self._waiters is None:
            self._waiters = []
        self._waiters.append(waiter)
        try:
            await waiter
        finally:
            if self._waiters is not None and waiter in self._waiters:
                self._waiters.remove(waiter)


class TokenBucket:
    """The per-session message rate limit: ``capacity`` tokens refilled over ``per`` seconds."""

    __slots__ = ("capacity", "rate", "stamp", "tokens")

    def __init__(self, capacity: int, per: float) -> None:
        self.capacity = float(capacity)
        self.rate = capacity / per
        self.tokens = float(capacity)
        self.stamp = time.monotonic()

    def take(self) -> float:
        """Take a token: 0.0 when allowed, else the seconds until one is available."""
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate


def sendable(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        # Lone surrogates (from "\ud800" in a client's JSON) cannot be UTF-8: send them JSON-escaped.
        return json.dumps(json.loads(text), separators=(",", ":"))
    return text


def text_frame(text: str) -> bytes:
    """One unmasked, unfragmented RFC 6455 text frame (a server never masks)."""
    try:
        payload = text.encode("utf-8")
    except UnicodeEncodeError:
        payload = sendable(text).encode("utf-8")
    return text_header(len(payload)) + payload


def text_header(size: int) -> bytes:
    """The header of an unmasked, unfragmented text frame of ``size`` payload bytes."""
    if size < 126:
        return _SMALL_HEADERS[size]  # made once: most frames are small
    if size < 65536:
        return _HEADER16.pack(0x81, 126, size)
    return _HEADER64.pack(0x81, 127, size)


_HEADER16 = struct.Struct("!BBH")
_HEADER64 = struct.Struct("!BBQ")
_SMALL_HEADERS = tuple(bytes((0x81, size)) for size in range(126))
