"""The ``redis`` store's reading of Redis's clock: the deadlines of calls Redis may run after their caller gave up.

A call that gets no answer within the store's ``timeout`` fails, but Redis may still run it,
later: a stalled Redis (stopped, or a long fork) runs what was sent meanwhile once it runs
again. A call whose effect nobody may count on once its caller gave up carries a deadline on
Redis's clock, and its script then changes nothing: a claim (it took a lapsed lease for a
fencing token its process never learned, :data:`~connic.stores.redis.scripts.CLAIM`), a rate
token's take (it charged a message that was never acked, and charged it again when resent,
:data:`~connic.stores.redis.limit_scripts.TAKE`). Redis's clock is read (``TIME``) as the store
starts, and again when a call came back past its deadline.
"""

from __future__ import annotations

import asyncio
import logging

from connic.errors import StoreUnavailable
from connic.stores.redis.connection import Connection

__all__ = ["Clock"]

log = logging.getLogger("connic.stores.redis")


class Clock(Connection):
    """Redis's clock as this process last read it (a base class of :class:`~connic.stores.redis.RedisStore`)."""

    def __init__(self) -> None:
        super().__init__()
        self._clock: float | None = None  # Redis's clock minus the event loop's (ms): None until read

    async def _read_clock(self) -> None:
        """Learn how far Redis's clock is from the event loop's, for the deadlines of calls (:meth:`_deadline`).

        Redis refusing ``TIME`` (a managed one may rename it) leaves the calls without a deadline.
        """
        loop = asyncio.get_running_loop()
        sent = loop.time()
        try:
            seconds, micros = await self._call(self._client().time())
        except StoreUnavailable as exc:
            log.warning(
                "redis store: reading Redis's clock failed (%s): claims and rate tokens carry no deadline", exc.why
            )
            return
        self._clock_seen(int(seconds) * 1000 + int(micros) / 1000, (sent + loop.time()) / 2)

    def _clock_seen(self, redis_ms: float, at: float | None = None) -> None:
        """Redis's clock read ``redis_ms`` at loop time ``at`` (now: a reply just read, so no earlier than that)."""
        at = asyncio.get_running_loop().time() if at is None else at
        self._clock = redis_ms - at * 1000

    def _deadline(self) -> str:
        """The latest time (Redis's clock, ms) a call sent now may act, or '' (the clock unknown).

        Half the store's ``timeout`` from now: a call Redis runs within it is answered before
        its caller gives up on it (and the clock is read within as much); one it runs later
        (sent while Redis stalled) changes nothing.
        """
        if self._clock is None:
            return ""
        now = asyncio.get_running_loop().time() * 1000 + self._clock
        return str(int(now + self.options.timeout * 500))
