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
since; otherwise it is gone as before.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from typing import TYPE_CHECKING, Any

from connic.errors import StoreUnavailable
from connic.session_state import SessionState
from connic.stores.redis.connection import ms, ttl
from connic.stores.redis.record import encode, encode_entry
from connic.stores.redis.writer import Writer

if TYPE_CHECKING:
    from connic.session import ChatSession

__all__ = ["WriteBack", "epoch_key"]

log = logging.getLogger("connic.stores.redis")


def epoch_key(prefix: str) -> str:
    """The key of the epoch: set once by the first process to find it missing, lost with Redis's data."""
    return f"{prefix}epoch"


class WriteBack(Writer):
    """Creating sessions in Redis: new ones, and live ones again once Redis lost its data (a store base class)."""

    def __init__(self) -> None:
        super().__init__()
        self._epoch: str | None = None  # the epoch in Redis, as last read
        self._epochs: dict[str, str | None] = {}  # session id: the epoch when this process made or took it
        self._writing_back: dict[str, asyncio.Task[None]] = {}

    async def _create(self, session: ChatSession) -> None:
        """Create ``session`` in Redis, owned here (a new fencing token); StoreUnavailable if Redis has it already."""
        sid = session.id
        lease = ms(session.sessions.options.producer_timeout)
        record = session.record()
        entries = [encode_entry(entry) for entry in record.history]
        fence = await self._call(
            self._scripts["CREATE"](keys=self._keys(sid), args=[lease, encode(record), ttl(session), *entries])
        )
        if not fence:
            raise StoreUnavailable(f"session {sid} exists already in the store")
        self._fences[sid] = (int(fence), lease)
        self._owned(sid)
        self._saved[sid] = record.history[-1] if record.history else None

    def _owned(self, session_id: str) -> None:
        """The session is this process's from now on (made or taken): as of the epoch known now."""
        self._epochs[session_id] = self._epoch

    async def _watch_epoch(self) -> bool:
        """Read the epoch (setting a new one if Redis has none); whether it differs from the one read before."""
        key = epoch_key(self.options.key_prefix)

        def build(pipe: Any) -> None:
            pipe.set(key, secrets.token_hex(8), nx=True)  # whoever finds it missing first sets it
            pipe.get(key)

        results = await self._pipeline(build)
        if isinstance(results[1], Exception):
            raise StoreUnavailable(f"Redis failed ({type(results[1]).__name__})", detail=str(results[1]))
        epoch = results[1]
        changed = self._epoch is not None and epoch != self._epoch
        if changed:
            log.warning("redis store: Redis lost its data (a restart without it, or a FLUSHALL)")
        self._epoch = epoch
        for sid in [sid for sid in self._epochs if sid not in self._fences and sid not in self._writing_back]:
            del self._epochs[sid]  # no longer owned here (let go or stopped)
        return changed

    def _gone(self, sid: str) -> None:
        """Nobody owns the session and it cannot be taken back: written back if Redis lost its data, else it stops.

        Until that is known nothing of the session is written (its pending frames wait).
        """
        session = self._live.get(sid)
        if session is None or sid in self._writing_back:
            return
        self._fences.pop(sid, None)
        replay = self._logs.get(sid)
        if replay is not None:
            replay.fence = None
        self._writing_back[sid] = asyncio.create_task(self._write_back(sid, session))

    async def _write_back(self, sid: str, session: ChatSession) -> None:
        try:
            try:
                await self._watch_epoch()
                lost = self._epoch != self._epochs.get(sid)
                if lost and self._live.get(sid) is session and session.state is not SessionState.ENDED:
                    await self._create(session)
                    log.warning("session %s: written back to Redis from this process (its replay log was lost)", sid)
            except StoreUnavailable as exc:
                log.warning("session %s: writing it back to Redis failed: %s", sid, exc.why)
                lost = False
        finally:
            del self._writing_back[sid]
        if sid in self._fences:
            replay = self._logs.get(sid)
            if replay is not None:
                replay.fence = self._fences[sid][0]
                if replay.pending:
                    self._log_dirty(replay, True)
            return
        super()._gone(sid)

    def _forget(self, session_id: str) -> int | None:
        """Drop all this process holds of the session (see :meth:`Writer._forget`)."""
        self._epochs.pop(session_id, None)
        return super()._forget(session_id)
