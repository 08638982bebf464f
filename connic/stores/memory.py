"""The built-in ``memory`` store: sessions live in this process (the default)."""

from __future__ import annotations

import itertools
from collections import deque
from typing import TYPE_CHECKING

from connic.stores import ReplayLog, SessionStore

if TYPE_CHECKING:
    from connic.session import ChatSession

__all__ = ["MemoryReplayLog", "MemoryStore"]


class MemoryReplayLog(ReplayLog):
    """A bounded deque of encoded frames; the first one's number tells what was evicted.

    The deque is made with the first frame: a session that never gets a message
    (most idle ones) does not pay for its first block.
    """

    __slots__ = ("_capacity", "_first", "_frames")

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._frames: deque[str] | None = None
        self._first = 1  # the number of self._frames[0]

    def append(self, seq: int, data: str) -> None:
        """Log frame ``seq``; the oldest goes when the log is full."""
        frames = self._frames
        if frames is None:
            frames = self._frames = deque(maxlen=self._capacity)
        if len(frames) == frames.maxlen:
            self._first += 1
        elif not frames:
            self._first = seq
        frames.append(data)

    async def since(self, seq: int) -> list[str] | None:
        """The frames numbered above ``seq``; None when the one after ``seq`` was evicted."""
        start = seq + 1 - self._first
        if start < 0:
            return None
        return list(itertools.islice(self._frames or (), start, None))

    def stats(self) -> tuple[int, int]:
        """Frames held and their size in bytes (UTF-8)."""
        frames = self._frames or ()
        return len(frames), sum(len(f.encode("utf-8", "surrogatepass")) for f in frames)


class MemoryStore(SessionStore):
    """Keeps sessions in a dict of this process: they survive their connection, not a restart."""

    def __init__(self, options: object = None) -> None:
        super().__init__(options)
        self._sessions: dict[str, ChatSession] = {}

    async def add(self, session: ChatSession) -> None:
        """Keep ``session`` under its id."""
        self._sessions[session.id] = session

    async def get(self, session_id: str) -> ChatSession | None:
        """The session with this id, if it is still kept."""
        return self._sessions.get(session_id)

    def discard(self, session_id: str) -> None:
        """Forget the session with this id."""
        self._sessions.pop(session_id, None)

    def replay_log(self, session_id: str, capacity: int) -> ReplayLog:
        """A log in memory."""
        return MemoryReplayLog(capacity)

    def __len__(self) -> int:
        return len(self._sessions)
