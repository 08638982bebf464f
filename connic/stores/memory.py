"""The built-in ``memory`` store: sessions live in this process (the default)."""

from __future__ import annotations

import array
from typing import TYPE_CHECKING

from connic.stores import ReplayLog, SessionStore

if TYPE_CHECKING:
    from connic.session import ChatSession

__all__ = ["MemoryReplayLog", "MemoryStore"]


class MemoryReplayLog(ReplayLog):
    """A session's frames as UTF-8 in one buffer, with where each ends; the oldest go when it is full.

    Not a ``str`` object per frame: a log holds thousands of frames per session, and
    keeping each frame's object alive made every frame sent take fresh memory (S7 at
    1,000 sessions spent some 12% more CPU per turn with the default ``replay_buffer``
    than with 64 frames, docs/performance.md). Here a frame's text is copied into the
    session's buffer and its object freed once written. Evicted frames are cut from the
    front of the buffer once they are as many as the capacity: amortised O(1) per frame.
    """

    __slots__ = ("_capacity", "_data", "_dead", "_ends", "_first")

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._data = bytearray()
        self._ends = array.array("q")  # where each frame held ends in _data, the evicted ones first
        self._dead = 0  # frames evicted but still in _data (the first _dead of _ends)
        self._first = 1  # the number of the oldest frame held

    def append(self, seq: int, data: str) -> None:
        """Log frame ``seq``; the oldest goes when the log is full."""
        held = len(self._ends) - self._dead
        if not held:
            self._first = seq
        elif held == self._capacity:
            self._first += 1
            self._dead += 1
            if self._dead >= self._capacity:
                self._compact()
        self._data += data.encode("utf-8", "surrogatepass")
        self._ends.append(len(self._data))

    def _compact(self) -> None:
        """Cut the evicted frames from the front of the buffer."""
        cut = self._ends[self._dead - 1]
        del self._data[:cut]
        self._ends = array.array("q", (end - cut for end in self._ends[self._dead :]))
        self._dead = 0

    async def since(self, seq: int) -> list[str] | None:
        """The frames numbered above ``seq``; None when the one after ``seq`` was evicted."""
        start = seq + 1 - self._first
        if start < 0:
            return None
        ends, data = self._ends, self._data
        index = self._dead + start
        frames = []
        begin = ends[index - 1] if index else 0
        for end in ends[index:]:
            frames.append(data[begin:end].decode("utf-8", "surrogatepass"))
            begin = end
        return frames

    def stats(self) -> tuple[int, int]:
        """Frames held and their size in bytes (UTF-8)."""
        held = len(self._ends) - self._dead
        if not held:
            return 0, 0
        begin = self._ends[self._dead - 1] if self._dead else 0
        return held, self._ends[-1] - begin


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
