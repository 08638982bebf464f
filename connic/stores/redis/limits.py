"""The ``redis`` store's limits across the fleet: a session's ``rate_limit`` and ``max_connections_per_ip``.

- The **rate limit** is a token bucket in Redis, one per session under its hash tag
  (:func:`~connic.stores.redis.keys.rate_key`), taken by the ``TAKE`` script on
  Redis's clock and only by the process owning the session: a session that moves to
  another process keeps the tokens it spent (a bucket in the process would start full).
- **Connections per address** are a sorted set per address
  (:func:`~connic.stores.redis.keys.address_key`) of connection ids scored by their
  lease deadline. The process holding a connection renews its lease (``connection_lease``)
  every third of it and removes it when the connection ends; a process that dies stops
  renewing, so its connections stop counting within one lease. When Redis lost its data
  (:mod:`~connic.stores.redis.writeback`'s epoch), or has room again after it was full
  (:mod:`~connic.stores.redis.full`), each process adds its open ones again.

``max_messages`` needs nothing here: the count is in the session's record, saved when a
message is accepted, and taken over with it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import uuid
from typing import Any

from connic.errors import StoreUnavailable
from connic.stores import RateBucket
from connic.stores.redis import limit_scripts
from connic.stores.redis.connection import ms
from connic.stores.redis.keys import address_key, rate_key
from connic.stores.redis.renewer import Renewer

__all__ = ["Limits", "RedisRateBucket"]

log = logging.getLogger("connic.stores.redis")


class RedisRateBucket:
    """A session's ``rate_limit`` bucket, in Redis (:meth:`Limits.take_token`)."""

    __slots__ = ("_store", "messages", "per", "session_id")

    def __init__(self, store: Limits, session_id: str, messages: int, per: float) -> None:
        self._store = store
        self.session_id = session_id
        self.messages = messages
        self.per = per

    async def acquire(self) -> float:
        """Take a token in Redis: 0.0, or the seconds until one is available."""
        return await self._store.take_token(self.session_id, self.messages, self.per)


