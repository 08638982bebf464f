"""The ``redis`` store: sessions kept in Redis (or Valkey), shared by every connic process.

``[store] use = "redis"`` (``pip install 'connic[redis]'``). Each session has,
under one hash tag (:func:`~connic.stores.redis.scripts.session_keys`):

- its **record** (:class:`~connic.stores.SessionRecord` as JSON), written when it
  is created, after every exchange, when it detaches and when this process lets it
  go; it expires ``session_timeout + resume_window`` after the last write (only
  ``resume_window`` once it was let go detached);
- its **replay log**, a stream whose entry ids are ``0-<seq>``, trimmed to exactly
  ``replay_buffer`` entries;
- its **owner**, a fencing token held with a lease of ``producer_timeout`` by the
  one process serving it, renewed while it is live there. Every write checks the
  token in the same Lua script, so a process that lost its lease writes nothing.

A session is live in one process at a time. When it is detached and idle the
owner saves it and lets it go; a resume on any process then takes it
(:meth:`RedisStore.take`) and the core rebuilds it. Appends, saves and releases
are queued and written by one background task, one pipeline per round of the
event loop, so a streamed reply never waits on a round trip per chunk.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

import attrs

from connic.errors import SessionTakenOver, StoreUnavailable
from connic.frames import MessageId
from connic.session import SessionState
from connic.stores import Follow, ReplayLog, SessionRecord, SessionStore
from connic.stores.redis import scripts
from connic.stores.redis.cancels import Cancels
from connic.stores.redis.log import RedisReplayLog, frames_after, seq_of, unfinished
from connic.stores.redis.record import decode, encode

if TYPE_CHECKING:
    from connic.session import ChatSession

__all__ = ["RedisReplayLog", "RedisStore"]

log = logging.getLogger("connic.stores.redis")

_POLL = 0.05  # seconds between attempts to take a session another process still owns
_FOLLOW_BLOCK_MS = 200  # the longest XREAD BLOCK while following: how soon a let-go session is taken


def _positive(instance: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not value > 0:
        raise ValueError(f"{attribute.name} must be > 0, got {value!r}")


class RedisStore(Cancels, SessionStore):
    """Sessions in Redis: durable, resumable on any process that shares the server."""

    durable = True

    @attrs.frozen
    class Options:
        """The ``[store]`` keys of ``use = "redis"`` (docs/configuration.md)."""

        url: str = "redis://127.0.0.1:6379/0"
        key_prefix: str = "connic:"
        timeout: float = attrs.field(default=2.0, validator=_positive)

    options: Options

    def __init__(self, options: Options | None = None) -> None:
        super().__init__(options if options is not None else RedisStore.Options())
        self._redis: Any = None
        self._blocking: Any = None  # XREAD BLOCK: no socket timeout (redis-py's would cut the block short)
        self._scripts: dict[str, Any] = {}
        self._live: dict[str, ChatSession] = {}
        self._fences: dict[str, tuple[int, int]] = {}  # session id: (fencing token, lease ms)
        self._logs: dict[str, RedisReplayLog] = {}
        self._dirty_logs: dict[str, RedisReplayLog] = {}
        self._dirty: set[str] = set()  # sessions to save
        self._releases: dict[str, tuple[int, str, int]] = {}  # session id: (fence, record, ttl ms)
        self._deletes: dict[str, int] = {}  # session id: fence
        self._waiters: list[asyncio.Future[None]] = []
        self._wake: asyncio.Event | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._writing = False  # a batch is being written
        self._closing = False
        self._down = False  # the last call to Redis got no answer (available() then pings)
        self._checking: asyncio.Task[bool] | None = None  # the one ping under way while down
        self._cancelling: set[asyncio.Task[None]] = set()  # cancels being passed on or taken

    # --- life cycle -------------------------------------------------------------

    async def start(self) -> None:
        """Connect, check that Redis answers, and start the writer and the lease renewer."""
        try:
            import redis.asyncio as aioredis  # here: the core never needs redis-py
        except ImportError:
            raise StoreUnavailable("[store] use = \"redis\" needs redis-py: pip install 'connic[redis]'") from None
        opts = self.options
        try:
            self._redis = aioredis.Redis.from_url(
                opts.url,
                decode_responses=True,
                encoding_errors="surrogatepass",  # JSON from a client may hold lone surrogates
                socket_timeout=opts.timeout,
                socket_connect_timeout=opts.timeout,
            )
        except ValueError as exc:
            raise StoreUnavailable(f"[store] url {opts.url!r}: {exc}") from None
        self._blocking = aioredis.Redis.from_url(
            opts.url,
            decode_responses=True,
            encoding_errors="surrogatepass",
            socket_timeout=None,
            socket_connect_timeout=opts.timeout,
        )
        try:
            await self._call(self._redis.ping())
        except StoreUnavailable as exc:
            await self._redis.aclose()
            await self._blocking.aclose()
            raise StoreUnavailable(f"[store] url {opts.url!r}: cannot reach Redis ({exc.message})") from None
        self._scripts = {
            name: self._redis.register_script(getattr(scripts, name))
            for name in ("APPEND", "CANCELS", "CLAIM", "CREATE", "DELETE", "RELEASE", "RENEW", "SAVE")
        }
        self._wake = asyncio.Event()
        self._tasks = [
            asyncio.create_task(self._writer()),
            asyncio.create_task(self._renewer()),
            asyncio.create_task(self._listen()),
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
        self._tasks[2].cancel()  # the cancel listener
        for task in self._cancelling:
            task.cancel()
        # Bounded: a task that redis-py kept from seeing its cancellation must not hang the stop.
        _, pending = await asyncio.wait(self._tasks, timeout=self.options.timeout)
        for task in pending:
            task.cancel()
        self._tasks = []
        await self._redis.aclose()
        await self._blocking.aclose()
        self._redis = self._blocking = None

    # --- the SessionStore interface ----------------------------------------------

    async def add(self, session: ChatSession) -> None:
        """Hold a session live here: a new one is created in Redis; a taken one is already owned."""
        sid = session.id
        if sid not in self._fences:
            opts = session.sessions.options
            lease = _ms(opts.producer_timeout)
            keys = self._keys(sid)
            fence = await self._call(
                self._scripts["CREATE"](keys=keys, args=[lease, encode(session.record()), _ttl(session)])
            )
            if not fence:
                raise StoreUnavailable(f"session {sid} exists already in the store")
            self._fences[sid] = (int(fence), lease)
        self._live[sid] = session
        replay = session.log
        if isinstance(replay, RedisReplayLog):
            replay.fence = self._fences[sid][0]
            replay.last = max(replay.last, session.seq)
            self._logs[sid] = replay

    async def available(self) -> bool:
        """True unless the last call to Redis failed and a ping (≤ 1 s) still gets no answer.

        While Redis is up this costs nothing; while it is down, handshakes arriving together
        share one ping (a burst of them does not become a burst of pings).
        """
        if not self._down:
            return True
        if self._checking is None or self._checking.done():
            self._checking = asyncio.create_task(self._ping())
        return await asyncio.shield(self._checking)

    async def _ping(self) -> bool:
        try:
            await self._call(self._client().ping(), min(self.options.timeout, 1.0))
        except StoreUnavailable:
            return False
        return True

    async def get(self, session_id: str) -> ChatSession | None:
        """The session if it is live in this process (else :meth:`load` and :meth:`take`)."""
        return self._live.get(session_id)

    def discard(self, session_id: str) -> None:
        """The session ended for good: delete it from Redis (in the background)."""
        self._live.pop(session_id, None)
        self._logs.pop(session_id, None)
        self._dirty_logs.pop(session_id, None)
        self._dirty.discard(session_id)
        owned = self._fences.pop(session_id, None)
        if owned is not None:
            self._deletes[session_id] = owned[0]
            self._kick()

    def save(self, session: ChatSession) -> None:
        """Queue writing the session's record (and letting it go when it is detached and idle)."""
        if session.id in self._live:
            self._dirty.add(session.id)
            self._kick()

    def release(self, session: ChatSession) -> None:
        """Queue the session's last record and the end of this process's ownership."""
        sid = session.id
        self._live.pop(sid, None)
        self._logs.pop(sid, None)
        self._dirty.discard(sid)
        owned = self._fences.pop(sid, None)
        if owned is not None:
            ttl = _ms(session.sessions.options.resume_window)
            self._releases[sid] = (owned[0], encode(session.record()), ttl)
            self._kick()

    async def load(self, session_id: str) -> SessionRecord | None:
        """The session's record as Redis has it (after writing what this process queued)."""
        await self.flush()
        data = await self._call(self._client().get(self._keys(session_id)[2]))
        return decode(data) if data is not None else None

    async def take(
        self, session_id: str, wait: float, follow: Follow | None = None, after: int = 0
    ) -> SessionRecord | None:
        """Own the session once its owner lets it go; its record then.

        Without ``follow`` this polls, for up to ``wait`` seconds. With it, it reads the
        log after ``after``, then blocks on it (XREAD BLOCK) handing ``follow`` each new
        frame and trying to take the session between reads, for as long as the owner
        holds it: its lease (``wait`` long, renewed while it lives) is what ends the wait.
        """
        await self.flush()
        keys = self._keys(session_id)
        lease = _ms(wait)
        deadline = time.monotonic() + wait
        cursor: int | None = None  # the seq handed to follow so far, once following
        while True:
            result = await self._call(self._scripts["CLAIM"](keys=keys, args=[lease]))
            fence = int(result[0])
            if fence == -1:
                return None
            if fence > 0:
                self._fences[session_id] = (fence, lease)
                record = decode(result[1])
                newest = int(result[2])
                lost: list[tuple[MessageId, str | None]] = []
                if record.busy or newest > record.seq:
                    # Its owner let it go answering, or logged frames after its last save: it died
                    # mid-reply. Its log says which replies did not end (at most replay_buffer frames).
                    entries = await self._call(self._client().xrange(keys[3], "-", "+"))
                    lost = unfinished([fields["f"] for _, fields in entries])
                return attrs.evolve(record, seq=max(record.seq, newest), lost=tuple(lost))
            if follow is None and time.monotonic() >= deadline:
                log.warning("session %s: its owner did not let it go within %g s", session_id, wait)
                return None
            if follow is None:
                await asyncio.sleep(_POLL)
            elif cursor is None:
                entries = await self._call(self._client().xrange(keys[3], f"0-{after + 1}", "+"))
                frames = frames_after(entries, after)
                cursor = seq_of(entries[-1][0]) if entries else after
                follow(frames, cursor)
            else:
                read = await self._call(
                    self._blocking.xread({keys[3]: f"0-{cursor}"}, block=_FOLLOW_BLOCK_MS),
                    self.options.timeout + _FOLLOW_BLOCK_MS / 1000,
                )
                entries = read[0][1] if read else []
                if entries:
                    frames = frames_after(entries, cursor)
                    if frames is None:
                        log.warning("session %s: frames trimmed before they could be followed", session_id)
                        return None  # never a gap
                    cursor = seq_of(entries[-1][0])
                    follow(frames, cursor)

    def replay_log(self, session_id: str, capacity: int) -> ReplayLog:
        """A log in the session's Redis stream."""
        return RedisReplayLog(self, session_id, capacity)

    def __len__(self) -> int:
        """The sessions live in this process (Redis keeps those let go too)."""
        return len(self._live)

    # --- writing in the background ---------------------------------------------------

    async def flush(self) -> None:
        """Wait until everything queued so far is written; StoreUnavailable if it could not be."""
        pending = self._dirty_logs or self._dirty or self._releases or self._deletes
        if not (pending or self._writing) or self._wake is None:
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        self._kick()
        await waiter

    def _log_dirty(self, replay: RedisReplayLog) -> None:
        if replay.session_id not in self._dirty_logs:
            self._dirty_logs[replay.session_id] = replay
            self._kick()

    def _kick(self) -> None:
        if self._wake is not None:
            self._wake.set()

    async def _writer(self) -> None:
        assert self._wake is not None
        while not self._closing:
            await self._wake.wait()
            self._wake.clear()
            self._writing = True
            try:
                await self._write_batch()
            except Exception:  # connic's own bug: keep writing the next batches
                log.exception("redis store: writing a batch failed")
            finally:
                self._writing = False

    async def _write_batch(self) -> None:
        # Letting idle detached sessions go is decided here, a round of the loop after their
        # last reply ended: their answering task is back to waiting by then.
        for sid in list(self._dirty):
            session = self._live.get(sid)
            if session is not None and session.state is SessionState.DETACHED and not session.busy:
                session.leave()  # calls release(): its record and release are queued below
        # Everything queued is taken at once, before the first await, in each session's order:
        # its frames, then its record, then its release or deletion.
        commands: list[tuple[str, str, list[Any]]] = []  # (session id, script, args)
        for sid, replay in self._dirty_logs.items():
            frames, replay.pending = replay.pending, []
            if frames and replay.fence is not None:
                ttl = _ms(_ttl_seconds(self._live.get(sid)))
                commands.append((sid, "APPEND", [replay.fence, replay.capacity, ttl, *frames]))
        self._dirty_logs = {}
        for sid in self._dirty:
            session = self._live.get(sid)
            owned = self._fences.get(sid)
            if session is None or owned is None:
                continue
            try:
                record = encode(session.record())
            except (TypeError, ValueError) as exc:
                log.error("session %s: its state cannot be saved as JSON (%s)", sid, exc)
                self._fail(sid)
                continue
            commands.append((sid, "SAVE", [owned[0], record, _ttl(session)]))
        self._dirty = set()
        for sid, (fence, record, ttl) in self._releases.items():
            commands += [(sid, "SAVE", [fence, record, ttl]), (sid, "RELEASE", [fence])]
        self._releases = {}
        commands += [(sid, "DELETE", [fence]) for sid, fence in self._deletes.items()]
        self._deletes = {}
        waiters, self._waiters = self._waiters, []
        error: StoreUnavailable | None = None
        if commands:
            pipe = self._client().pipeline(transaction=False)
            for sid, name, args in commands:
                await self._scripts[name](keys=self._keys(sid), args=args, client=pipe)  # queued, no I/O
            try:
                results = await self._call(pipe.execute(raise_on_error=False))
            except StoreUnavailable as exc:
                error = exc
                results = [exc] * len(commands)
            for (sid, name, _), result in zip(commands, results, strict=True):
                if isinstance(result, Exception):
                    log.warning("session %s: %s failed: %s", sid, name, result)
                    self._fail(sid)
                elif not result and name in ("APPEND", "SAVE"):
                    self._lost(sid)
        for waiter in waiters:
            if not waiter.done():
                if error is not None:
                    waiter.set_exception(error)
                else:
                    waiter.set_result(None)

    async def _renewer(self) -> None:
        """Renew the lease of every session live here, every third of its lease."""
        while True:
            leases = [lease for _, lease in self._fences.values()]
            await asyncio.sleep(min(leases) / 3000 if leases else 1.0)
            owned = list(self._fences.items())
            if not owned:
                continue
            pipe = self._client().pipeline(transaction=False)
            for sid, (fence, lease) in owned:
                await self._scripts["RENEW"](keys=self._keys(sid), args=[fence, lease], client=pipe)
            try:
                results = await self._call(pipe.execute(raise_on_error=False))
            except StoreUnavailable as exc:
                log.warning("redis store: renewing %d lease(s) failed: %s", len(owned), exc.message)
                continue
            for (sid, (fence, _)), result in zip(owned, results, strict=True):
                if result == 0 and self._fences.get(sid, (0, 0))[0] == fence:
                    self._lost(sid)
            # A cancel whose pub/sub message was lost (the channel reconnecting) is still taken.
            busy = [sid for sid, _ in owned if (s := self._live.get(sid)) is not None and s.busy]
            if busy:
                await self._take_cancels(busy)

    def _fail(self, sid: str) -> None:
        """A write of the session failed: its connection ends with store_unavailable (1011); it stays resumable."""
        session = self._live.get(sid)
        sink = session.sink if session is not None else None
        if sink is not None:
            sink.end(StoreUnavailable("the session store cannot be reached; resume later"), True)

    def _lost(self, sid: str) -> None:
        """Another process owns the session now (this one's lease ran out): this copy stops at once."""
        self._fences.pop(sid, None)
        session = self._live.get(sid)
        if session is None:
            return
        log.warning("session %s: ownership lost to another process", sid)
        sink = session.sink
        if sink is not None:
            sink.end(SessionTakenOver("the session moved to another process"), True)
        session.leave()

    # --- helpers -----------------------------------------------------------------

    def _client(self) -> Any:
        if self._redis is None:
            raise StoreUnavailable("the redis store is not started")
        return self._redis

    def _keys(self, session_id: str) -> list[str]:
        return scripts.session_keys(self.options.key_prefix, session_id)

    async def _call(self, call: Any, seconds: float | None = None) -> Any:
        """Await one Redis call within ``seconds`` (default: ``timeout``); any failure is StoreUnavailable."""
        import redis.exceptions  # imported by start() already

        timeout = self.options.timeout if seconds is None else seconds
        try:
            async with asyncio.timeout(timeout):
                result = await call
        except (TimeoutError, redis.exceptions.RedisError, OSError) as exc:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                # redis-py turns a cancellation into a connection error (and asyncio.timeout may
                # take one for its own): the caller was cancelled, so it must stop.
                raise asyncio.CancelledError from None
            # An error reply means Redis is up; anything else: handshakes are refused (503) till it answers.
            self._down = not isinstance(exc, redis.exceptions.ResponseError)
            if isinstance(exc, TimeoutError):
                raise StoreUnavailable(f"no answer from Redis within {timeout:g} s") from None
            raise StoreUnavailable(f"Redis failed: {exc}") from None
        self._down = False
        return result


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def _ttl_seconds(session: ChatSession | None) -> float:
    if session is None:
        return 86400.0
    opts = session.sessions.options
    return opts.session_timeout + opts.resume_window


def _ttl(session: ChatSession) -> int:
    return _ms(_ttl_seconds(session))
