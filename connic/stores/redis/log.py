"""The ``redis`` store's replay log: a session's sequenced frames in a Redis stream.

Each stream entry holds the frames one write appended, joined by newlines in its one field
``f`` (a frame's JSON never holds a raw newline), and its id is ``0-<the seq of its newest
frame>``: the frames of a write are numbered on without a gap, so each one's seq follows.
An entry per write instead of one per frame costs Redis one ``XADD`` for the batch, not one
each (docs/performance.md, R1 and RM). Reading from a seq starts at the entry that holds it
(the first with a greater id) and skips the frames before it.
"""

from __future__ import annotations

import collections
import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from connic.errors import ServerShuttingDown
from connic.frames import MessageId
from connic.frames.server import CHUNK_PREFIX
from connic.stores import ReplayLog

if TYPE_CHECKING:
    from connic.stores.redis import RedisStore

__all__ = ["Logged", "RedisReplayLog", "frames_after", "logged", "may_end", "seq_of", "unfinished"]

_ENDS = ('"stream_end"', '"response"', '"error"')  # in a frame that may end a reply (or one quoting one)
# The frames of an agent's reply before its end (PROTOCOL.md §9: progress events come between
# a reply's start and its end), and those that end it.
_OPEN = frozenset({"stream_start", "stream_chunk", "tool_call", "tool_result", "progress"})
_REPLY = _OPEN | {"stream_end", "response", "error"}
_DRAINED = ServerShuttingDown.code  # the drain's refusal of a queued message (ChatSession.drain)

Logged = list[tuple[int, str]]
"""Logged frames as read from the stream: (seq, frame), oldest first."""


def may_end(frame: str) -> bool:
    """Whether the encoded ``frame`` may end a reply: a chunk never does; another frame naming an end may.

    Checked for every frame logged: a chunk is known by its first bytes, without scanning it.
    """
    if frame.startswith(CHUNK_PREFIX):
        return False
    return any(marker in frame for marker in _ENDS)


class RedisReplayLog(ReplayLog):
    """A session's replay log in a Redis stream; appends are queued for the store's writer."""

    __slots__ = ("_capacity", "_sizes", "_store", "fence", "first", "last", "pending", "session_id")

    def __init__(self, store: RedisStore, session_id: str, capacity: int) -> None:
        self._store = store
        self._capacity = capacity
        self.session_id = session_id
        self.fence: int | None = None  # the owner's token, once the store holds the session
        self.last = 0  # the newest seq logged (or queued)
        self.pending: list[str] = []  # the frames not written yet, numbered from ``first`` on
        self.first = 0
        self._sizes: collections.deque[int] = collections.deque(maxlen=capacity)

    def append(self, seq: int, data: str) -> None:
        """Queue frame ``seq`` (see :meth:`ReplayLog.append`); the store's writer sends it with the next pipeline.

        Called for every frame of every reply: the log is queued for the writer with its
        first pending frame only (later ones wake it only when they may end a reply).
        """
        self.last = seq
        pending = self.pending
        pending.append(data)
        self._sizes.append(len(data) if data.isascii() else len(data.encode("utf-8", "surrogatepass")))
        if len(pending) == 1:
            self.first = seq
            self._store._log_dirty(self, may_end(data))
        elif may_end(data):
            self._store._kick()

    async def since(self, seq: int) -> list[str] | None:
        """The frames numbered above ``seq`` (XRANGE); None when the first of them was trimmed."""
        store = self._store
        # The frames numbered from now on are held by the session for the resume (ChatSession.replay):
        # the log must hold those up to here; the ones logged meanwhile may come too (they are skipped).
        last = self.last
        await store.flush()
        # In a pipeline shared with the other resumes of this round.
        raw = await store._shared("XRANGE", store._keys(self.session_id)[3], f"0-{seq + 1}", "+")
        frames = frames_after(logged(raw), seq)  # None if trimmed, or a write lost while Redis was down
        if frames is None or seq + len(frames) < last or last - seq > self._capacity:
            return None  # never a gap; and what the stream holds past the capacity is not replayed
        return frames

    def stats(self) -> tuple[int, int]:
        """Frames logged by this process (at most the capacity) and their size in bytes."""
        return len(self._sizes), sum(self._sizes)

    @property
    def capacity(self) -> int:
        """The most frames the log keeps."""
        return self._capacity


