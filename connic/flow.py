"""Small flow-control primitives shared by the session core and the transports."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

__all__ = ["Flag", "TokenBucket", "wait_in_turns"]


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


async def wait_in_turns(room: asyncio.Event, wait: float, waiting: Callable[[], bool]) -> bool:
    """Wait while ``waiting()`` holds; False if ``room`` was not set for ``wait`` seconds.

    The wait starts again each time ``room`` is set (a writer took frames): several
    producers waiting for room take turns at it, and one that loses the race to the others
    for longer than ``wait`` is behind a client that reads, not a slow consumer.
    """
    while waiting():
        room.clear()
        try:
            async with asyncio.timeout(wait):
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
