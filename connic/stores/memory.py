"""The built-in ``memory`` store: sessions live in this process (the default)."""

from __future__ import annotations

import array
import itertools
from collections.abc import Iterable
from typing import TYPE_CHECKING

from connic.stores import ReplayLog, SessionStore

if TYPE_CHECKING:
    from connic.session import ChatSession

__all__ = ["BLOCK", "MemoryReplayLog", "MemoryStore"]


BLOCK = 32
"""Frames sealed together into one block of a :class:`MemoryReplayLog`."""


class MemoryReplayLog(ReplayLog):
    """A session's frames: the newest as they were sent, the older sealed ``BLOCK`` at a time as UTF-8.

    Not a ``str`` object per frame: a log holds thousands of frames per session, and a
    ``str`` per frame cost 142 bytes of memory each. Nor one buffer per session that grows
    with each frame: it was copied again at every reallocation, and S7 spent some 8% more
    CPU per turn with the default ``replay_buffer`` than with 64 frames (docs/performance.md).
    Here the newest frames are kept as sent until ``BLOCK`` of them are sealed into one
    ``bytes`` block with where each frame ends; a block is written once and never copied,
    and goes as a whole once all its frames are older than the newest ``capacity``.
    """

    __slots__ = ("_blocks", "_capacity", "_first", "_last", "_recent")

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        # Sealed blocks, oldest first: their UTF-8 and where each frame ends in it. A list, not a
        # deque, which takes a 64-slot block as it is made: most sessions' logs are empty or short.
        self._blocks: list[tuple[bytes, array.array[int]]] = []
        self._recent: list[str] = []  # the frames after the last block, as sent
        self._first = 1  # the number of the first frame kept (the oldest block's first)
        self._last = 0  # the number of the newest frame

    def append(self, seq: int, data: str) -> None:
        """Log frame ``seq``; the oldest goes when the log is full."""
        if self._last == 0:
            self._first = seq  # a log starts at the first frame it is given (a restored session's next)
        self._last = seq
        recent = self._recent
        recent.append(data)
        if len(recent) == BLOCK:
            self._seal()

    def _seal(self) -> None:
        text = "".join(self._recent)
        if text.isascii():
            sizes: Iterable[int] = map(len, self._recent)
        else:
            sizes = (len(frame.encode("utf-8", "surrogatepass")) for frame in self._recent)
        self._blocks.append((text.encode("utf-8", "surrogatepass"), array.array("I", itertools.accumulate(sizes))))
        self._recent = []
        while self._last - (self._first + BLOCK) + 1 >= self._capacity:  # the oldest block is all past capacity
            del self._blocks[0]
            self._first += BLOCK

    @property
    def _oldest(self) -> int:
        """The number of the oldest frame held: the newest ``capacity`` are."""
        return max(self._first, self._last - self._capacity + 1)

    async def since(self, seq: int) -> list[str] | None:
        """The frames numbered above ``seq``; None when the one after ``seq`` was evicted."""
        return self._frames(seq + 1)

    def _frames(self, start: int) -> list[str] | None:
        if start < self._oldest:
            return None
        frames: list[str] = []
        index, skip = divmod(start - self._first, BLOCK)
        for data, ends in itertools.islice(self._blocks, index, None):
            begin = ends[skip - 1] if skip else 0
            for end in ends[skip:]:
                frames.append(data[begin:end].decode("utf-8", "surrogatepass"))
                begin = end
            skip = 0
        sealed = len(self._blocks) * BLOCK
        frames += self._recent[max(0, start - self._first - sealed) :]
        return frames

    def stats(self) -> tuple[int, int]:
        """Frames held and their size in bytes (UTF-8)."""
        if self._last == 0:
            return 0, 0
        frames = self._frames(self._oldest) or []
        return len(frames), sum(len(frame.encode("utf-8", "surrogatepass")) for frame in frames)


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
