"""Small flow-control primitives shared by the session core and the transports."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

__all__ = ["Flag", "StallTimeout", "TokenBucket", "wait_in_turns"]


class Flag:
    """A set/clear flag to wait on, like asyncio.Event, that allocates nothing until awaited.

    An Event carries a deque of waiters from birth; thousands of idle sessions
    would each pay for one they never use.
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


class StallTimeout:
    """``async with StallTimeout(wait, unsent):`` as ``asyncio.timeout(wait)``, but only while the client takes nothing.

    ``unsent()`` counts the bytes written to the client that it has yet to take. The time
    starts again each time that count fell since the last look (every ``wait`` seconds): a
    client that reads, however slowly, is not timed out; one that took none of them for
    ``wait`` seconds is (TimeoutError). The kernel reports a socket writable only once much of
    its send buffer drained, a buffer it may grow to megabytes: a client reading steadily can
    go longer than ``wait`` without the server being able to write, while it never stopped
    taking bytes. Without ``unsent``, this is ``asyncio.timeout(wait)``.

    The first count is taken after the awaiting task's current step, so that what that step
    writes (a frame, before waiting for it to drain) is not mistaken for the client falling behind.
    """

    __slots__ = ("_before", "_handle", "_loop", "_timeout", "_unsent", "_wait")

    def __init__(self, wait: float, unsent: Callable[[], int] | None = None) -> None:
        self._wait = wait
        self._unsent = unsent
        self._before = 0
        self._handle: asyncio.Handle | None = None
        self._loop = asyncio.get_running_loop()
        self._timeout = asyncio.timeout(None if unsent is not None else wait)

    async def __aenter__(self) -> StallTimeout:
        await self._timeout.__aenter__()
        if self._unsent is not None:
            self._handle = self._loop.call_soon(self._start)
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        await self._timeout.__aexit__(*exc_info)

    def _start(self) -> None:
        assert self._unsent is not None
        self._before = self._unsent()
        self._handle = self._loop.call_later(self._wait, self._look)

    def _look(self) -> None:
        assert self._unsent is not None
        now = self._unsent()
        if now < self._before:
            self._before = now
            self._handle = self._loop.call_later(self._wait, self._look)
        else:
            self._handle = None
            self._timeout.reschedule(self._loop.time())  # expires now: the task sees TimeoutError


async def wait_in_turns(
    room: asyncio.Event, wait: float, waiting: Callable[[], bool], unsent: Callable[[], int] | None = None
) -> bool:
    """Wait while ``waiting()`` holds; False once neither ``room`` was set nor the client read for ``wait`` seconds.

    The wait starts again each time ``room`` is set (a writer took frames): several
    producers waiting for room take turns at it, and one that loses the race to the others
    for longer than ``wait`` is behind a client that reads, not a slow consumer. It also
    starts again each time the client took some of the bytes written to it (``unsent``, as
    :class:`StallTimeout`): a writer may be unable to write for longer than ``wait`` while
    the client reads what the kernel holds.
    """
    while waiting():
        room.clear()
        try:
            async with StallTimeout(wait, unsent):
                await room.wait()
        except TimeoutError:
            return False
    return True


class TokenBucket:
    """A message rate limit: ``capacity`` tokens, refilled smoothly over ``per`` seconds.

    Made and used in a running event loop, on that loop's clock (as every timer
    of a session is).
    """

    __slots__ = ("_clock", "capacity", "rate", "stamp", "tokens")

    def __init__(self, capacity: int, per: float) -> None:
        self._clock = asyncio.get_running_loop().time
        self.capacity = float(capacity)
        self.rate = capacity / per
        self.tokens = float(capacity)
        self.stamp = self._clock()

    def take(self) -> float:
        """Take a token: 0.0 when allowed, else the seconds until one is available."""
        now = self._clock()
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate
