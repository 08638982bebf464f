"""The ``redis`` store: sessions kept in Redis (or Valkey), shared by every connic process.

``[store] use = "redis"`` (``pip install 'connic[redis]'``). Each session has,
under one hash tag (:func:`~connic.stores.redis.scripts.session_keys`):

- its **record** (:class:`~connic.stores.SessionRecord`'s scalars as JSON), written
  when it is created, after every exchange, when it detaches and when this process
  lets it go; it expires ``session_timeout + resume_window`` after the last write (only
  ``resume_window`` once it was let go detached);
- its **history**, a list of one JSON array per entry, written in the same script as
  the record: a save appends the entries added since this process last saved the
  session and trims the list to the entries the session holds (the whole list is
  written only when what it holds is unknown), so that an exchange costs Redis and
  connic what it adds, not the whole conversation again; it expires with the record;
- its **replay log**, a stream of one entry per write (its frames, each with its seq;
  the entry's id ``0-<its newest seq>``), trimmed to the entries that hold the newest
  ``replay_buffer`` frames (:mod:`~connic.stores.redis.log`);
- its **owner**, a fencing token held with a lease of ``producer_timeout`` by the
  one process serving it, renewed while it is live there. Every write checks the
  token in the same Lua script, so a process that lost its lease writes nothing.

A session is live in one process at a time. When it is detached and idle the
owner saves it and lets it go; a resume on any process then takes it
(:meth:`RedisStore.take`) and the core rebuilds it. Appends, saves and releases
are queued and written by one background task, one pipeline per round of the
event loop, so a streamed reply never waits on a round trip per chunk.

The parts, one module each: :mod:`~connic.stores.redis.connection` (the clients,
bounded calls, whether Redis is up), :mod:`~connic.stores.redis.writer` (the
background writer and lease renewer), :mod:`~connic.stores.redis.cancels` (cancels
across processes), :mod:`~connic.stores.redis.takeovers` (a resume elsewhere taking
over the owner's connection, or its client's goodbye ending the session there),
:mod:`~connic.stores.redis.limits` (the rate limit and connections per address across
processes), :mod:`~connic.stores.redis.log` (the replay log),
:mod:`~connic.stores.redis.record` (the record's JSON) and
:mod:`~connic.stores.redis.scripts` (the Lua scripts).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from functools import partial
from typing import TYPE_CHECKING, Any

import attrs

from connic.errors import StoreUnavailable
from connic.frames import MessageId
from connic.stores import Follow, ReplayLog, SessionRecord, SessionStore
from connic.stores.redis import scripts
from connic.stores.redis.connection import check_url, ms, ttl
from connic.stores.redis.follower import Follower, Following
from connic.stores.redis.limits import Limits
from connic.stores.redis.log import RedisReplayLog, frames_after, logged, may_end, unfinished
from connic.stores.redis.record import decode, encode, encode_entry
from connic.stores.redis.takeovers import Takeovers

if TYPE_CHECKING:
    from connic.session import ChatSession

__all__ = ["RedisReplayLog", "RedisStore"]

log = logging.getLogger("connic.stores.redis")

_POLL = 0.05  # seconds between attempts to take a session another process still owns
_FOLLOW_WAIT = 0.2  # seconds a follower waits for frames before trying again to take the session
# An owner just told that its connection is taken over lets an idle session go within a few
# milliseconds: the follower's first reads after telling it wait this much less, so that the
# new connection's first message does not wait a whole _FOLLOW_WAIT (a claim each: bounded).
_TOLD_WAIT = 0.02
_TOLD_TRIES = 5
_UNREADABLE = (ValueError, TypeError, KeyError, AttributeError)  # what a record or frame that does not decode raises


def _positive(instance: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if not value > 0:
        raise ValueError(f"{attribute.name} must be > 0, got {value!r}")


def _redis_url(instance: object, attribute: attrs.Attribute[Any], value: str) -> None:
    # What start() would refuse, refused by `connic check` too. A query parameter redis-py does
    # not know is found only by making a connection (start() does).
    try:
        check_url(value)
        from redis.connection import parse_url

        parse_url(value)  # type: ignore[no-untyped-call]  # ValueError: not redis://, rediss:// or unix://
    except ImportError:
        return  # start() says that redis-py is missing
    except ValueError as exc:
        raise ValueError(f"{attribute.name}: {exc}") from None


class RedisStore(Limits, Takeovers, SessionStore):
    """Sessions in Redis: durable, resumable on any process that shares the server."""

    durable = True

    @attrs.frozen
    class Options:
        """The ``[store]`` keys of ``use = "redis"`` (docs/configuration.md)."""

        url: str = attrs.field(default="redis://127.0.0.1:6379/0", validator=_redis_url)
        key_prefix: str = "connic:"
        timeout: float = attrs.field(default=2.0, validator=_positive)
        connection_lease: float = attrs.field(default=10.0, validator=_positive)
        max_connections: int = attrs.field(default=100, validator=_positive)

    options: Options

    def __init__(self, options: Options | None = None) -> None:
        SessionStore.__init__(self, options if options is not None else RedisStore.Options())
        Limits.__init__(self)  # and, through it, every other base but SessionStore
        self._tasks: list[asyncio.Task[None]] = []
        self._follower = Follower(self)

    # --- life cycle -------------------------------------------------------------

    async def start(self) -> None:
        """Connect, check that Redis answers, and start the writer, the lease renewer and the pub/sub listener."""
        await self.connect()
        self._wake = asyncio.Event()
        self._tasks = [
            asyncio.create_task(self._writer()),
            asyncio.create_task(self._renewer()),
            asyncio.create_task(self._listen()),
            asyncio.create_task(self._follower.run()),
        ]

    async def close(self) -> None:
        """Write what is queued (bounded by ``timeout``), then disconnect."""
        if self._redis is None:
            return
        try:
            async with asyncio.timeout(self.options.timeout):
                await self.flush()
        except (TimeoutError, StoreUnavailable):
            log.warning("redis store: could not write everything before closing")
        self._closing = True
        self._kick()  # the writer ends after the batch it may be writing
        self._tasks[1].cancel()  # the renewer
        self._tasks[2].cancel()  # the pub/sub listener (cancels and takeovers)
        self._tasks[3].cancel()  # the follower
        for task in self._cancelling:
            task.cancel()
        # Bounded: a task that redis-py kept from seeing its cancellation must not hang the stop.
        _, pending = await asyncio.wait(self._tasks, timeout=self.options.timeout)
        for task in pending:
            task.cancel()
        self._tasks = []
        await self.disconnect()

    # --- the SessionStore interface ----------------------------------------------

    async def add(self, session: ChatSession) -> None:
        """Hold a session live here: a new one is created in Redis; a taken one is already owned."""
        sid = session.id
        if sid not in self._fences:
            opts = session.sessions.options
            lease = ms(opts.producer_timeout)
            keys = self._keys(sid)
            record = session.record()
            entries = [encode_entry(entry) for entry in record.history]
            fence = await self._call(
                self._scripts["CREATE"](keys=keys, args=[lease, encode(record), ttl(session), *entries])
            )
            if not fence:
                raise StoreUnavailable(f"session {sid} exists already in the store")
            self._fences[sid] = (int(fence), lease)
            self._saved[sid] = record.history[-1] if record.history else None
        self._live[sid] = session
        replay = session.log
        if isinstance(replay, RedisReplayLog):
            replay.fence = self._fences[sid][0]
            replay.last = max(replay.last, session.seq)
            self._logs[sid] = replay
        # In the background: their answers (not_found) come a round trip later, numbered after
        # what the caller numbers first (from the client's last seq, a dead owner's lost replies).
        self._take_waiting_cancels(sid)

    async def get(self, session_id: str) -> ChatSession | None:
        """The session if it is live in this process (else :meth:`load` and :meth:`take`)."""
        return self._live.get(session_id)

    def discard(self, session_id: str) -> None:
        """The session ended for good: delete it from Redis (in the background)."""
        fence = self._forget(session_id)
        if fence is not None:
            self._deletes[session_id] = fence
            self._kick()

    def _forget(self, session_id: str) -> int | None:
        """Drop all this process holds of the session, nothing of it written; its fence if it owned it."""
        self._live.pop(session_id, None)
        self._logs.pop(session_id, None)
        self._dirty_logs.pop(session_id, None)
        self._dirty.discard(session_id)
        self._saved.pop(session_id, None)
        self._cancels_waiting.discard(session_id)
        owned = self._fences.pop(session_id, None)
        return owned[0] if owned is not None else None

    def save(self, session: ChatSession) -> None:
        """Queue writing the session's record (and letting it go when it is detached and idle)."""
        if session.id in self._live:
            self._dirty.add(session.id)
            self._kick_soon()

    def release(self, session: ChatSession) -> None:
        """Queue the session's last record and the end of this process's ownership."""
        sid = session.id
        self._live.pop(sid, None)
        self._logs.pop(sid, None)
        self._dirty.discard(sid)
        owned = self._fences.pop(sid, None)
        if owned is not None:
            window = ms(session.sessions.options.resume_window)
            # The history's entries are written by the writer, from what it last wrote of them.
            record = session.record()
            self._releases[sid] = (owned[0], encode(record), record.history, window)
            self._kick()

    def abandon(self, session_id: str, why: str) -> None:
        """Taking the session over failed after the claim: stop owning it, and let it go in Redis (in the background).

        Its renewal stops at once, so that its lease runs out within ``producer_timeout`` even
        when letting it go fails too (Redis itself being what failed); nothing of it is written.
        """
        fence = self._forget(session_id)
        if fence is not None:
            log.warning("session %s: taking it over failed (%s): let go", session_id, why)
            self._abandons[session_id] = fence
            self._kick()

    async def load(self, session_id: str) -> SessionRecord | None:
        """The session's record as Redis has it (after writing what this process queued), without its history.

        Only its label and token are wanted (to check a resume); :meth:`take` reads the rest.
        StoreUnavailable when the record does not decode (it stays in Redis as it is).
        """
        await self.flush()
        data = await self._shared("GET", self._keys(session_id)[2])
        if data is None:
            return None
        try:
            return decode(data, ())[0]
        except _UNREADABLE as exc:
            log.warning("session %s: its record in Redis does not decode: %s", session_id, exc)
            raise StoreUnavailable("this session's record in the store cannot be read") from exc

    async def take(
        self,
        session_id: str,
        wait: float,
        follow: Follow | None = None,
        after: int = 0,
        *,
        label: str | None = None,
        token: str | None = None,
    ) -> SessionRecord | None:
        """Own the session once its owner lets it go; its record then.

        Without ``follow`` this polls, for up to ``wait`` seconds. With it, it reads the
        log after ``after``, then follows it (:class:`~connic.stores.redis.follower.Follower`)
        handing ``follow`` each new frame and trying to take the session between reads, for
        as long as the owner holds it: its lease (``wait`` long, renewed while it lives) is
        what ends the wait. ``label`` and ``token`` are checked by the first claim, in the same
        round trip that reads the log: a resume costs one round trip before its first frame.
        When they are given and a claim finds another owner, it tells the owner to end the
        session's connection there (:mod:`~connic.stores.redis.takeovers`), once per owner.
        """
        await self.flush()
        check: list[str | int] = ["", ""]
        if label is not None and token is not None:
            check = [label, hashlib.sha1(token.encode("utf-8", "surrogatepass")).hexdigest()]
        followed: list[Following] = []
        if follow is not None:
            self._follow_leases[session_id] = ms(wait)
        try:
            return await self._take(session_id, wait, follow, after, check, followed)
        finally:
            self._follow_leases.pop(session_id, None)
            for following in followed:
                self._follower.stop(following)

    async def _take(
        self,
        session_id: str,
        wait: float,
        follow: Follow | None,
        after: int,
        check: list[str | int],
        followed: list[Following],
    ) -> SessionRecord | None:
        """:meth:`take`, the logs it follows put in ``followed`` (for it to stop following them)."""
        prefix = self.options.key_prefix
        keys = scripts.every_key(prefix, session_id)  # a goodbye elsewhere found: every key goes
        # A resume whose token the claim checks takes the owner's connection over: the claim tells
        # each owner it finds once (the first; another that took the session meanwhile).
        signal: list[str | int] = [scripts.takeover_channel(prefix), session_id] if check[0] else ["", ""]
        told = ""  # the fence of the owner last told
        quick = 0  # follow reads left that wait _TOLD_WAIT
        lease = ms(wait)
        deadline = time.monotonic() + wait
        cursor: int | None = None  # the seq handed to follow so far, once following
        claim = True  # try to take it now (at first; then after a read that found no frame, or a reply's end)
        result: Any = None
        while True:
            if claim:
                # The first attempt of a resume that follows also reads the log after ``after``.
                read: str | int = after if follow is not None and cursor is None else ""
                claim_reply = self._shared_script("CLAIM", keys, [lease, read, *check, *signal, told])
                try:
                    result = await self._call(asyncio.shield(claim_reply))
                except BaseException:
                    # Cancelled (the resume's client went away) or out of time with the claim sent:
                    # Redis may run it all the same, and its owner key would then name this process,
                    # which never learns its fence, so nobody renews or releases it and every resume
                    # waits producer_timeout for it to run out. Its reply, when it comes, lets it go.
                    claim_reply.add_done_callback(partial(self._claimed_unseen, session_id))
                    raise
                fence = int(result[0])
                if fence == -2:
                    log.info("session %s: its client said goodbye while no process owned it: ended", session_id)
                    return None
                if fence == -1:
                    return None
                if fence == 0:
                    if signal[0] and result[1] != told:  # this claim told the owner
                        quick = _TOLD_TRIES
                    told = result[1]
                if fence > 0:
                    self._fences[session_id] = (fence, lease)
                    if int(result[4]):  # taken once the session is live here (add)
                        self._cancels_waiting.add(session_id)
                    try:
                        return await self._taken(session_id, result[1], int(result[2]), result[3])
                    except asyncio.CancelledError:
                        self.abandon(session_id, "cancelled")
                        raise
                    except Exception as exc:
                        cause = exc.__cause__  # what did not decode, for the log (the client is told less)
                        why = exc.why if isinstance(exc, StoreUnavailable) else str(exc)
                        self.abandon(session_id, f"{why}: {cause}" if cause is not None else why)
                        if isinstance(exc, StoreUnavailable):
                            raise
                        # A record that decodes but does not fit (a seq that is no number): as unreadable.
                        raise StoreUnavailable("this session's record in the store cannot be read") from exc
            if follow is None and time.monotonic() >= deadline:
                log.warning("session %s: its owner did not let it go within %g s", session_id, wait)
                return None
            if follow is None:
                await asyncio.sleep(_POLL)
            elif cursor is None:
                read_frames = logged(result[2])
                frames = frames_after(read_frames, after)
                cursor = read_frames[-1][0] if read_frames else after
                follow(frames, cursor)
                followed.append(self._follower.follow(keys[3], cursor))
            else:
                read_frames = await self._follower.next(followed[0], _TOLD_WAIT if quick else _FOLLOW_WAIT)
                quick = max(0, quick - 1)
                claim = True
                if read_frames:
                    frames = frames_after(read_frames, cursor)
                    if frames is None:
                        log.warning("session %s: frames trimmed before they could be followed", session_id)
                        return None  # never a gap
                    cursor = read_frames[-1][0]
                    follow(frames, cursor)
                    # The owner lets the session go only once a reply ended: until a frame that may
                    # end one comes, reading on is enough (half the round trips per followed frame).
                    claim = any(may_end(frame) for frame in frames)

    def _claimed_unseen(self, session_id: str, reply: asyncio.Future[Any]) -> None:
        """A claim's reply that came after its caller gave up: a session it took is let go at once (RELEASE)."""
        if reply.cancelled() or reply.exception() is not None:
            return  # not sent, or Redis failed: whatever it did, the lease runs out
        fence = int(reply.result()[0])
        if fence > 0:
            log.warning("session %s: claimed after its resume gave up: let go", session_id)
            # Fences only grow: a newer one queued for this session already is the one to release.
            self._abandons[session_id] = max(fence, self._abandons.get(session_id, 0))
            self._kick()

    async def _taken(self, session_id: str, data: str, newest: int, entries: list[str]) -> SessionRecord:
        """The record of a session just taken over, with the replies its owner left unfinished if it died.

        ``data`` and ``entries`` are its record and history list as the claim read them:
        StoreUnavailable when they, or its log, do not decode (the session stays in Redis as it is).
        """
        try:
            record, listed = decode(data, entries)
        except _UNREADABLE as exc:
            raise StoreUnavailable("this session's record in the store cannot be read") from exc
        if listed:  # the list holds the session's entries: the next save appends to it
            self._saved[session_id] = record.history[-1] if record.history else None
        else:  # a record written with its history inline: the next save writes the list whole
            self._saved.pop(session_id, None)
        lost: list[tuple[MessageId, str | None]] = []
        if record.busy or newest > record.seq:
            # Its owner let it go answering, or logged frames after its last save: it died
            # mid-reply. Its log says which replies did not end (at most replay_buffer frames).
            raw = await self._shared("XRANGE", self._keys(session_id)[3], "-", "+")
            try:
                lost = unfinished([frame for _, frame in logged(raw)])
            except _UNREADABLE as exc:
                raise StoreUnavailable("this session's replay log in the store cannot be read") from exc
        return attrs.evolve(record, seq=max(record.seq, newest), lost=tuple(lost))

    def replay_log(self, session_id: str, capacity: int) -> ReplayLog:
        """A log in the session's Redis stream."""
        return RedisReplayLog(self, session_id, capacity)

    def __len__(self) -> int:
        """The sessions live in this process (Redis keeps those let go too)."""
        return len(self._live)
