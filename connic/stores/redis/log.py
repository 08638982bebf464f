"""The ``redis`` store's replay log: a session's sequenced frames in a Redis stream (ids ``0-<seq>``)."""

from __future__ import annotations

import collections
from typing import TYPE_CHECKING

from connic.stores import ReplayLog

if TYPE_CHECKING:
    from connic.stores.redis import RedisStore

__all__ = ["RedisReplayLog", "frames_after", "seq_of"]


class RedisReplayLog(ReplayLog):
    """A session's replay log in a Redis stream; appends are queued for the store's writer."""

    __slots__ = ("_capacity", "_sizes", "_store", "fence", "last", "pending", "session_id")

    def __init__(self, store: RedisStore, session_id: str, capacity: int) -> None:
        self._store = store
        self._capacity = capacity
        self.session_id = session_id
        self.fence: int | None = None  # the owner's token, once the store holds the session
        self.last = 0  # the newest seq logged (or queued)
        self.pending: list[str] = []  # seq, frame, seq, frame ... not written yet
        self._sizes: collections.deque[int] = collections.deque(maxlen=capacity)

    def append(self, seq: int, data: str) -> None:
        """Queue frame ``seq``; the store's writer sends it with the next pipeline."""
        self.last = seq
        self.pending += (str(seq), data)
        self._sizes.append(len(data.encode("utf-8", "surrogatepass")))
        self._store._log_dirty(self)

    async def since(self, seq: int) -> list[str] | None:
        """The frames numbered above ``seq`` (XRANGE); None when the first of them was trimmed."""
        store = self._store
        await store.flush()
        entries = await store._call(store._client().xrange(store._keys(self.session_id)[3], f"0-{seq + 1}", "+"))
        frames = frames_after(entries, seq)  # None if trimmed, or a write lost while Redis was down
        if frames is None or seq + len(frames) < self.last:
            return None  # never a gap
        return frames

    def stats(self) -> tuple[int, int]:
        """Frames logged by this process (at most the capacity) and their size in bytes."""
        return len(self._sizes), sum(self._sizes)

    @property
    def capacity(self) -> int:
        """The most frames the log keeps."""
        return self._capacity


def seq_of(entry_id: str) -> int:
    """The seq of a log entry id ``0-<seq>``."""
    return int(entry_id.partition("-")[2])


def frames_after(entries: list[tuple[str, dict[str, str]]], seq: int) -> list[str] | None:
    """The frames of stream ``entries`` if they follow ``seq`` with no gap, else None."""
    frames = []
    for entry_id, fields in entries:
        seq += 1
        if seq_of(entry_id) != seq:
            return None
        frames.append(fields["f"])
    return frames