class Limits(Renewer):
    """What :class:`~connic.stores.redis.RedisStore` counts across processes (a base class of it)."""

    def __init__(self) -> None:
        super().__init__()
        self._process = uuid.uuid4().hex  # the ids of this process's connections start with it
        self._numbers = itertools.count(1)
        self._connections: dict[str, str] = {}  # connection id: its address's key
        # (address key, connection id, whether a call adding it may still run: IP_RENEW or IP_ENTER) to count out
        self._closed: list[tuple[str, str, bool]] = []
        self._count_again = False  # Redis lost its data: the connections open here are to be counted in again
        self._adding_until = 0.0  # loop time until which an IP_RENEW adding connections again may still run

    def rate_bucket(self, session_id: str, messages: int, per: float) -> RateBucket:
        """The session's bucket in Redis, shared by whichever process serves it."""
        return RedisRateBucket(self, session_id, messages, per)

    async def take_token(self, session_id: str, messages: int, per: float) -> float:
        """Take a token from the session's bucket: 0.0, or the seconds until one is available.

        Only while this process owns the session; when it does not (any more), 0.0 and the
        session is let go here, so its caller finds it ended: its connection is closed with
        ``session_taken_over`` when another process owns it, ``store_unavailable`` when the
        session is gone from Redis (a lapsed lease nobody claimed is taken back, as a write
        does). StoreUnavailable when Redis does not answer.
        """
        # At most twice, and once more after a take run past its deadline: found gone, the session may
        # be written back (Redis lost its data), and the token is then taken from the bucket written
        # back with it. Until its CREATE comes back it owns nothing here: a message arriving
        # meanwhile waits for it rather than take no token.
        late = False
        for _ in range(3):
            await self._written_back(session_id)
            owned = self._fences.get(session_id)
            if owned is None:
                return 0.0
            keys = [*self._keys(session_id)[:3], rate_key(self.options.key_prefix, session_id)]
            args = [owned[0], messages, ms(per), owned[1], self._deadline()]
            wait = int(await self._call(self._scripts["TAKE"](keys=keys, args=args)))
            if wait >= 0:
                return wait / 1000
            if wait == -3:
                # Run after its deadline though answered in time: Redis's clock is not what was read
                # (read again, for one more try), or Redis takes most of `timeout` to answer.
                if late:
                    raise StoreUnavailable("Redis answered too late")
                late = True
                await self._read_clock()
                continue
            if self._fences.get(session_id, (0, 0))[0] != owned[0]:
                continue  # found gone meanwhile (a renewal): written back, or stopped
            if wait == -1:
                self._lost(session_id)
                return 0.0
            self._gone(session_id)
        return 0.0

    async def admit_connection(self, address: str, limit: int) -> str | None:
        """Count a connection from ``address`` in unless ``limit`` are open from it on all processes."""
        connection = f"{self._process}:{next(self._numbers)}"
        key = address_key(self.options.key_prefix, address)
        lease = ms(self.options.connection_lease)
        keys = [key, limit_scripts.closed_key(key)]
        try:
            entered = await self._call(self._scripts["IP_ENTER"](keys=keys, args=[limit, lease, connection]))
        except BaseException:
            # Timed out or cancelled, the call may still run in Redis, later: it would count in a
            # connection that never opened, and the address got 429 with nothing open, for a lease.
            self._closed.append((key, connection, True))
            self._kick()
            raise
        if not entered:
            return None
        self._connections[connection] = key
        self._leased(lease)
        return connection

    def release_connection(self, ticket: str) -> None:
        """Count the connection out (in the background; if that write fails, its lease runs out)."""
        key = self._connections.pop(ticket, None)
        if key is not None:
            self._closed.append((key, ticket, asyncio.get_running_loop().time() < self._adding_until))
            self._kick()

    def _counted_out(self) -> list[list[str | int]]:
        closed, self._closed = self._closed, []
        # A plain ZREM, unless an IP_RENEW or IP_ENTER adding the connection may run after it (one that
        # timed out here may still reach Redis): then IP_LEAVE, which keeps it from being added again.
        commands: list[list[str | int]] = []
        for key, ticket, adding in closed:
            if adding:
                leave = self._scripts["IP_LEAVE"].sha
                lease = ms(self.options.connection_lease)
                commands.append(["EVALSHA", leave, 2, key, limit_scripts.closed_key(key), ticket, lease])
            else:
                commands.append(["ZREM", key, ticket])
        return commands

    def _room(self) -> None:
        """Redis has room again after it was full: the connections open here are counted in again.

        It refused their renewals meanwhile (a ZADD needs room): once it was full for longer than
        ``connection_lease`` their entries had lapsed, and renewing only the entries still there
        left them uncounted for as long as they stayed open.
        """
        super()._room()
        if self._connections:
            self._count_again = True

    def _limit_lease(self) -> int | None:
        return ms(self.options.connection_lease) if self._connections else None

    async def _watch_epoch(self) -> bool:
        """Whether Redis lost its data since it was last asked; if so, count the connections open here in again.

        Every process finds the loss at its next read of the epoch (every third of the shortest
        lease it holds, or sooner when a write finds a session gone), and counts its own in.
        """
        changed = await super()._watch_epoch()
        if changed and self._connections:
            self._count_again = True
            await self._renew_limits()
        return changed

    async def _renew_limits(self) -> None:
        """Renew the leases of the connections open here, one script call per address (added again after a loss)."""
        if not self._connections:
            self._count_again = False
            return
        again = self._count_again
        by_address: dict[str, list[str]] = {}
        for connection, key in self._connections.items():
            by_address.setdefault(key, []).append(connection)
        lease = ms(self.options.connection_lease)

        def build(pipe: Any) -> None:
            for key, connections in by_address.items():
                keys = [key, limit_scripts.closed_key(key)]
                self._queue(pipe, "IP_RENEW", keys, [lease, "1" if again else "0", *connections])

        if again:
            # A connection closing from now on may be counted out before this runs in Redis, even
            # after it timed out here: counted out so that this does not add it again (IP_LEAVE).
            loop = asyncio.get_running_loop()
            self._adding_until = max(self._adding_until, loop.time() + self.options.connection_lease)
        try:
            await self._pipeline(build)
        except StoreUnavailable as exc:
            # Added again or not, the next renewal tries again.
            log.warning("redis store: renewing %d connection lease(s) failed: %s", len(self._connections), exc.why)
            return
        if again:
            self._count_again = False
