"""Writing live sessions back into a Redis that lost its data.

Redis restarted without its data (no persistence, or a replica promoted empty) or a
``FLUSHALL``: every session live in a process is still whole in that process's memory,
but Redis knows none of them. Their next write finds no owner, no fencing counter and no
record. Ending them (``store_unavailable``) would lose every conversation; instead the
process that holds a session creates it in Redis again, history, state and counters
included, and it goes on. Only the replay log's frames up to then are gone: a resume from
before them is not recovered (PROTOCOL.md §7) and restores the conversation with ``history``.

A session may also be missing from Redis for a reason that must stand: it was ended, or
taken and let go, by another process while this one's lease had lapsed unnoticed. The
two are told apart by an *epoch*, a random value every process keeps under
``{key_prefix}epoch``: whoever finds it missing sets a new one. A session is written back
only if the epoch changed since this process made or took it, i.e. Redis lost its data
since; otherwise it is gone as before. The epoch a session is held under is read in the
round trip that made or took it, just after the CREATE or CLAIM (if that read fails, the next
read's): not the one this process last read before, or a session made between a loss and the
next read would be held under the epoch from before the loss, and written back after it ended
elsewhere. A Redis that loses its data between the two loses the session as well, which is then
not written back (it ends, resumable to a fresh session): the safe way. Sessions found gone
together share one read of the epoch, sent after they were found gone.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from connic.errors import StoreUnavailable
from connic.stores.redis.connection import ms, ttl
from connic.stores.redis.record import encode, encode_entry, holding
from connic.stores.redis.renewer import Renewer

if TYPE_CHECKING:
    from connic.agent import HistoryEntry
    from connic.session import ChatSession

__all__ = ["WriteBack", "epoch_key", "epoch_read"]

log = logging.getLogger("connic.stores.redis")


def epoch_key(prefix: str) -> str:
    """The key of the epoch: set once by the first process to find it missing, lost with Redis's data."""
    return f"{prefix}epoch"


def epoch_read(reply: asyncio.Future[Any]) -> str | None:
    """The epoch an :meth:`WriteBack._epoch_after` read found, if it came (None: not yet, or it failed)."""
    if not reply.done() or reply.cancelled() or reply.exception() is not None:
        return None
    epoch = reply.result()
    return epoch if isinstance(epoch, str) else None


def _retrieved(reply: asyncio.Future[Any]) -> None:
    if not reply.cancelled():
        reply.exception()


