"""The ``redis`` store's lease renewer: the leases of the sessions and connections held by this process.

A task renews them every third of the shortest lease, in one pipeline, and reads the epoch
(:mod:`~connic.stores.redis.writeback`: whether Redis lost its data) each time. A shorter
lease taken while it sleeps (a connector with a shorter ``producer_timeout``) wakes it to
plan a shorter sleep, or that lease would run out first. A renewal
also checks that each session's history list holds as many entries as this process last
wrote: Redis restarted from an older snapshot keeps the epoch, and an idle session's list
stayed older until its next save (:data:`~connic.stores.redis.scripts.SAVE` checks its last
entry too). A renewal
also takes the sessions' takeover and end flags (:mod:`~connic.stores.redis.takeovers`) and
tells of the cancels waiting for them (:mod:`~connic.stores.redis.cancels`), in case their
pub/sub message was lost. A renewal refused for a lost lease stops this copy of the session
at once (another process owns it now); a session gone from Redis is written back, or stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from connic.errors import StoreUnavailable
from connic.stores.redis.connection import ttl
from connic.stores.redis.keys import every_key
from connic.stores.redis.record import Listed
from connic.stores.redis.writer import Writer

__all__ = ["Renewer"]

log = logging.getLogger("connic.stores.redis")


class Renewer(Writer):
    """What :class:`~connic.stores.redis.RedisStore` renews in the background (a base class of it)."""

    def __init__(self) -> None:
        super().__init__()
        self._due = 0.0  # loop time of the next renewal, while the renewer sleeps until it
        self._sooner = asyncio.Event()  # set when a lease taken meanwhile moved _due earlier

    def _hold(self, session_id: str, fence: int, lease: int) -> None:
        """The session is owned here from now on, with ``fence`` and a lease of ``lease`` ms, renewed in time."""
        self._fences[session_id] = (fence, lease)
        self._leased(lease)

    def _leased(self, lease: int) -> None:
        """A lease of ``lease`` ms was just taken here: the next renewal comes a third of it from now at the latest.

        The renewer planned its sleep from the leases held when it went to sleep: a shorter
        one taken since (a connector with a shorter ``producer_timeout``) would run out first.
        """
        due = asyncio.get_running_loop().time() + lease / 3000
        if due < self._due:
            self._due = due
            self._sooner.set()

    def _limit_lease(self) -> int | None:
        """The lease (ms) of the limits' entries this process holds, if it holds any (none here)."""
        return None

    async def _renew_limits(self) -> None:
        """Renew the leases of the limits' entries this process holds (none here)."""

    async def _renewer(self) -> None:
        """Renew the lease of every session and connection held here, every third of the shortest lease."""
        while True:
            await self._until_due()
            await self._renew_limits()
            with contextlib.suppress(StoreUnavailable):  # the renewals below say so
                await self._watch_epoch()
            owned = list(self._fences.items())
            if not owned:
                continue

            listed = {sid: self._saved.get(sid) for sid, _ in owned}  # what each renewal checks the list against

            def build(
                pipe: Any, owned: list[tuple[str, tuple[int, int]]] = owned, listed: dict[str, Listed | None] = listed
            ) -> None:
                prefix = self.options.key_prefix
                for sid, (fence, lease) in owned:
                    session = self._live.get(sid)
                    held = listed[sid]
                    count = "" if held is None else held.count
                    args = [fence, lease, ttl(session) if session is not None else 0, count]
                    self._queue(pipe, "RENEW", every_key(prefix, sid), args)

            try:
                results = await self._pipeline(build)
            except StoreUnavailable as exc:
                log.warning("redis store: renewing %d lease(s) failed: %s", len(owned), exc.why)
                continue
            cancels: list[str] = []
            for (sid, (fence, _)), result in zip(owned, results, strict=True):
                if result == 0 and self._fences.get(sid, (0, 0))[0] == fence:
                    self._lost(sid)
                elif result == -1 and self._fences.get(sid, (0, 0))[0] == fence:
                    self._gone(sid)
                if not isinstance(result, int) or result <= 0:
                    continue
                # What a pub/sub message lost (the channel reconnecting) would have said.
                if result & 4:  # a client following it elsewhere said goodbye: it ends (its flag goes with it)
                    self._ended_elsewhere(sid)
                elif result & 2:  # a takeover
                    self._taken_over(sid)
                if result & 8:  # cancels passed from elsewhere, whether it is busy or not
                    cancels.append(sid)
                # Unless a save of it was written meanwhile: that one changed the list on purpose
                # (whether the renewal ran before or after it), and checks it itself.
                held = listed[sid]
                if result & 16 and not self._writing and held is not None and self._saved.get(sid) is held:
                    self._rewrite(sid, True)
            if cancels:
                self._cancels_listed(cancels)

    async def _until_due(self) -> None:
        """Sleep a third of the shortest lease held (1 s when none is), or less if a shorter one is taken meanwhile."""
        leases = [lease for _, lease in self._fences.values()]
        limit_lease = self._limit_lease()
        if limit_lease is not None:
            leases.append(limit_lease)
        loop = asyncio.get_running_loop()
        self._due = loop.time() + min(leases, default=3000) / 3000
        while (left := self._due - loop.time()) > 0:
            self._sooner.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._sooner.wait(), left)

    async def _watch_epoch(self) -> bool:
        """Whether Redis lost its data since it was last asked (:class:`~connic.stores.redis.writeback.WriteBack`)."""
        return False

    def _cancels_listed(self, session_ids: list[str]) -> None:
        """Cancels wait for these sessions: take them, in the background (none here).

        Not awaited: takes wait for one another (acted on in the order taken), each up to the
        store's ``timeout`` when Redis does not answer, and the next renewal would wait behind them.
        """

    def _taken_over(self, session_id: str) -> None:
        """A resume on another process took the session over (:class:`~connic.stores.redis.takeovers.Takeovers`)."""

    def _ended_elsewhere(self, session_id: str) -> None:
        """A client following the session elsewhere said goodbye (:class:`~connic.stores.redis.takeovers.Takeovers`)."""
