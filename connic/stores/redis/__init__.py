"""The ``redis`` store: sessions kept in Redis (or Valkey), shared by every connic process.

``[store] use = "redis"`` (``pip install 'connic[redis]'``). Each session has,
under one hash tag (:func:`~connic.stores.redis.keys.session_keys`):

- its **record** (:class:`~connic.stores.SessionRecord`'s scalars as JSON), written
  when it is created, after every exchange, when it detaches and when this process
  lets it go; it expires ``session_timeout + resume_window`` after the last write (only
  ``resume_window`` once it was let go detached);
- its **history**, a list of one JSON array per entry, written in the same script as
  the record: a save appends the entries added since this process last saved the
  session and trims the list to the entries the session holds (the whole list is
  written only when what it holds is unknown), so that an exchange costs Redis and
  connic what it adds, not the whole conversation again; it expires with the record;
- its **replay log**, a stream of one entry per write (its frames joined by newlines;
  the entry's id ``0-<its newest seq>``), trimmed at each write to the entries that hold
  the newest ``replay_buffer`` frames before it (:mod:`~connic.stores.redis.log`);
- its **owner**, a fencing token held with a lease of ``producer_timeout`` by the
  one process serving it, renewed while it is live there. Every write checks the
  token in the same Lua script, so a process that lost its lease writes nothing.

A session is live in one process at a time. When it is detached and idle the
owner saves it and lets it go; a resume on any process then takes it
(:meth:`RedisStore.take`) and the core rebuilds it. Appends, saves and releases
are queued and written by one background task, one pipeline per round of the
event loop, so a streamed reply never waits on a round trip per chunk.

The parts, one module each: :mod:`~connic.stores.redis.connection` (the clients,
bounded calls, whether Redis is up), :mod:`~connic.stores.redis.full` (whether Redis
is full), :mod:`~connic.stores.redis.checks` (the URL and the server's version checked
before connecting), :mod:`~connic.stores.redis.writer` (the
background writer), :mod:`~connic.stores.redis.renewer` (the lease renewer),
:mod:`~connic.stores.redis.writeback` (creating
sessions, and writing live ones back into a Redis that lost its data), :mod:`~connic.stores.redis.cancels` (cancels
across processes), :mod:`~connic.stores.redis.takeovers` (a resume elsewhere taking
over the owner's connection, or its client's goodbye ending the session there),
:mod:`~connic.stores.redis.taking` (taking a session over: the claim, following the
owner's log meanwhile, the rebuild's record), :mod:`~connic.stores.redis.follower`
(reading the logs followed),
:mod:`~connic.stores.redis.limits` (the rate limit and connections per address across
processes), :mod:`~connic.stores.redis.log` (the replay log),
:mod:`~connic.stores.redis.record` (the record's JSON),
:mod:`~connic.stores.redis.keys` (every key's and channel's name),
:mod:`~connic.stores.redis.scripts` (the sessions' Lua scripts) and
:mod:`~connic.stores.redis.limit_scripts` (the limits' Lua scripts).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

import attrs

from connic.errors import StoreUnavailable
from connic.redact import safe_url
from connic.stores import ReplayLog, SessionRecord, SessionStore
from connic.stores.redis.checks import check_url
from connic.stores.redis.connection import ms
from connic.stores.redis.limits import Limits
from connic.stores.redis.log import RedisReplayLog
from connic.stores.redis.record import decode, encode
from connic.stores.redis.taking import UNREADABLE, Taking

if TYPE_CHECKING:
    from connic.session import ChatSession

__all__ = ["RedisReplayLog", "RedisStore"]

log = logging.getLogger("connic.stores.redis")

DELETE_RETRY_FIRST = 0.5
"""Seconds before the first retry of an ended session's DELETE that failed; each next waits twice as long."""
DELETE_RETRY_MAX = 30.0
"""The longest wait between two retries of a DELETE."""
DELETE_RETRY_FOR = 300.0
"""Seconds after its first failure a DELETE is given up: the ended session's keys then live until they expire.

Long beside a failover or a restart of Redis; a session still in Redis meanwhile can be
resumed with its token (it is back), so the retries go on for as long as that is likely
to be worth it, at most one small script per ended session every ``DELETE_RETRY_MAX``.
"""


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


