"""The ``redis`` store's view of a full Redis: ``maxmemory`` reached under ``maxmemory-policy noeviction``.

Redis then answers reads and refuses writes (``-OOM command not allowed when used memory >
'maxmemory'``) until it has room: nothing is lost from it, but no session can write. From
the first write refused, the store is *full*: one warning says so, handshakes are refused
(503, :meth:`Connection.available <connic.stores.redis.connection.Connection.available>`),
releases are held back (:mod:`~connic.stores.redis.writer`), and a check every
``FULL_CHECK`` finds when a write goes through again, which one more line says, with how
long it lasted and how many writes were refused meanwhile: two lines, however many
sessions and writes.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

__all__ = ["FULL_CHECK", "Full", "refused_full"]

log = logging.getLogger("connic.stores.redis")

FULL_CHECK = 1.0
"""Seconds between two checks whether a full Redis takes writes again (one small write refused meanwhile)."""


def refused_full(result: object) -> bool:
    """Whether ``result`` (a call's reply or exception) is Redis refusing a write for want of memory (``OOM``)."""
    import redis.exceptions  # the store imported it already

    return isinstance(result, redis.exceptions.OutOfMemoryError)


class Full:
    """Whether Redis is full, said once (a base class of :class:`~connic.stores.redis.connection.Connection`)."""

    _redis: Any

    def __init__(self) -> None:
        # Since when (loop time) Redis refuses writes for want of memory, and how many it refused; None: it takes them.
        self._full_since: float | None = None
        self._refusals = 0
        self._full_check: asyncio.Task[None] | None = None  # checks every FULL_CHECK until a write goes through

    @property
    def full(self) -> bool:
        """Whether Redis refuses writes for want of memory (``maxmemory`` reached, ``noeviction``) since a write did."""
        return self._full_since is not None

    async def available(self) -> bool:
        """Whether Redis takes sessions (:meth:`~connic.stores.redis.connection.Connection.available`)."""
        raise NotImplementedError

    def _filled(self, refused: int = 1) -> None:
        """Redis refused ``refused`` writes for want of memory: a warning when it starts, then a check every FULL_CHECK.

        A thousand sessions streaming into a full Redis have every write refused: one line per
        refusal (per session, per batch) would flood the logs and say nothing new.
        """
        self._refusals += refused
        if self._full_since is not None:
            return
        self._full_since = asyncio.get_running_loop().time()
        log.warning(
            "redis store: Redis is full (its maxmemory reached, maxmemory-policy noeviction): it refuses writes; "
            "sessions that write end with store_unavailable (1011) and handshakes get 503 until it has room"
        )
        if self._full_check is None or self._full_check.done():
            self._full_check = asyncio.create_task(self._check_full())

    def _has_room(self) -> None:
        """A write went through: if Redis was full, one line says it is over."""
        if self._full_since is None:
            return
        seconds = asyncio.get_running_loop().time() - self._full_since
        log.warning(
            "redis store: Redis takes writes again (it was full for %.1f s; %d writes refused meanwhile)",
            seconds,
            self._refusals,
        )
        self._full_since = None
        self._refusals = 0
        self._room()

    def _room(self) -> None:
        """Redis takes writes again after it was full (:class:`~connic.stores.redis.writer.Writer`: what it held)."""

    def _stop_full_check(self) -> None:
        if self._full_check is not None:
            self._full_check.cancel()
            self._full_check = None

    async def _check_full(self) -> None:
        # Without it only a handshake's probe would find the room: a process whose clients wait
        # (503) would neither say that it is over nor write the releases it held back.
        while self.full and self._redis is not None:
            await asyncio.sleep(FULL_CHECK)
            try:
                await self.available()
            except Exception:  # connic's own bug: keep checking, or handshakes got 503 for good
                log.exception("redis store: checking whether Redis has room failed")
