"""Following the replay logs other processes write: one blocking ``XREAD`` for all of them.

A resume that lands on a process while another still answers the session follows
that process's frames until it lets the session go (:meth:`RedisStore.take
<connic.stores.redis.RedisStore.take>`). One ``XREAD BLOCK`` per followed session
would hold a pooled connection each and cost a call per frame: a burst of resumes
(a load balancer moving a thousand clients at once) would spend the process on
those calls. Here one task holds one connection and reads every followed log in
one ``XREAD``; a batch of frames costs one call however many sessions it spans,
and a session starting to be followed unblocks the read under way
(``CLIENT UNBLOCK``) so its next read includes it.

All keys are read on one connection, so this assumes one Redis server (or Valkey,
or a single-shard deployment), as the store's clients do.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from typing import TYPE_CHECKING, Any

from connic.errors import StoreUnavailable
from connic.stores.redis.connection import _pack
from connic.stores.redis.log import Logged, logged

if TYPE_CHECKING:
    from connic.stores.redis.connection import Connection

__all__ = ["BLOCK_MS", "Follower", "Following"]

log = logging.getLogger("connic.stores.redis")

BLOCK_MS = 200
"""The longest one ``XREAD`` blocks when no followed log grows (a new follower cuts it short)."""


class Following:
    """One followed log: the frames read for it and not yet taken (:meth:`Follower.next`)."""

    __slots__ = ("cursor", "error", "frames", "key", "told", "waiter")

    def __init__(self, key: str, cursor: int) -> None:
        self.key = key
        self.cursor = cursor  # the seq of the newest frame read for it
        self.frames: Logged = []
        self.error: StoreUnavailable | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.told = False  # a newer resume may have claimed the session: claim (and learn it) at once

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)


class Follower:
    """The reader of every log this process follows (one task, one connection)."""

    def __init__(self, store: Connection) -> None:
        self._store = store
        # Each log's followers: two resumes of one session may follow it at once (a client
        # resuming again while its first resume's socket is half-open), each from its own seq.
        self._follows: dict[str, list[Following]] = {}
        self._changed = asyncio.Event()  # a log to follow was added while none was
        self._reading: set[str] | None = None  # the keys of the XREAD under way
        self._client_id: int | None = None  # of the reading connection, for CLIENT UNBLOCK
        self._unblocking: asyncio.Task[None] | None = None

    def follow(self, key: str, cursor: int) -> Following:
        """Start following the log ``key`` after ``cursor``."""
        following = Following(key, cursor)
        self._follows.setdefault(key, []).append(following)
        self._changed.set()
        if self._reading is not None and key not in self._reading:
            self._unblock()
        return following

    def tell(self, key: str) -> None:
        """A newer resume may have claimed the session whose log is ``key``: its followers here claim again at once."""
        for following in self._follows.get(key, ()):
            following.told = True
            following._wake()

    def stop(self, following: Following) -> None:
        """Stop following (the next read leaves the log out)."""
        followers = self._follows.get(following.key, [])
        if following in followers:
            followers.remove(following)
            if not followers:
                del self._follows[following.key]

    async def next(self, following: Following, seconds: float) -> Logged:
        """The frames read for ``following`` since the last call, waiting up to ``seconds`` for some.

        Raises StoreUnavailable when reading failed meanwhile.
        """
        if not following.frames and following.error is None:
            following.waiter = asyncio.get_running_loop().create_future()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(seconds):
                    await following.waiter
            following.waiter = None
        if following.error is not None:
            error, following.error = following.error, None
            raise error
        frames, following.frames = following.frames, []
        return frames

    async def run(self) -> None:
        """Read every followed log, for as long as the store runs (a task)."""
        conn: Any = None
        try:
            while True:
                if not self._follows:
                    # Not kept while nothing is followed: a Redis with an idle `timeout` (managed ones
                    # often set one) closes it, and the next resume to follow would fail at its first read.
                    self._changed.clear()  # before the drop's await: a follow meanwhile sets it again
                    await self._drop(conn)
                    conn = None
                    await self._changed.wait()
                    continue
                try:
                    if conn is None:
                        conn = await self._connect()
                        if not self._follows:
                            # Every follow stopped while connecting (a slow handshake under load): an
                            # XREAD naming no stream is a syntax error, which would fail the follows
                            # added while it is under way (StoreUnavailable to their resumes).
                            continue
                    reply = await self._read(conn)
                except StoreUnavailable as exc:
                    await self._drop(conn)
                    conn = None
                    for each in self._follows.values():
                        for failed in each:
                            failed.error = exc
                            failed._wake()
                    await asyncio.sleep(0.1)  # not a busy loop while Redis is down
                    continue
                # Redis 6+ answers a map (RESP3) to a raw read, older servers a list of pairs.
                for key, entries in reply.items() if isinstance(reply, dict) else reply or ():
                    followers = self._follows.get(key)
                    if not followers or not entries:
                        continue
                    read = logged(entries)
                    for following in followers:
                        # Only what follows its cursor: the entry holding its next frame holds older
                        # ones too, and a read sent before it followed (the log stopped and followed
                        # again meanwhile) may hold frames it has already.
                        new = [(seq, frame) for seq, frame in read if seq > following.cursor]
                        if new:
                            following.frames += new
                            following.cursor = read[-1][0]
                            following._wake()
        finally:
            await self._drop(conn)

    async def _connect(self) -> Any:
        """A connection of the blocking pool (no socket timeout), held by this reader, and its client id."""
        pool = self._store._blocking_client().connection_pool

        async def connect() -> Any:
            conn = await pool.get_connection()
            try:
                await conn.send_command("CLIENT", "ID")
                self._client_id = int(await conn.read_response())
            except BaseException:
                await conn.disconnect()
                await pool.release(conn)
                raise
            return conn

        return await self._store._call(connect())

    async def _drop(self, conn: Any) -> None:
        """Give the reading connection back, closed: a read cut short leaves a reply unread on it."""
        self._client_id = None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.disconnect()
            client = self._store._blocking
            if client is not None:
                await client.connection_pool.release(conn)

    async def _read(self, conn: Any) -> Any:
        # Each log from its least advanced follower (the others skip what they have).
        follows = {key: min(f.cursor for f in followers) for key, followers in self._follows.items()}
        command: list[str | int] = ["XREAD", "BLOCK", BLOCK_MS, "STREAMS"]
        command += list(follows)
        command += [f"0-{cursor}" for cursor in follows.values()]
        self._reading = set(follows)
        try:

            async def read() -> Any:
                await conn.send_packed_command(_pack(command), check_health=False)
                return await conn.read_response(timeout=math.inf)

            return await self._store._call(read(), self._store.options.timeout + BLOCK_MS / 1000)
        except BaseException:
            # Its reply may come later: the connection cannot be reused.
            await conn.disconnect()
            raise
        finally:
            self._reading = None

    def _unblock(self) -> None:
        """Cut the read under way short, so that the next one reads the logs added since."""
        if self._client_id is None or (self._unblocking is not None and not self._unblocking.done()):
            return
        self._unblocking = asyncio.create_task(self._send_unblock(self._client_id))

    async def _send_unblock(self, client_id: int) -> None:
        # Again while the read under way (a newer one, by then) still leaves out a followed log.
        while client_id == self._client_id and self._reading is not None and self._follows.keys() - self._reading:
            try:
                await self._store._call(self._store._client().execute_command("CLIENT", "UNBLOCK", client_id))
            except StoreUnavailable as exc:
                # The read ends within BLOCK_MS anyway: the new logs' frames come that much later.
                log.debug("redis store: CLIENT UNBLOCK failed: %s", exc.why)
                return
