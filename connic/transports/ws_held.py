"""The frames a resume holds while it follows another process's reply, and the cancels among them.

Part of :mod:`~connic.transports.ws_resume` (kept apart for size): while a shared store waits
for another process to let the session go, the resume holds what the client sends, in order
(:func:`~connic.transports.ws_resume._reading_meanwhile`). A ``cancel`` of messages held there
is held right behind each one with its id (:func:`hold_behind`), so that the connection drops
each as it admits it (:func:`cancel_behind`), as a cancel drops every queued message with its
id on one process (PROTOCOL.md §5); :class:`Doubts` lets such cancels go when the owner's own
message with that id took them (docs/protocol.md, "Cancelling"). The held messages are admitted
as if behind the owner's reply (:class:`Behind`), and behind the messages the owner still had
queued then (:class:`Ahead`): ``max_queued`` refuses the same ones.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
from typing import TYPE_CHECKING

from aiohttp import WSMessage, WSMsgType

from connic.errors import ProtocolError
from connic.frames import CancelFrame, ClientFrame, MessageFrame, MessageId, parse_client_frame
from connic.stores import SessionRecord, SessionStore

if TYPE_CHECKING:
    from connic.message import Message
    from connic.session import ChatSession
    from connic.transports.ws_connection import Connection

__all__ = ["Ahead", "Behind", "Doubts", "cancel_behind", "held_at", "hold_behind", "parse_held"]

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


class Behind:
    """Held messages admitted as they would have been behind the owner's reply, sent meanwhile.

    On one process they came while that reply ran: ``max_queued`` of them wait behind it (with
    the messages already queued behind it, :class:`Ahead`), the rest are refused ``queue_full``
    (PROTOCOL.md §5), and a cancel of a queued one makes room where it came. Here the owner's
    replies ended before the session was taken over: its queue is empty, and the answering task
    takes the first held message while the next ones are admitted (an admission waits on the
    store's rate bucket; a full queue lets the task run). Each held message it took counts as
    still queued until every held frame was handled (the connection then drops this); one that
    a held cancel dropped (:func:`cancel_behind`, right behind it) counts as queued for the held
    messages that came before that cancel.
    """

    __slots__ = ("admitted", "ahead", "dropped", "held", "last", "owner", "session")

    def __init__(self, session: ChatSession, ahead: Ahead) -> None:
        self.session = session
        self.ahead = ahead  # the owner's queued messages, ahead of each held one
        self.owner = 0  # how many of them the message being admitted counts
        self.admitted: list[Message] = []  # the held messages accepted, in order
        self.held = -1  # which held message is admitted (0 the first)
        self.last: Message | None = None  # the one just accepted, if it was (None if refused)
        self.dropped: list[int] = []  # for each held message a held cancel dropped: how many came before that cancel

    async def admit(self, frame: MessageFrame) -> None:
        """Admit a held message, the ones taken from the queue meanwhile counted as queued."""
        session = self.session
        self.owner = await self.ahead.count()
        self.held += 1
        self.last = None
        count = session.count
        await session.admit(frame, self.waiting)
        if session.count > count:  # accepted: queued last, the answering task not run since
            self.last = session.queue[-1]
            self.admitted.append(self.last)

    def waiting(self) -> int:
        """How many messages wait behind the owner's reply: its queued ones, the queue's, the held ones begun since."""
        # A message's ``at`` is 0.0 until the answering task takes it; a dropped one never is.
        begun = sum(1 for message in self.admitted if message.at)
        return self.owner + len(self.session.queue) + begun + sum(1 for came in self.dropped if self.held < came)

    def dropping(self, message_id: MessageId, extra: object) -> None:
        """A held cancel (its inbox frame's ``extra``) drops the message just admitted, if it has ``message_id``."""
        last = self.last
        if last is not None and last.id == message_id and isinstance(extra, str) and extra.startswith(_MARKS):
            self.dropped.append(int(extra.rpartition(" ")[2]))
            self.last = None


def cancel_behind(conn: Connection, frame: MessageFrame) -> MessageId | None:
    """The id of a message just read from the inbox whose cancel is held right behind it; that cancel taken.

    The resume holds a cancel of held messages right behind each one with its id
    (:func:`hold_behind`). Each message and its cancel are handled as one step: admitted, then
    dropped before the session's answering task (woken by the admission) can start it, as a
    queued message's cancel drops it on one process (PROTOCOL.md §5): nothing is sent for it
    but its ack. None when nothing was taken, or a quiet copy of the cancel found its message
    refused.
    """
    if frame.id is None or not conn._inbox or conn._inbox[0].type is not WSMsgType.TEXT:
        return None
    parsed = parse_held(conn._inbox[0].data)
    if not isinstance(parsed, CancelFrame) or parsed.id != frame.id:
        return None
    extra = conn._inbox.pop(0).extra
    behind = conn._behind
    # The cancel itself is quiet too when it dropped a message the owner queued (Ahead.took):
    # on one process it found that one, and answers no not_found whatever became of the held ones.
    took = behind is not None and isinstance(extra, str) and extra in behind.ahead.took
    if not (isinstance(extra, str) and (extra.startswith(_QUIET) or took)):
        if behind is not None:
            behind.dropping(frame.id, extra)
        return frame.id  # a cancel itself: it drops the message, or answers not_found
    session = conn.session
    if session is None or not session.cancels(frame.id):
        return None  # a quiet copy behind a refused message: nothing to drop, nothing to say
    if behind is not None:
        behind.dropping(frame.id, extra)
    # It drops a message: the cancel it was copied from, still held, answers no not_found.
    mark = extra.removeprefix(_QUIET).removeprefix(_LOUD)
    for at, msg in enumerate(conn._inbox):
        if msg.extra == _LOUD + mark:
            conn._inbox[at] = msg._replace(extra=_QUIET + mark)
            break
    return frame.id


class Doubts:
    """Cancels of held messages whose id a message the owner answers may share (ids need not be unique).

    On one process the message in flight (or queued) with the id comes first (docs/protocol.md,
    "Cancelling"): such a cancel, held right behind each held message with its id, is passed to
    the owner too (once, ``held=True``), which acts on it only if it has a message with that id.
    Its reply with that id ending ``cancelled`` after the pass (in the log, followed or replayed
    here before the takeover) means it took it: the held cancel (each of its frames) is let go,
    the held messages answered.
    """

    __slots__ = ("passed", "pending", "stopped")

    def __init__(self) -> None:
        # Held cancels not passed yet (nobody followed): each one's id, and the id() of its inbox
        # frames (one behind each held message with its id, :func:`hold_behind`).
        self.pending: list[tuple[MessageId, list[int]]] = []
        self.passed: dict[int, MessageId] = {}  # id() of a held cancel's frame: its id, passed to the owner
        self.stopped: set[MessageId] = set()  # ids of the owner's replies that ended cancelled after a pass

    def hold(self, held: list[WSMessage], message_id: MessageId) -> None:
        """A cancel of held messages, ``held`` behind them: passed to the owner (once) when one is followed."""
        self.pending.append((message_id, [id(msg) for msg in held]))

    def pass_on(self, store: SessionStore, session_id: str) -> None:
        """The find follows the session's owner: the held cancels not passed yet go there too."""
        for message_id, keys in self.pending:
            store.cancel(session_id, message_id, held=True)
            self.passed.update(dict.fromkeys(keys, message_id))
        self.pending.clear()

    def seen(self, frames: list[str]) -> None:
        """Frames followed from the owner's log: note its replies that ended cancelled."""
        if not self.passed:
            return
        ids = set(self.passed.values())
        for data in frames:
            if '"cancelled"' not in data:  # most frames are chunks: not parsed
                continue
            end = json.loads(data)
            if end.get("type") in _ENDS and end.get("finish_reason") == "cancelled" and end.get("id") in ids:
                self.stopped.add(end["id"])

    def settle(self, conn: Connection, frames: list[str]) -> None:
        """The session is taken over here, ``frames`` replayed: let go the held cancels the owner took."""
        self.seen(frames)
        if self.stopped:
            conn._inbox[:] = [msg for msg in conn._inbox if self.passed.get(id(msg), _NONE) not in self.stopped]


_ENDS = frozenset({"stream_end", "response"})  # the frames that end a reply cancelled


def held_at(conn: Connection, held: dict[int, MessageId], message_id: MessageId) -> list[int]:
    """Where in the inbox the held messages with ``message_id`` (not cancelled yet) are, in order."""
    if not held:
        return []
    return [at for at, msg in enumerate(conn._inbox) if held.get(id(msg), _NONE) == message_id]


def hold_behind(
    conn: Connection, held: dict[int, MessageId], at: list[int], cancel: WSMessage, arrived: int
) -> list[WSMessage]:
    """Hold ``cancel`` right behind each held message at ``at`` (itself behind the last); those held.

    On one process a cancel drops every queued message with its id (PROTOCOL.md §5): here each
    is dropped as it is admitted (:func:`cancel_behind`), before the answering task can start
    it. The copies behind the earlier ones are quiet: one of them finding nothing to drop (its
    message refused) answers nothing; only the cancel itself may answer ``not_found``, and only
    when none of them dropped one. A later cancel of that id is held in order (``not_found``).
    Each is marked with ``arrived``, how many messages were held before the cancel came: the
    ones it drops count as queued for those (:class:`Behind`), as on one process.
    """
    # Which cancel a copy came from, and when it came (aiohttp's extra: None for a text frame).
    mark = f"{next(_groups)} {arrived}"
    group = [WSMessage(WSMsgType.TEXT, cancel.data, _LOUD + mark)]
    for n, where in enumerate(reversed(at)):  # from the back: the positions before stay right
        del held[id(conn._inbox[where])]
        if n:
            group.append(WSMessage(WSMsgType.TEXT, cancel.data, _QUIET + mark))
        conn._inbox.insert(where + 1, group[-1])
    return group


_NONE = object()  # no message id (None is not one either)
# A cancel held behind several held messages (hold_behind), marked in its inbox frames' extra:
# the cancel itself, and its quiet copies (the same mark follows each).
_LOUD = "connic held cancel: "
_QUIET = "connic held cancel copy: "
_MARKS = (_LOUD, _QUIET)
_groups = itertools.count(1)


def parse_held(data: str) -> ClientFrame | None:
    """The client frame a held text frame holds; None when it is not one (it is refused once handled)."""
    try:
        return parse_client_frame(data)
    except ProtocolError:
        return None
