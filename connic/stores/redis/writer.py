"""The ``redis`` store's background writing: queued appends, saves, releases and deletions.

Appends, saves, releases and deletions are queued by the session core's synchronous
calls (and letting go of a session whose take failed, by :meth:`RedisStore.abandon
<connic.stores.redis.RedisStore.abandon>`) and written by one task, one pipeline for
what every session queued meanwhile, so a streamed reply never waits on a round trip
per chunk. Appends and saves wait up to ``BATCH_DELAY`` to share a pipeline: many
sessions streaming at an LLM's pace would otherwise cost a pipeline (a connection taken
from the pool, a send, a wake-up for the replies) per chunk. A frame that may end a
reply, releases, deletions and :meth:`Writer.flush` are written at once.

A write that fails ends the session's connection with ``store_unavailable`` (1011); a write
refused for a lost lease stops this copy of the session at once (another process owns it
now). The leases are renewed by :mod:`~connic.stores.redis.renewer`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from connic.errors import ConnicError, SessionTakenOver, StoreUnavailable
from connic.session import SessionState
from connic.stores.redis.connection import ms, ttl, ttl_seconds
from connic.stores.redis.full import refused_full
from connic.stores.redis.held import Held, Release
from connic.stores.redis.keys import every_key, sha1hex
from connic.stores.redis.record import Listed, encode, encode_entry

if TYPE_CHECKING:
    from connic.agent import HistoryEntry
    from connic.session import ChatSession
    from connic.stores.redis.log import RedisReplayLog

__all__ = ["BATCH_DELAY", "ENTRY_CHARS", "Writer"]

log = logging.getLogger("connic.stores.redis")

BATCH_DELAY = 0.005
"""Seconds an append or a save waits for others to share its pipeline.