def seq_of(entry_id: str) -> int:
    """The seq of a log entry's id ``0-<seq>``: its newest frame's."""
    return int(entry_id.partition("-")[2])


def logged(raw: Any) -> Logged:
    """The frames of stream entries as Redis sends them (``[id, ["f", frames joined by newlines]]``)."""
    frames: Logged = []
    for entry_id, (_, joined) in raw:
        held = joined.split("\n")
        first = seq_of(entry_id) - len(held) + 1
        frames += enumerate(held, first)
    return frames


def frames_after(frames: Logged, seq: int) -> list[str] | None:
    """The logged ``frames`` numbered above ``seq``, if they follow it with no gap, else None.

    Those up to ``seq`` are skipped: they share an entry with the first one wanted.
    """
    after = []
    for number, frame in frames:
        if number <= seq:
            continue
        seq += 1
        if number != seq:
            return None
        after.append(frame)
    return after


def unfinished(
    frames: list[str], pending: Sequence[tuple[MessageId, int, str | None]] | None = None
) -> list[tuple[MessageId, frozenset[str], str | None]]:
    """The messages whose replies ``frames`` (a session's log, oldest first) leave unfinished.

    Each as (id, the agents that ended their reply to it, the one agent it named or None);
    the caller, which knows the connector's agents, ends each agent answering it (the one it
    named, or every one) but those that ended. ``pending``: the messages the session's record
    lists as accepted and not answered (:attr:`~connic.stores.SessionRecord.pending`), when it
    does; each of them is unfinished for its agents with no end for it in the log after its
    ``ack``. The log holds the last ``replay_buffer`` frames only: it may have lost the acks
    of messages queued behind a long reply, which the record still lists. An error without
    an agent ends a pending message for every agent only when it is the drain's refusal of it
    while queued (``server_shutting_down``, none of its agents started): any other refused a
    new message that reused its id (read from the log alone too, :func:`_read_from_log`).
    """
    if pending is not None:
        decoded = [json.loads(data) for data in frames]
        return [lost for lost in (_unfinished(decoded, *message) for message in pending) if lost is not None]
    return _read_from_log(frames)


def _unfinished(
    decoded: list[dict[str, Any]], message_id: MessageId, number: int, named: str | None
) -> tuple[MessageId, frozenset[str], str | None] | None:
    """One pending message's unfinished replies: from the log's frames after its ack (all, if it was trimmed)."""
    start = next((i for i, f in enumerate(decoded) if f.get("type") == "ack" and f.get("message_number") == number), -1)
    key = json.dumps(message_id)  # ids are strings or numbers: "1" and 1 are two messages
    ended: set[str] = set()
    started = False  # whether an agent sent a frame for it: it was being answered
    for frame in decoded[start + 1 :]:
        kind = frame.get("type")
        if kind not in _REPLY or json.dumps(frame.get("id")) != key:
            continue
        agent = frame.get("agent")
        if agent is None:
            # Ids need not be unique: an error naming no agent mostly refused a NEW message with
            # this id (rate_limited, queue_full, ...: never acked), which ends nothing else, as on
            # one process. Only the drain refuses an accepted message, one still queued.
            if kind == "error" and frame.get("code") == _DRAINED and not started:
                return None
            continue
        started = True
        if kind not in _OPEN:
            ended.add(agent)
    if named is not None and named in ended:
        return None
    return message_id, frozenset(ended), named