class WriteBack(Renewer):
    """Creating sessions in Redis: new ones, and live ones again once Redis lost its data (a store base class)."""

    def __init__(self) -> None:
        super().__init__()
        self._epoch: str | None = None  # the epoch in Redis, as last read
        self._epochs: dict[str, str] = {}  # session id: the epoch read first after this process made or took it
        # Session id: its ownership's number, made or taken here and no epoch read sent since.
        self._unconfirmed: dict[str, int] = {}
        self._ownerships = itertools.count()
        self._writing_back: dict[str, asyncio.Task[None]] = {}
        self._ended_meanwhile: set[str] = set()  # ended for good while being written back
        self._next_read: asyncio.Task[bool] | None = None  # the epoch read sessions found gone now will share
        self._reads: set[asyncio.Task[bool]] = set()  # those under way

    async def _create(self, session: ChatSession) -> None:
        """Create ``session`` in Redis, owned here (a new fencing token); StoreUnavailable if Redis has it already."""
        sid = session.id
        lease = ms(session.sessions.options.producer_timeout)
        record = session.record()
        entries = [encode_entry(entry) for entry in record.history]
        fence, epoch = await self._create_raw(sid, lease, encode(record), ttl(session), entries)
        self._hold(sid, fence, lease)
        self._owned(sid, epoch)
        self._saved[sid] = holding(record.history)

    async def _create_raw(
        self, sid: str, lease: int, record: str, record_ttl: int, entries: list[str]
    ) -> tuple[int, str | None]:
        """Run CREATE: the new fencing token, and the epoch read just after it (None if that failed)."""
        key = epoch_key(self.options.key_prefix)

        def build(pipe: Any) -> None:
            self._queue(pipe, "CREATE", self._keys(sid), [lease, record, record_ttl, *entries])
            # The epoch it is made under, read in the same round trip, after it (see the module's doc).
            pipe.set(key, secrets.token_hex(8), nx=True)
            pipe.get(key)

        fence, _, epoch = await self._pipeline(build)
        if isinstance(fence, Exception):
            raise StoreUnavailable(f"Redis failed ({type(fence).__name__})", detail=str(fence))
        if not fence:
            raise StoreUnavailable(f"session {sid} exists already in the store")
        return int(fence), epoch if isinstance(epoch, str) else None

    def _epoch_after(self) -> asyncio.Future[Any]:
        """The epoch, read in the shared pipeline after what was queued there so far this round (a claim)."""
        key = epoch_key(self.options.key_prefix)
        replies = [self._shared_reply("SET", key, secrets.token_hex(8), "NX"), self._shared_reply("GET", key)]
        for reply in replies:
            reply.add_done_callback(_retrieved)  # nobody may wait for it (the claim failed)
        return replies[1]

    def _owned(self, session_id: str, epoch: str | asyncio.Future[Any] | None = None) -> None:
        """The session is this process's from now on (made or taken): as of ``epoch``, read just after.

        Without it (or a read that failed), as of the epoch the next read finds.
        """
        if isinstance(epoch, asyncio.Future):
            epoch = epoch_read(epoch)
        if isinstance(epoch, str):
            self._epochs[session_id] = epoch
            self._unconfirmed.pop(session_id, None)
        else:
            self._epochs.pop(session_id, None)
            self._unconfirmed[session_id] = next(self._ownerships)

    async def _watch_epoch(self) -> bool:
        """Read the epoch (setting a new one if Redis has none); whether it differs from the one read before."""
        key = epoch_key(self.options.key_prefix)
        sent_after = dict(self._unconfirmed)  # the sessions this read is the first sent after their making

        def build(pipe: Any) -> None:
            pipe.set(key, secrets.token_hex(8), nx=True)  # whoever finds it missing first sets it
            pipe.get(key)

        results = await self._pipeline(build)
        if isinstance(results[1], Exception):
            raise StoreUnavailable(f"Redis failed ({type(results[1]).__name__})", detail=str(results[1]))
        epoch: str = results[1]
        changed = self._epoch is not None and epoch != self._epoch
        if changed:
            log.warning("redis store: Redis lost its data (a restart without it, or a FLUSHALL)")
        self._epoch = epoch
        for sid, ownership in sent_after.items():
            if self._unconfirmed.get(sid) == ownership:
                del self._unconfirmed[sid]
                self._epochs[sid] = epoch
        for held in (self._epochs, self._unconfirmed):
            for sid in [sid for sid in held if not self._held(sid)]:
                del held[sid]  # no longer owned here (let go or stopped)
        return changed

    def _held(self, sid: str) -> bool:
        """Whether this process owns the session, writes it back, or is to write its release."""
        return sid in self._fences or sid in self._writing_back or sid in self._releases or sid in self._releasing

    def _read_soon(self) -> asyncio.Task[bool]:
        """A read of the epoch sent after every session found gone so far: those found together share it.

        One read per session found gone was a thousand round trips (and a thousand
        pipelines waiting for the pool's connections) when Redis lost a thousand sessions.
        """
        if self._next_read is None:
            self._next_read = asyncio.create_task(self._read_next())
            self._reads.add(self._next_read)
            self._next_read.add_done_callback(self._read_done)
        return self._next_read

    async def _read_next(self) -> bool:
        self._next_read = None  # a session found gone from now on waits for a read sent after it
        return await self._watch_epoch()

    def _read_done(self, read: asyncio.Task[bool]) -> None:
        self._reads.discard(read)
        if not read.cancelled():
            read.exception()  # retrieved: every write-back waiting for it says how it failed

    async def _written_back(self, session_id: str) -> None:
        """Wait until the session is no longer being written back (whether that worked or not: never raises).

        Until its CREATE comes back the session owns nothing here: a message arriving meanwhile
        that took no token for it (a bucket is taken only by its owner) went past ``rate_limit``.
        """
        while (task := self._writing_back.get(session_id)) is not None:
            await asyncio.wait([task])  # not the task itself: cancelled (the store closing), it must not cancel this

    async def _last_writes(self) -> None:
        """Write what is queued before the store closes, the sessions being written back included (bounded).

        Cancelled, a write-back whose CREATE was on its way left the session in Redis owned by a
        stopped process until its lease ran out (a resume elsewhere waited that long, where a
        normal stop lets it go at once), and one not sent yet lost the session. Each is let
        finish, within the store's ``timeout``: it then lets its session go (or deletes it) as a
        stop does. A second round for the releases the first found gone (Redis lost its data
        just before the stop): they are written back, then let go.
        """
        for _ in range(2):
            tasks = self._write_back_tasks()
            if tasks:
                await asyncio.wait(tasks, timeout=self.options.timeout)
            try:
                async with asyncio.timeout(self.options.timeout):
                    await self.flush()
            except (TimeoutError, StoreUnavailable):
                log.warning("redis store: could not write everything before closing")
                return
            if not self._writing_back:
                return

    def _write_back_tasks(self) -> list[asyncio.Task[Any]]:
        """The write-backs under way and the epoch reads they wait for (cancelled when the store closes)."""
        return [*self._writing_back.values(), *self._reads]

    def _gone(self, sid: str) -> None:
        """Nobody owns the session and it cannot be taken back: written back if Redis lost its data, else it stops.

        Until that is known nothing of the session is written (the frames it logs meanwhile
        are dropped, as the log before them was: a resume from before them is not recovered).
        """
        session = self._live.get(sid)
        if session is None or sid in self._writing_back:
            return
        self._fences.pop(sid, None)
        replay = self._logs.get(sid)
        if replay is not None:
            replay.fence = None
        self._writing_back[sid] = asyncio.create_task(self._write_back(sid, session, self._read_soon()))

    async def _write_back(self, sid: str, session: ChatSession, read: asyncio.Task[bool]) -> None:
        written = False
        try:
            try:
                await asyncio.shield(read)
                lost = sid in self._epochs and self._epochs[sid] != self._epoch
                # Let go meanwhile (detached and idle: its record is what it would have written), it
                # is written back all the same, and let go then; ended for good, it is not.
                if lost and sid not in self._ended_meanwhile and self._live.get(sid) in (session, None):
                    await self._create(session)
                    written = True
                    log.warning("session %s: written back to Redis from this process (its replay log was lost)", sid)
            except StoreUnavailable as exc:
                log.warning("session %s: writing it back to Redis failed: %s", sid, exc.why)
        finally:
            del self._writing_back[sid]
            ended = sid in self._ended_meanwhile
            self._ended_meanwhile.discard(sid)
        if written and ended:
            # Its end (a goodbye) came while Redis created it again: deleted, as its end would have.
            fence = self._forget(sid)
            if fence is not None:
                self._deletes[sid] = fence
                self._kick()
            return
        if written and self._live.get(sid) is not session:
            self.release(session)  # let go while it was written back: let go now that Redis has it
            return
        if sid in self._fences:
            replay = self._logs.get(sid)
            if replay is not None:
                replay.fence = self._fences[sid][0]
                if replay.pending:
                    self._log_dirty(replay, True)
            return
        super()._gone(sid)

    def _gone_let_go(self, sid: str, release: tuple[int, str, Sequence[HistoryEntry], int, int]) -> None:
        """The last save of a session let go here found it gone: written back and let go if Redis lost its data.

        A detached session whose reply ended just after the loss, before anything else of it was
        written, is let go by that very batch: its release was its first write since.
        """
        if sid in self._writing_back or sid in self._live:
            return
        epoch = self._epochs.get(sid)
        read = self._read_soon()
        self._writing_back[sid] = asyncio.create_task(self._write_back_let_go(sid, epoch, release, read))

    async def _write_back_let_go(
        self,
        sid: str,
        epoch: str | None,
        release: tuple[int, str, Sequence[HistoryEntry], int, int],
        read: asyncio.Task[bool],
    ) -> None:
        _, record, entries, record_ttl, lease = release
        try:
            await asyncio.shield(read)
            if epoch is not None and epoch != self._epoch and sid not in self._live:
                encoded = [encode_entry(entry) for entry in entries]
                fence, _ = await self._create_raw(sid, lease, record, record_ttl, encoded)
                self._abandons[sid] = fence  # let go (RELEASE), as it was meant to be
                self._kick()
                log.warning(
                    "session %s: written back to Redis from this process and let go (its replay log was lost)", sid
                )
        except StoreUnavailable as exc:
            log.warning("session %s: writing it back to Redis failed: %s", sid, exc.why)
        finally:
            del self._writing_back[sid]

    def release(self, session: ChatSession) -> None:
        """Queue the session's last record and the end of this process's ownership (:class:`RedisStore`)."""
        raise NotImplementedError

    def _forget(self, session_id: str) -> int | None:
        """Drop all this process holds of the session (see :meth:`~connic.stores.redis.writer.Writer._forget`)."""
        self._epochs.pop(session_id, None)
        self._unconfirmed.pop(session_id, None)
        if session_id in self._writing_back:
            self._ended_meanwhile.add(session_id)  # its write-back must not bring it back
        return super()._forget(session_id)