Short beside a turn and the lease, long beside a round of the event loop: at 2,000 chunks
a second (100 sessions at 20 chunks a second) a pipeline carries some ten of them instead
of one or two, which cut connic's CPU per S7 turn with this store by more than half
(docs/performance.md, R7). A resume on another process follows the frames this much later.
"""

ENTRY_CHARS = 1 << 20
"""About the most characters one entry of a replay log holds (more frames go in more entries):
a write of huge frames stays well within what Redis takes in one argument (512 MB)."""


def _appends(
    sid: str, fence: int, lease: int, capacity: int, log_ttl: int, first: int, frames: list[str]
) -> list[tuple[str, str, list[Any]]]:
    """The APPENDs logging ``frames`` (numbered from ``first``): one entry, or more for more than ENTRY_CHARS.

    An entry's one value is its frames joined by newlines: a frame's JSON never holds a
    raw one (JSON escapes it in a string). Each APPEND trims the entries that hold none of
    the newest ``capacity`` frames logged before it: the log holds at most one write more
    than the capacity, so that a process following it one read behind (a write of more
    than ``capacity`` frames while its read was on its way) finds no gap. A replay from
    the log never goes back more than the capacity (:meth:`RedisReplayLog.since
    <connic.stores.redis.log.RedisReplayLog.since>`). ``lease``: how long a lapsed lease is
    taken back for (:data:`~connic.stores.redis.scripts.APPEND`; 0: not taken back).
    """
    commands: list[tuple[str, str, list[Any]]] = []
    start = 0
    while start < len(frames):
        end, size = start + 1, len(frames[start])
        while end < len(frames) and size + len(frames[end]) <= ENTRY_CHARS:
            size += len(frames[end])
            end += 1
        newest = first + end - 1
        args = [fence, max(0, first + start - capacity), log_ttl, newest, "\n".join(frames[start:end]), lease]
        commands.append((sid, "APPEND", args))
        start = end
    return commands


# What a SAVE writes of a history: what the list held before (None: unknown, it is written
# whole), what it holds after, and the entries it appends.
_History = tuple[Listed | None, Listed, list[str]]


def _save(fence: int, record: str, record_ttl: int, lease: int, history: _History) -> list[Any]:
    """The arguments of a SAVE (:data:`~connic.stores.redis.scripts.SAVE`); ``history`` from :meth:`Writer._history`."""
    before, _, entries = history
    replace = 1 if before is None else 0
    count, digest = (0, "") if before is None else (before.count, before.digest)
    return [fence, record, record_ttl, replace, history[1].count, lease, count, digest, *entries]


def _release(fence: int, history: _History) -> list[Any]:
    """The arguments of the RELEASE after a SAVE of ``history`` (:data:`~connic.stores.redis.scripts.RELEASE`)."""
    before, after, _ = history
    if before is None:  # written whole: the list is what it says
        return [fence]
    return [fence, before.count, before.digest, after.count, after.digest]


class Writer(Held):
    """What :class:`~connic.stores.redis.RedisStore` writes in the background (a base class of it)."""

    def __init__(self) -> None:
        super().__init__()
        self._live: dict[str, ChatSession] = {}
        self._fences: dict[str, tuple[int, int]] = {}  # session id: (fencing token, lease ms)
        self._logs: dict[str, RedisReplayLog] = {}
        self._dirty_logs: dict[str, RedisReplayLog] = {}
        self._dirty: set[str] = set()  # sessions to save
        # Session id: what its Redis list holds, for the sessions whose list is known to hold
        # exactly their entries up to its newest.
        self._saved: dict[str, Listed] = {}
        self._deletes: dict[str, int] = {}  # session id: fence
        self._abandons: dict[str, int] = {}  # session id: fence (taken, then failed to rebuild: let go as it is)
        self._waiters: list[asyncio.Future[None]] = []
        self._wake: asyncio.Event | None = None
        self._timer: asyncio.TimerHandle | None = None  # wakes the writer BATCH_DELAY after an append or save
        self._writing = False  # a batch is being written
        self._releasing: set[str] = set()  # the sessions whose release the batch being written holds
        self._failing: set[str] = set()  # sessions whose last write failed (said once until one goes through)
        self._closing = False

    async def flush(self) -> None:
        """Wait until everything queued so far is written; StoreUnavailable if it could not be."""
        pending = self._dirty_logs or self._dirty or self._releases or self._deletes or self._abandons
        if not (pending or self._writing) or self._wake is None:
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        self._kick()
        await waiter

    def _forget(self, session_id: str) -> int | None:
        """Drop all this process holds of the session, nothing of it written; its fence if it owned it."""
        self._live.pop(session_id, None)
        self._logs.pop(session_id, None)
        self._dirty_logs.pop(session_id, None)
        self._dirty.discard(session_id)
        self._saved.pop(session_id, None)
        self._failing.discard(session_id)
        owned = self._fences.pop(session_id, None)
        return owned[0] if owned is not None else None

    def _log_dirty(self, replay: RedisReplayLog, ends: bool) -> None:
        """Queue the log's pending frames; at once when the last may end a reply (``ends``).

        A reply's end is written without waiting: a resume on another process may take the
        session from then on, and a client that saw the end finds it logged.
        """
        self._dirty_logs[replay.session_id] = replay
        if ends:
            self._kick()
        else:
            self._kick_soon()

    def _kick(self) -> None:
        """Wake the writer now."""
        if self._wake is not None:
            self._wake.set()

    def _kick_soon(self) -> None:
        """Wake the writer within BATCH_DELAY (at once if it was woken meanwhile)."""
        if self._timer is None and self._wake is not None and not self._wake.is_set():
            self._timer = asyncio.get_running_loop().call_later(BATCH_DELAY, self._wake.set)

    async def _writer(self) -> None:
        assert self._wake is not None
        while not self._closing:
            await self._wake.wait()
            self._wake.clear()
            if self._timer is not None:  # what it would have woken the writer for is written now
                self._timer.cancel()
                self._timer = None
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
            if session is None or session.state is not SessionState.DETACHED or session.busy:
                continue
            # A session a connection is resuming is not idle: its replay awaits this very batch.
            if not session.resuming:
                session.leave()  # calls release(): its record and release are queued below
        # Everything queued is taken at once, before the first await. Each session's record (and
        # history) goes before its frames, and its release or deletion after them: Redis runs the
        # pipeline's scripts in order, so once a frame is in the log, every history change made
        # before it was numbered is in Redis too (a save is queued when the history changes, so it
        # is taken by this batch or an earlier one). A resume following the session on another
        # process answers `history` from Redis on that (ws_resume, PROTOCOL.md §8).
        commands: list[tuple[str, str, list[Any]]] = []  # (session id, script, args)
        saves: dict[int, Listed] = {}  # index of a SAVE in commands: what the list holds after it
        for sid in self._dirty:
            session = self._live.get(sid)
            owned = self._fences.get(sid)
            if session is None or owned is None:
                continue
            try:
                record = encode(session.record(history=False))  # the entries go apart, by _history
            except (TypeError, ValueError) as exc:
                log.error("session %s: its state cannot be saved as JSON (%s)", sid, exc)
                self._fail(sid)
                continue
            history = self._history(sid, session.history.entries)
            saves[len(commands)] = history[1]
            commands.append((sid, "SAVE", _save(owned[0], record, ttl(session), owned[1], history)))
        self._dirty = set()
        releases, self._releases = self._releases, {}
        if self.full:
            # Redis full runs a RELEASE (it frees memory) but refuses the SAVE before it: the session
            # was let go as Redis last had it, and what this process held since (a reply that ended,
            # a message acknowledged) was lost with nothing lost from Redis. Held until it has room.
            releases, self._releases = {}, releases
        self._releasing = set(releases)
        let_go: list[tuple[str, str, list[Any]]] = []
        for sid, (fence, record, entries, record_ttl, lease) in releases.items():
            history = self._history(sid, entries)
            commands.append((sid, "SAVE", _save(fence, record, record_ttl, lease, history)))
            let_go.append((sid, "RELEASE", _release(fence, history)))
        for sid, replay in self._dirty_logs.items():
            frames, replay.pending = replay.pending, []
            if frames and replay.fence is not None:
                log_ttl = ms(ttl_seconds(self._live.get(sid)))
                owned = self._fences.get(sid)
                lease = owned[1] if owned is not None and owned[0] == replay.fence else 0
                commands += _appends(sid, replay.fence, lease, replay.capacity, log_ttl, replay.first, frames)
        self._dirty_logs = {}
        commands += let_go
        commands += [(sid, "RELEASE", [fence]) for sid, fence in self._abandons.items()]
        self._abandons = {}
        commands += [(sid, "DELETE", [fence]) for sid, fence in self._deletes.items()]
        self._deletes = {}
        waiters, self._waiters = self._waiters, []
        error: StoreUnavailable | None = None
        counted_out = self._counted_out()

        if commands or counted_out:
            sha = {name: self._scripts[name].sha for name in ("APPEND", "SAVE", "RELEASE", "DELETE")}
            packed: list[list[str | int]] = []
            for sid, name, args in commands:
                # DELETE deletes every key of the session (flags, cancels, rate bucket); RELEASE bounds its flags.
                keys = every_key(self.options.key_prefix, sid) if name in ("DELETE", "RELEASE") else self._keys(sid)
                packed.append(["EVALSHA", sha[name], len(keys), *keys, *args])
            packed += counted_out  # last: failures are left to leases
            try:
                results = await self._execute(packed)
            except StoreUnavailable as exc:
                error = exc
                results = [exc] * len(commands)
            for i, ((sid, name, args), result) in enumerate(zip(commands, results[: len(commands)], strict=True)):
                if name == "DELETE":  # the session is over here: only whether Redis forgot it is left
                    self._deleted(sid, int(args[0]), result)
                    continue
                if isinstance(result, Exception):
                    # Whether the history was written is unknown: the next save writes it whole.
                    self._saved.pop(sid, None)
                    if i not in saves and sid in releases:
                        if sid not in self._live and sid not in self._fences and not self._closing:
                            self._hold_back(sid, releases[sid], result)  # not taken again here meanwhile
                        continue
                    why = result.why if isinstance(result, StoreUnavailable) else str(result)
                    # Redis full: said once, by the connection. Down: once a session, not once a batch
                    # (a reply streaming on while Redis refused connections logged some 40 lines a second).
                    if not refused_full(result) and sid not in self._failing:
                        self._failing.add(sid)
                        log.warning("session %s: %s failed: %s", sid, name, why)
                    self._fail(sid)
                    continue
                self._failing.discard(sid)  # its writes go through again: the next failure is said
                if result == 0 and name in ("APPEND", "SAVE"):
                    # Refused for a token this process no longer holds (a write sent before Redis lost
                    # its data, run after the session was written back under a new one): nobody took it.
                    if self._fences.get(sid, (0, 0))[0] == args[0]:
                        self._lost(sid)
                elif result == 2 and name == "SAVE":
                    self._rewrite(sid, i in saves)
                elif result == 2 and name == "RELEASE":  # not let go: its history is written whole first
                    self._releases.setdefault(sid, releases[sid])
                    self._kick()
                elif result == -1 and name == "SAVE" and i not in saves:
                    self._gone_let_go(sid, releases[sid])
                elif result == -1 and name in ("APPEND", "SAVE"):
                    if self._fences.get(sid, (0, 0))[0] == args[0]:
                        self._gone(sid)
                elif i in saves and (sid in self._fences or sid in self._releases):
                    # Still this process's (or to be let go with the next batch, which writes from here).
                    self._saved[sid] = saves[i]
                if name == "RELEASE":
                    self._saved.pop(sid, None)  # another process may write its history from now on
                    self._released(sid)
        self._releasing = set()
        for waiter in waiters:
            if not waiter.done():
                if error is not None:
                    waiter.set_exception(error)
                else:
                    waiter.set_result(None)

    def _history(self, sid: str, entries: Sequence[HistoryEntry]) -> _History:
        """What a SAVE of session ``sid`` holding ``entries`` writes of its history (:data:`_History`).

        Only the entries added since the last save written from here go, found by identity
        from the end: entries are never changed, only appended, and trimming drops the
        oldest. When the newest saved entry is gone (trimmed past it), or what the list
        holds is unknown (never saved from here, a write that failed, or a list Redis had
        older than written), the list is written whole: never a gap.
        """
        before = self._saved.get(sid)
        start: int | None = None
        if before is not None:
            if before.newest is None:
                start = 0
            else:
                for i in range(len(entries) - 1, -1, -1):
                    if entries[i] is before.newest:
                        start = i + 1
                        break
        if start is None:
            before = None
        new = [encode_entry(entry) for entry in entries[start or 0 :]]
        if new:
            after = Listed(entries[-1], len(entries), sha1hex(new[-1]))
        else:  # nothing added: the same newest item, or none
            after = Listed(entries[-1] if entries else None, len(entries), before.digest if entries and before else "")
        return before, after, new

    def _rewrite(self, sid: str, live: bool) -> None:
        """A SAVE (or a renewal) found the session's history list older than written from here: written whole.

        Redis restarted from an older snapshot (its RDB file, after a crash), or a replica
        promoted behind its primary: appended to, the list had a hole. A live session's next
        save goes at once; a session let go was refused its RELEASE too, which is queued again.
        """
        log.warning("session %s: its history in Redis is older than written from here: written whole", sid)
        self._saved.pop(sid, None)
        if live:
            self._dirty.add(sid)
            self._kick()

    def _counted_out(self) -> list[list[str | int]]:
        """The commands removing sorted-set entries, sent last with the next batch (none here)."""
        return []

    async def _written_back(self, session_id: str) -> None:
        """Wait until the session is no longer being written back (:mod:`~connic.stores.redis.writeback`)."""

    def _deleted(self, sid: str, fence: int, result: object) -> None:
        """What the DELETE of an ended session got: its script's result, or the exception it failed with.

        :class:`~connic.stores.redis.RedisStore` retries a DELETE that failed.
        """

    def _fail(self, sid: str) -> None:
        """A write of the session failed: its connection ends with store_unavailable (1011); it stays resumable."""
        session = self._live.get(sid)
        sink = session.sink if session is not None else None
        if sink is not None:
            sink.end(StoreUnavailable("the session store cannot be reached; resume later"), True)

    def _gone(self, sid: str) -> None:
        """Nobody owns the session and this process cannot take it back: Redis lost its keys (a restart
        without its data, a FLUSHALL), or its lease lapsed and another process claimed it since. This
        copy stops: its connection ends as a store failure would (store_unavailable, 1011), and a
        resume finds what Redis has of it, or a fresh session. Not a takeover: nobody took it over.
        """
        error = StoreUnavailable("this session is gone from the session store; resume or start again")
        self._stop_copy(sid, error, "gone from the redis store (its keys lost, or claimed after its lease lapsed)")

    def _gone_let_go(self, sid: str, release: Release) -> None:
        """The last save of a session let go here found it gone (:class:`~connic.stores.redis.writeback.WriteBack`)."""

    def _lost(self, sid: str) -> None:
        """Another process owns the session now (this one's lease ran out): this copy stops at once."""
        self._stop_copy(
            sid, SessionTakenOver("the session moved to another process"), "ownership lost to another process"
        )

    def _stop_copy(self, sid: str, error: ConnicError, why: str) -> None:
        """This process's copy of the session stops: its connection ends with ``error``; Redis's is left as it is."""
        self._fences.pop(sid, None)
        self._saved.pop(sid, None)
        session = self._live.get(sid)
        if session is None:
            return
        log.warning("session %s: %s", sid, why)
        sink = session.sink
        if sink is not None:
            sink.end(error, True)
        session.leave()
