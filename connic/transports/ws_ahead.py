"""The messages the owner of a session had queued, ahead of each message a resume holds.

Part of :mod:`~connic.transports.ws_resume` (kept apart for size): :class:`Ahead` follows the
owner's queue through the session's record and log, so that ``max_queued`` counts each held
message (:mod:`~connic.transports.ws_held`) with the owner's messages still queued when it came.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import TYPE_CHECKING

from connic.frames import MessageId

if TYPE_CHECKING:
    from connic.stores import SessionRecord, SessionStore

__all__ = ["Ahead", "Pending"]

log = logging.getLogger("connic.websocket")

Pending = tuple[MessageId, int, "str | None"]  # a message the owner accepted: its id, number, agent named


class Ahead:
    """The messages the owner had queued behind its reply, ahead of each held message: its ``max_queued`` count.

    On one process a message sent while a reply runs is counted with every message already
    queued behind that reply (PROTOCOL.md §5), those the client sent before it dropped too.
    The follower cannot see the owner's queue: it reads the session's record once it holds a
    message (its pending messages: the one in flight, then those queued), and follows the
    owner through its log: the next queued message starts once every agent of the one in
    flight ended its reply (or when a reply to it comes); a cancel passed to the owner drops
    its queued messages with that id unless the one in flight has it, as on one process (that
    one is stopped then, and the next queued one begins at once).
    Each held message is counted with the owner's messages still queued when it came
    (:meth:`held`, then :meth:`count` when it is admitted). A message held before the record
    was read counts those the record lists, less the ones cancels sent before it dropped.
    A held cancel (:func:`hold_behind`) that drops a queued message of the owner's is noted
    (:attr:`took`): it answers no ``not_found`` here, its held messages refused or not.
    """

    __slots__ = (
        "agents",
        "arrived",
        "cancels",
        "current",
        "ended",
        "frames",
        "loading",
        "queued",
        "snapshots",
        "stopping",
        "took",
    )

    def __init__(self, agents: tuple[str, ...]) -> None:
        self.agents = agents  # the connector's: those answering a message that names none
        self.loading: asyncio.Task[SessionRecord | None] | None = None  # the record's read, once a message is held
        self.queued: list[Pending] | None = None  # the owner's queued messages, once its record was read
        self.current: Pending | None = None  # the owner's message in flight, as far as its log says
        self.ended: set[str] = set()  # the agents whose reply to it ended
        # Messages in flight a cancel stopped (the next one began then): each one's id, and the agents
        # whose end of it is still to come (its frames are not the next one's, which may share its id).
        self.stopping: list[tuple[MessageId, set[str]]] = []
        self.frames: list[str] = []  # frames followed while the record was read (applied after it)
        # Cancels passed to the owner before its record was read: each one's id, and its held frame's mark.
        self.cancels: list[tuple[MessageId, str | None]] = []
        # The marks (inbox ``extra``) of the held cancels that dropped a message the owner queued: on
        # one process that cancel found a queued message, so it answers no not_found (cancel_behind).
        self.took: set[str] = set()
        # Each held message (in order): how many the owner had queued when it came; or None, and
        # how many cancels were passed before it, when the record was not read yet.
        self.snapshots: list[tuple[int | None, int]] = []
        self.arrived = 0  # how many messages were held so far

    def held(self) -> None:
        """A message is held: it comes behind the owner's messages queued now."""
        queued = self.queued
        self.snapshots.append((len(queued) if queued is not None else None, len(self.cancels)))
        self.arrived += 1

    def follows(self, store: SessionStore, session_id: str) -> None:
        """The resume follows the owner: its record is read once a message is held (none else: no round trip)."""
        if self.loading is None and self.snapshots:
            self.loading = asyncio.ensure_future(store.load(session_id))
            self.loading.add_done_callback(self._read)

    def passed(self, message_id: MessageId, mark: str | None = None) -> None:
        """A cancel of ``message_id`` went to the owner: it drops its queued messages with it (PROTOCOL.md §5).

        ``mark``: the ``extra`` of the cancel's own frame, when it is held behind held messages too.
        """
        if self.queued is None:
            self.cancels.append((message_id, mark))
        else:
            self._cancel(message_id, mark)

    def seen(self, frames: list[str]) -> None:
        """Frames followed from the owner's log: note which of its queued messages it began."""
        if self.queued is None:
            if self.loading is not None:  # the record may be older than these: applied after it
                self.frames += [data for data in frames if not data.startswith(_CHUNK)]
            return
        for data in frames:
            if not self.queued:
                return  # nothing queued is left to count: the rest need not be read
            if data.startswith(_CHUNK):
                continue  # a chunk of a reply that began with a stream_start: never one's start or end
            frame = json.loads(data)
            agent = frame.get("agent")
            if agent is None or frame.get("type") not in _REPLY:
                continue
            message_id = frame.get("id")
            if self._stopped(message_id, agent, frame["type"]):
                continue
            current = self.current
            if current is not None and message_id == current[0]:
                if frame["type"] in _ENDED:
                    self.ended.add(agent)
                    if self.ended >= self._answering(current):
                        self._next()
            elif message_id == self.queued[0][0]:
                self._next()  # its reply began: the one before it ended, its end not seen here
                if frame["type"] in _ENDED:
                    self.ended.add(agent)

    async def count(self) -> int:
        """How many of the owner's messages were queued when the next held message came (0 when unknown)."""
        if not self.snapshots:
            return 0
        if self.snapshots[0][0] is None and self.loading is not None:
            await asyncio.wait([self.loading])  # taken over before the read came back: it is awaited
            self._read(self.loading)
        return self.snapshots.pop(0)[0] or 0

    def _read(self, task: asyncio.Future[SessionRecord | None]) -> None:
        # The owner's record was read: its messages in flight and queued, the cancels and frames since applied.
        if self.queued is not None:
            return  # done already
        record = None
        if task.cancelled():
            pass
        elif task.exception() is not None:  # counted as an empty queue (as before the read), said once
            log.info("the record of a session followed could not be read: %s", task.exception())
        else:
            record = task.result()
        pending = list(record.pending or ()) if record is not None and record.busy else []
        self.current = pending[0] if pending else None
        self.queued = pending[1:]
        after: list[int] = []  # how many were queued after each cancel passed before the read (none: first)
        for message_id, mark in self.cancels:
            after.append(len(self.queued))
            self._cancel(message_id, mark)
        after.append(len(self.queued))
        # A message held before the read counts what the record lists, less what the cancels before it dropped.
        self.snapshots = [(after[cancels] if count is None else count, cancels) for count, cancels in self.snapshots]
        self.cancels.clear()
        frames, self.frames = self.frames, []
        self.seen(frames)

    def _answering(self, message: Pending) -> set[str]:
        # The agents answering a message: the one it named, or each of the connector's.
        return {message[2]} if message[2] is not None else set(self.agents)

    def _next(self) -> None:
        # The owner's message in flight ended: it begins its next queued one.
        assert self.queued is not None
        self.current = self.queued.pop(0) if self.queued else None
        self.ended = set()

    def _stopped(self, message_id: MessageId, agent: str, kind: str) -> bool:
        # Whether a frame is of a message a cancel stopped (its end, coming after the next one began).
        for stopped_id, agents in self.stopping:
            if stopped_id == message_id and agent in agents:
                if kind in _ENDED:
                    agents.discard(agent)
                    if not agents:
                        self.stopping = [entry for entry in self.stopping if entry[1]]
                return True
        return False

    def _cancel(self, message_id: MessageId, mark: str | None) -> None:
        assert self.queued is not None
        current = self.current
        if current is not None and current[0] == message_id and not self.ended >= self._answering(current):
            # The one in flight has it: that one is stopped, the queued ones stay (PROTOCOL.md §5).
            # On one process the next one begins then, the cancelled reply ending at once: the
            # messages sent after the cancel no longer count it as queued (its end, followed
            # later, is not taken for the next one's).
            self.stopping.append((message_id, self._answering(current) - self.ended))
            self._next()
            return
        kept = [message for message in self.queued if message[0] != message_id]
        if len(kept) < len(self.queued) and mark is not None:
            self.took.add(mark)
        self.queued[:] = kept


_CHUNK = '{"type":"stream_chunk"'  # how connic encodes a chunk (frames/server.py)
_REPLY = frozenset(
    {"stream_start", "stream_chunk", "tool_call", "tool_result", "progress", "stream_end", "response", "error"}
)
_ENDED = frozenset({"stream_end", "response", "error"})  # the frames of an agent that end its reply
