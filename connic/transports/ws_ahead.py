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
from connic.frames.server import CHUNK_PREFIX

if TYPE_CHECKING:
    from connic.stores import SessionRecord, SessionStore

__all__ = ["Ahead", "AfterRead", "Pending"]

log = logging.getLogger("connic.websocket")

Pending = tuple[MessageId, int, "str | None"]  # a message the owner accepted: its id, number, agent named
_Stopping = tuple[MessageId, set[str]]  # a stopped message's id, and its agents whose end is still to come


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

    A cancel of the message begun here only (the owner's stop of the one before it not followed
    yet) is in doubt: the owner may take it while that stop still runs, and then it passes over
    the stopped message and drops every queued one with the id (docs/protocol.md, "Cancelling"),
    the one begun here too, where it would have stopped that one and left those behind it. Which
    one it did shows in its log (that message's frames, or those of a later one first): the
    held messages that came after the cancel count what it left (:meth:`count`, once every
    frame of the owner was followed: a message it never began was dropped).
    """

    __slots__ = (
        "agents",
        "arrived",
        "cancels",
        "current",
        "doubts",
        "ended",
        "frames",
        "gone",
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
        self.stopping: list[_Stopping] = []
        # Cancels that stopped a message begun here only (the stop before it not followed): each
        # one's message, its stopping entry, the queued ones with its id it left, its held frame's mark.
        self.doubts: list[tuple[Pending, _Stopping, list[Pending], str | None]] = []
        # For each of them that the owner took as a drop: that message's number and those of the
        # queued ones with its id it dropped too (gone from what each later held message counts).
        self.gone: list[tuple[int, set[int]]] = []
        self.frames: list[str] = []  # frames followed while the record was read (applied after it)
        # Cancels passed to the owner before its record was read: each one's id, and its held frame's mark.
        self.cancels: list[tuple[MessageId, str | None]] = []
        # The marks (inbox ``extra``) of the held cancels that dropped a message the owner queued: on
        # one process that cancel found a queued message, so it answers no not_found (cancel_behind).
        self.took: set[str] = set()
        # Each held message (in order): the owner's messages in flight and queued when it came; or
        # None, and how many cancels were passed before it, when the record was not read yet.
        self.snapshots: list[tuple[tuple[Pending, ...] | None, int]] = []
        self.arrived = 0  # how many messages were held so far

    def held(self) -> None:
        """A message is held: it comes behind the owner's messages queued now."""
        self.snapshots.append((self._ahead() if self.queued is not None else None, len(self.cancels)))
        self.arrived += 1

    def follows(self, store: SessionStore, session_id: str) -> None:
        """The resume follows the owner: its record is read once a message is held or a cancel passed (none else).

        Once it is read for, the frames followed are kept: a cancel in doubt is settled by them.
        """
        if self.loading is None and (self.snapshots or self.cancels):
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
                self.frames += [data for data in frames if not data.startswith(CHUNK_PREFIX)]
            return
        for data in frames:
            if not self.queued and not self.doubts:
                return  # nothing queued is left to count: the rest need not be read
            if data.startswith(CHUNK_PREFIX):
                continue  # a chunk of a reply that began with a stream_start: never one's start or end
            frame = json.loads(data)
            agent = frame.get("agent")
            if agent is None or frame.get("type") not in _REPLY:
                continue
            message_id = frame.get("id")
            stopped = self._stopped(message_id, agent, frame["type"])
            if stopped is not None:
                # A message whose cancel was in doubt began: the owner stopped it in flight.
                self.doubts = [doubt for doubt in self.doubts if doubt[1] is not stopped]
                continue
            if self.doubts and any(message[0] == message_id for message in self._ahead()):
                self._dropped(message_id)  # a later message's frame: those in doubt (other ids) never began
            current = self.current
            if current is not None and message_id == current[0]:
                if frame["type"] in _ENDED:
                    self.ended.add(agent)
                    if self.ended >= self._answering(current):
                        self._next()
            elif self.queued and message_id == self.queued[0][0]:
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
        self._dropped()  # every frame of the owner was followed: a message it never began was dropped
        ahead = list(self.snapshots.pop(0)[0] or ())
        for number, numbers in self.gone:
            if all(message[1] != number for message in ahead):  # it came after that cancel
                ahead = [message for message in ahead if message[1] not in numbers]
        return max(len(ahead) - 1, 0)  # the first is in flight

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
        # The record holds what the frames numbered up to its seq did, those followed meanwhile too
        # (the ends of replies: the message it lists first may have ended, its answer winding
        # down): applied again, an end ended the next message with its id. The cancels passed
        # before the read reach the owner after it (AfterRead): the record never has them.
        seq = record.seq if record is not None else 0
        self.frames = [frame for frame in self.frames if _seq(frame) > seq]
        if self.current is not None and record is not None:
            self.ended = set(record.ended)
            if self.ended >= self._answering(self.current):
                self._next()
        after: list[tuple[Pending, ...]] = []  # what was ahead after each cancel passed before the read (none: first)
        for message_id, mark in self.cancels:
            after.append(self._ahead())
            self._cancel(message_id, mark)
        after.append(self._ahead())
        # A message held before the read counts what the record lists, less what the cancels before it dropped.
        self.snapshots = [(after[cancels] if count is None else count, cancels) for count, cancels in self.snapshots]
        self.cancels.clear()
        frames, self.frames = self.frames, []
        self.seen(frames)

    def _ahead(self) -> tuple[Pending, ...]:
        # The owner's message in flight and those queued behind it, as far as its log says.
        assert self.queued is not None
        return (self.current, *self.queued) if self.current is not None else ()

    def _answering(self, message: Pending) -> set[str]:
        # The agents answering a message: the one it named, or each of the connector's.
        return {message[2]} if message[2] is not None else set(self.agents)

    def _next(self) -> None:
        # The owner's message in flight ended: it begins its next queued one.
        assert self.queued is not None
        self.current = self.queued.pop(0) if self.queued else None
        self.ended = set()

    def _stopped(self, message_id: MessageId, agent: str, kind: str) -> _Stopping | None:
        # The stopped message a frame is of, if any (its end, coming after the next one began).
        for entry in self.stopping:
            if entry[0] == message_id and agent in entry[1]:
                if kind in _ENDED:
                    entry[1].discard(agent)
                    if not entry[1]:
                        self.stopping = [entry for entry in self.stopping if entry[1]]
                return entry
        return None

    def _dropped(self, later: MessageId | None = None) -> None:
        # The messages whose cancel was in doubt never began: the owner dropped them, with the queued
        # ones with their id (it took the cancel while the stop before them ran): gone from its queue.
        # ``later``: the id of the later message whose frame says so (those in doubt with it wait).
        doubts = [doubt for doubt in self.doubts if later is None or doubt[0][0] != later]
        self.doubts = [doubt for doubt in self.doubts if doubt not in doubts]
        for message, entry, kept, mark in doubts:
            self.stopping = [stopping for stopping in self.stopping if stopping is not entry]
            numbers = {queued[1] for queued in kept}
            self.gone.append((message[1], numbers))
            if mark is not None:
                self.took.add(mark)  # it dropped queued messages: no not_found, as on one process
            assert self.queued is not None
            ahead = [queued for queued in self._ahead() if queued[1] not in numbers]
            if ahead[:1] != [self.current]:
                self.ended = set()
            self.current = ahead[0] if ahead else None
            self.queued[:] = ahead[1:]

    def _cancel(self, message_id: MessageId, mark: str | None) -> None:
        assert self.queued is not None
        current = self.current
        if current is not None and current[0] == message_id and not self.ended >= self._answering(current):
            # The one in flight has it: that one is stopped, the queued ones stay (PROTOCOL.md §5).
            # On one process the next one begins then, the cancelled reply ending at once: the
            # messages sent after the cancel no longer count it as queued (its end, followed
            # later, is not taken for the next one's).
            entry = (message_id, self._answering(current) - self.ended)
            if self.stopping:  # the stop before it may still run when the owner takes this
                kept = [queued for queued in self.queued if queued[0] == message_id]
                self.doubts.append((current, entry, kept, mark))
            self.stopping.append(entry)
            self._next()
            return
        kept = [message for message in self.queued if message[0] != message_id]
        if len(kept) < len(self.queued) and mark is not None:
            self.took.add(mark)
        self.queued[:] = kept


class AfterRead:
    """Passes a follow's cancels to the owner once :class:`Ahead`'s read of its record came back, in order.

    The read begins when the first message is held or the first cancel passed; a cancel passed
    meanwhile could be taken by the owner, and the record saved, before Redis answered the read
    (under load: seen in test_review5). That record already has the cancel applied, and what it
    dropped leaves no frame to tell: a message held before the cancel counted the owner's queue
    without it (one process refuses it ``queue_full``), and a held cancel whose queued message
    it dropped was not noted as taking it (``not_found`` where one process answers nothing).
    Waiting costs each cancel passed before the read the rest of one round trip to Redis.
    """

    __slots__ = ("ahead", "store", "waiting")

    def __init__(self, ahead: Ahead, store: SessionStore) -> None:
        self.ahead = ahead
        self.store = store
        self.waiting: list[tuple[str, MessageId, bool]] = []  # cancels passed before the read came back

    def cancel(self, session_id: str, message_id: MessageId, *, held: bool = False) -> None:
        """As :meth:`SessionStore.cancel`, once the record's read (begun now if not yet) came back."""
        self.ahead.follows(self.store, session_id)
        loading = self.ahead.loading
        if not self.waiting and (loading is None or loading.done()):
            self.store.cancel(session_id, message_id, held=held)
            return
        assert loading is not None
        if not self.waiting:  # after Ahead._read (added first): the record is applied before
            loading.add_done_callback(self._pass)
        self.waiting.append((session_id, message_id, held))

    def _pass(self, _: object) -> None:
        waiting, self.waiting = self.waiting, []
        for session_id, message_id, held in waiting:
            self.store.cancel(session_id, message_id, held=held)


def _seq(data: str) -> int:
    # A logged frame's seq (its last member, sequenced()).
    number = json.loads(data).get("seq")
    return number if isinstance(number, int) else 0


_REPLY = frozenset(
    {"stream_start", "stream_chunk", "tool_call", "tool_result", "progress", "stream_end", "response", "error"}
)
_ENDED = frozenset({"stream_end", "response", "error"})  # the frames of an agent that end its reply