def _read_from_log(frames: list[str]) -> list[tuple[MessageId, frozenset[str], str | None]]:
    """:func:`unfinished` for a record that does not list its pending messages: read from the log alone.

    Messages are answered one at a time, in order. The message answered last (the last a
    reply frame in the log names: a ``stream_start``, a chunk, a progress event, an end) is
    unfinished for each of its agents that has no ``stream_end``, ``response`` nor error for
    it, whether it sent something or not. A reply longer than the log has lost its start and
    ack, is known by its chunks, and is taken to name no agent. An acked message that got no
    frame from any agent is unfinished for every agent it names (no agent ended it) if it
    came after the last message an agent answered: it was queued behind it, or being answered
    (streaming off, or before its first chunk). An error without an agent ends a message for
    every agent only when it is the drain's refusal of it while queued, as :func:`unfinished`
    reads it: any other refused a new message that reused its id. Ids need not be unique: the
    messages sharing one are told apart by their acks, in order, an agent's frame after its own
    end for that id being the next one's (read by id alone, the first one's end made the next
    one, in flight or queued, look ended: it never got its ``producer_lost``).
    """
    # Ids need not be unique: each id's acked messages, in order (their number and agent named), and
    # which of them its agents answer now (an agent's frame after its own end for that id begins
    # the next one: it sends nothing after its end, and messages are answered one at a time).
    acked: dict[Any, list[tuple[int, str | None]]] = {}
    order: list[tuple[Any, MessageId, int]] = []  # every ack: (key, id, its index among its id's)
    at: dict[Any, int] = {}  # key: the index of the message of that id an agent answered last
    ended: dict[Any, set[str]] = {}  # key: the agents whose reply to that message ended
    whole: set[tuple[Any, int]] = set()  # messages refused by the drain while queued: (key, index)
    current: tuple[Any, MessageId] | None = None  # the message an agent answered last (key, id)
    for data in frames:
        frame = json.loads(data)
        kind, message_id = frame.get("type"), frame.get("id")
        key = json.dumps(message_id)  # ids are strings or numbers: "1" and 1 are two messages
        if kind == "ack":
            messages = acked.setdefault(key, [])
            order.append((key, message_id, len(messages)))
            messages.append((frame["message_number"], frame.get("agent")))
            continue
        agent = frame.get("agent")
        if kind == "error" and agent is None:
            # As for a listed message (_unfinished): only the drain's refusal of a message still
            # queued ends it (the first of that id not answered yet); any other such error refused
            # a new message reusing its id (never acked).
            if frame.get("code") == _DRAINED:
                queued = [
                    index for index in range(at.get(key, -1) + 1, len(acked.get(key, ()))) if (key, index) not in whole
                ]
                if queued:
                    whole.add((key, queued[0]))
            continue
        if agent is None or kind not in _REPLY:
            continue
        if key not in at:
            at[key] = 0 if key in acked else -1  # -1: a reply whose ack the log lost (it is longer than the log)
        elif agent in ended.get(key, ()) and at[key] + 1 < len(acked.get(key, ())):
            at[key] += 1  # a new reply of an agent that ended its last: the next message with this id
            ended[key] = set()
        current = (key, message_id)
        if kind not in _OPEN:
            ended.setdefault(key, set()).add(agent)
    lost: list[tuple[MessageId, frozenset[str], str | None]] = []
    if current is not None and (current[0], at[current[0]]) not in whole:
        key, message_id = current
        messages = acked.get(key, [])
        named = messages[at[key]][1] if 0 <= at[key] < len(messages) else None
        lost.append((message_id, frozenset(ended.get(key, ())), named))
    last_answered = max(
        (acked[key][index][0] for key, index in at.items() if 0 <= index < len(acked.get(key, ()))), default=0
    )
    for key, message_id, index in order:
        number, named = acked[key][index]
        if index > at.get(key, -1) and (key, index) not in whole and number > last_answered:
            lost.append((message_id, frozenset(), named))
    return lost
