"""The ``redis`` store's sessions let go while Redis did not answer: held whole here, let go once it does.

A session is let go (detached and idle, or its process stopping) with a last SAVE and a
RELEASE. When Redis does not answer them (unreachable, stalled), the session was dropped
from the process all the same: a resume once Redis answered again took Redis's older copy,
where a reply the client saw end was pending (``producer_lost`` for it) and missing from the
history. Such a release is held here instead and tried again every :data:`RELEASE_RETRY`
seconds, and a resume on this process writes it first (:meth:`~connic.stores.redis.writer.Writer.flush`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from connic.errors import StoreUnavailable
from connic.stores.redis.clock import Clock

if TYPE_CHECKING:
    from connic.agent import HistoryEntry

__all__ = ["RELEASE_RETRY", "Held", "Release"]

log = logging.getLogger("connic.stores.redis")

RELEASE_RETRY = 1.0
"""Seconds between attempts at letting go a session whose last save Redis did not answer.

A resume on another process within this second of Redis answering again may still take
Redis's older copy of the session.
"""

Release = tuple[int, str, "Sequence[HistoryEntry]", int, int]
"""What letting a session go writes: fence, record, its history, ttl ms, lease ms."""


class Held(Clock):
    """The releases waiting to be written (a base class of :class:`~connic.stores.redis.writer.Writer`)."""

    def __init__(self) -> None:
        super().__init__()
        self._releases: dict[str, Release] = {}  # session id: its release, for the next batch
        self._held_back: set[str] = set()  # sessions whose release Redis did not answer: retried until it does
        self._retry: asyncio.TimerHandle | None = None  # the next retry of those releases

    def _kick(self) -> None:
        """Wake the writer now (:class:`~connic.stores.redis.writer.Writer`)."""
        raise NotImplementedError

    def _hold_back(self, sid: str, release: Release, error: Exception) -> None:
        """Letting the session go failed: it is kept as it is and let go at the next attempt.

        Retrying is safe whatever Redis ran of the failed attempt: its fence keeps a late SAVE
        from overwriting a copy another process claimed since, and a RELEASE that went
        through makes the retry find the session let go (nothing is written then).
        """
        self._releases.setdefault(sid, release)
        if sid not in self._held_back:
            self._held_back.add(sid)
            why = error.why if isinstance(error, StoreUnavailable) else str(error)
            log.warning("session %s: letting it go failed (%s): held here until Redis answers", sid, why)
        if self._retry is None:
            self._retry = asyncio.get_running_loop().call_later(RELEASE_RETRY, self._retry_releases)

    def _released(self, sid: str) -> None:
        """A RELEASE of the session came back (let go, or found another process's or gone)."""
        if sid in self._held_back and sid not in self._releases:
            self._held_back.discard(sid)
            log.info("session %s: let go, Redis answering again", sid)

    def _retry_releases(self) -> None:
        self._retry = None
        self._kick()

    def _room(self) -> None:
        """Redis has room again: the releases held back while it was full are written now."""
        if self._releases:
            self._kick()