class RedisStore(Limits, Taking, SessionStore):
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
        # Session id: (fence, retries so far, when its DELETE first failed, the next retry's timer)
        self._undeleted: dict[str, tuple[int, int, float, asyncio.TimerHandle | None]] = {}
        self._last_try = False  # closing: a DELETE failing now is given up

    # --- life cycle -------------------------------------------------------------

    async def start(self) -> None:
        """Connect, check that Redis answers, and start the writer, the lease renewer and the pub/sub listener."""
        await self.connect()
        await self._read_clock()
        try:
            await self._watch_epoch()
        except StoreUnavailable as exc:
            raise StoreUnavailable(f"[store] url {safe_url(self.options.url)!r}: {exc.why}") from None
        await self._warn_if_evicting()
        self._wake = asyncio.Event()
        self._tasks = [
            asyncio.create_task(self._writer()),
            asyncio.create_task(self._renewer()),
            asyncio.create_task(self._listen()),
            asyncio.create_task(self._follower.run()),
        ]

    async def _warn_if_evicting(self) -> None:
        """One warning at start when Redis may evict connic's keys once it reaches its ``maxmemory``.

        Eviction is silent: a session whose keys go is lost (its resume gets a fresh session),
        and under an ``allkeys-*`` policy the epoch key going reads as Redis losing its data.
        """
        try:
            memory = await self._call(self._client().info("memory"))
        except StoreUnavailable:
            return  # INFO refused (a managed Redis may rename it): nothing to go by
        policy, limit = memory.get("maxmemory_policy", ""), memory.get("maxmemory", 0)
        if policy and policy != "noeviction" and str(limit) not in ("", "0"):
            log.warning(
                "redis store: [store] url %r: Redis evicts keys at its maxmemory (maxmemory-policy %s): "
                "a session whose keys it evicts is lost; set maxmemory-policy to noeviction",
                safe_url(self.options.url),
                policy,
            )

    async def close(self) -> None:
        """Write what is queued (bounded by ``timeout``), then disconnect."""
        if self._redis is None:
            return
        # One last attempt at the DELETEs waiting for a retry, in the writes bounded below.
        self._last_try = True
        for sid, (fence, _, _, timer) in self._undeleted.items():
            if timer is None:
                continue  # its retry is queued or being written already: a second copy would find it gone
            timer.cancel()
            self._deletes[sid] = max(fence, self._deletes.get(sid, 0))
        await self._last_writes()  # the write-backs under way included
        self._closing = True
        self._kick()  # the writer ends after the batch it may be writing
        self._tasks[1].cancel()  # the renewer
        self._tasks[2].cancel()  # the pub/sub listener (cancels and takeovers)
        self._tasks[3].cancel()  # the follower
        for task in [*self._cancelling, *self._write_back_tasks()]:
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
            await self._create(session)
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

    def _deleted(self, sid: str, fence: int, result: object) -> None:
        """An ended session's DELETE that failed is retried in the background, with backoff, for a while.

        Not retried, it left the session in Redis until its keys expired, and a resume with
        its token brought it back. Nothing waits for it: not the connection's close, nor a
        shutdown (which makes one last attempt, within the store's ``timeout``). One warning
        when it first fails, one more if it is given up (``DELETE_RETRY_FOR``).
        """
        entry = self._undeleted.get(sid)
        if entry is not None and entry[0] > fence:
            return  # an older copy's DELETE: the retries of the newer one's go on
        if entry is not None and entry[0] < fence:
            # A newer copy of the session (taken again here, then ended): its DELETE settles the older's.
            if entry[3] is not None:
                entry[3].cancel()
            self._undeleted.pop(sid, None)
            entry = None
        if not isinstance(result, Exception):
            if entry is not None:
                self._undeleted.pop(sid, None)
                if result == 1:
                    log.info("session %s: ended in Redis after %d retries", sid, entry[1])
            if result != 1:  # another process owns it or claimed it since (or Redis lost it): left as it is
                log.info("session %s: not deleted from Redis: another process claimed it since, or it is gone", sid)
            return
        why = result.why if isinstance(result, StoreUnavailable) else str(result)
        loop = asyncio.get_running_loop()
        tries, since = (0, loop.time()) if entry is None else (entry[1], entry[2])
        if self._last_try or loop.time() - since >= DELETE_RETRY_FOR:
            self._undeleted.pop(sid, None)
            log.warning(
                "session %s: ending it in Redis failed (%s), retried %d times: given up; its keys expire on their own",
                sid,
                why,
                tries,
            )
            return
        if entry is None:
            log.warning("session %s: ending it in Redis failed (%s): retrying in the background", sid, why)
        delay = min(DELETE_RETRY_MAX, DELETE_RETRY_FIRST * 2**tries)
        timer = loop.call_later(delay, self._delete_again, sid)
        self._undeleted[sid] = (fence, tries + 1, since, timer)

    def _delete_again(self, sid: str) -> None:
        """Queue the retry of the session's DELETE."""
        entry = self._undeleted.get(sid)
        if entry is not None:
            fence, tries, since, _ = entry
            self._undeleted[sid] = (fence, tries, since, None)
            self._deletes[sid] = max(fence, self._deletes.get(sid, 0))
            self._kick()

    def save(self, session: ChatSession) -> None:
        """Queue writing the session's record (and letting it go when it is detached and idle)."""
        if session.id in self._live:
            self._dirty.add(session.id)
            self._kick_soon()

    def release(self, session: ChatSession) -> None:
        """Queue the session's last record and the end of this process's ownership.

        Never raises: a session whose state JSON cannot encode is let go as it was last saved
        (a warning names it), so that one agent's state never keeps the others from being let go.
        """
        sid = session.id
        self._live.pop(sid, None)
        self._logs.pop(sid, None)
        self._dirty.discard(sid)
        owned = self._fences.pop(sid, None)
        if owned is not None:
            window = ms(session.sessions.options.resume_window)
            # The history's entries are written by the writer, from what it last wrote of them.
            record = session.record()
            try:
                data = encode(record)
            except (TypeError, ValueError) as exc:
                # Raised out of leave(), it stopped Sessions.shutdown letting the other sessions go:
                # they stayed owned by a stopped process until their leases ran out. This one is
                # let go as it was last saved (its record untouched, as a rebuild that failed is).
                log.warning("session %s: its state cannot be saved as JSON (%s): let go as last saved", sid, exc)
                self._abandons[sid] = owned[0]
            else:
                self._releases[sid] = (owned[0], data, record.history, window, owned[1])
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
        except UNREADABLE as exc:
            log.warning("session %s: its record in Redis does not decode: %s", session_id, exc)
            raise StoreUnavailable("this session's record in the store cannot be read") from exc

    def replay_log(self, session_id: str, capacity: int) -> ReplayLog:
        """A log in the session's Redis stream."""
        return RedisReplayLog(self, session_id, capacity)

    def __len__(self) -> int:
        """The sessions live in this process (Redis keeps those let go too)."""
        return len(self._live)
