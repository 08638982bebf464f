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

import collections
import itertools
import json
from typing import TYPE_CHECKING

from aiohttp import WSMessage, WSMsgType

from connic.errors import ProtocolError
from connic.frames import CancelFrame, ClientFrame, MessageFrame, MessageId, parse_client_frame
from connic.frames.server import CHUNK_PREFIX
from connic.transports.ws_ahead import Ahead

if TYPE_CHECKING:
    from connic.message import Message
    from connic.session import ChatSession
    from connic.stores import SessionRecord
    from connic.transports.ws_ahead import AfterRead
    from connic.transports.ws_connection import Connection

__all__ = ["Ahead", "Behind", "Doubts", "cancel_behind", "held_at", "hold_behind", "parse_held"]


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
    _later_copies(conn, frame.id)
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


def _later_copies(conn: Connection, message_id: MessageId) -> None:
    # The quiet copies of later cancels of the id, held behind the same message while the first
    # one's was in doubt (Doubts): the message is taken, so each found nothing to drop here, and a
    # copy answers nothing (its cancel's own frame, behind another message, may drop that one).
    while conn._inbox and isinstance(extra := conn._inbox[0].extra, str) and extra.startswith(_QUIET):
        parsed = parse_held(conn._inbox[0].data)
        if not isinstance(parsed, CancelFrame) or parsed.id != message_id:
            return
        conn._inbox.pop(0)


class Doubts:
    """Cancels of held messages whose id a message the owner answers may share (ids need not be unique).

    On one process the message in flight (or queued) with the id comes first (docs/protocol.md,
    "Cancelling"): such a cancel, held right behind each held message with its id, is passed to
    the owner too (once, ``held=True``), which acts on it only if it has a message with that id.
    Its reply with that id ending ``cancelled`` after the pass (in the log, followed or replayed
    here before the takeover) means it took it: the held cancel (each of its frames) is let go,
    the held messages answered. One such message (however many of its agents end cancelled)
    takes one cancel, the first passed: a second cancel of the id, held behind the same messages
    while the first was in doubt, drops them then, as on one process the first stops the reply
    in flight and the second the message queued next.
    A cancel of the id passed at once (no held message had it then, :meth:`direct`) is first.

    What settles a held cancel is only how many cancels of its id were passed before it: the
    first ``n`` messages stopped take the first ``n`` cancels. So a count per id is kept, not
    each cancel passed, and a follow that passes the same id again and again keeps one number.

    Which message an agent's end is of comes from the owner's record, which the follow reads
    before any cancel reaches the owner (:class:`~connic.transports.ws_ahead.AfterRead`): its
    messages still pending then, each with the agents answering it (the one it named, or each
    of the connector's). An end after the record's ``seq`` is the first of them with its id that
    the agent answers and has not ended yet: a message naming another agent is another message,
    even when the agent never ended one before. Ends up to that ``seq`` (or with no record)
    are grouped by agent: one ending again begins the id's next message.

    The record still lists the queued messages a cancel passed later drops (a second cancel
    while the first one's stop runs): they need not be told apart. A drop takes every queued
    message with its id at once, and the owner queues none after the record (the client sends
    here), so each end with that id after a drop is of a message listed before the dropped ones,
    which takes it first (tests/test_review9_drops.py).
    """

    __slots__ = ("ahead", "ends", "held", "passed", "pending")

    def __init__(self, ahead: Ahead) -> None:
        self.ahead = ahead  # its read of the owner's record says which message each end is of
        # Held cancels not passed yet (nobody followed): each one's id, and the id() of its inbox
        # frames (one behind each held message with its id, :func:`hold_behind`).
        self.pending: list[tuple[MessageId, list[int]]] = []
        self.passed: dict[MessageId, int] = {}  # how many cancels of each id were passed to the owner
        # The held cancels passed: each one's id, how many of its id were passed before it, its frames.
        self.held: list[tuple[MessageId, int, list[int]]] = []
        # The ends of the owner's replies with an id passed, followed since: seq, id, agent, cancelled.
        self.ends: list[tuple[int, MessageId, str, bool]] = []

    def hold(self, held: list[WSMessage], message_id: MessageId) -> None:
        """A cancel of held messages, ``held`` behind them: passed to the owner (once) when one is followed."""
        self.pending.append((message_id, [id(msg) for msg in held]))

    def direct(self, store: AfterRead, session_id: str, message_id: MessageId) -> None:
        """Pass a cancel of no held message to the owner; a reply with its id that ends cancelled is its first.

        Such a cancel comes before any held cancel of its id (it would be held else): the end of
        the owner's message it stops is not a held one's, which then drops its held messages,
        as on one process the second cancel of a message stopped already drops the queued ones.
        """
        store.cancel(session_id, message_id)
        self.passed[message_id] = self.passed.get(message_id, 0) + 1

    def pass_on(self, store: AfterRead, session_id: str) -> None:
        """The find follows the session's owner: the held cancels not passed yet go there too."""
        for message_id, keys in self.pending:
            store.cancel(session_id, message_id, held=True)
            before = self.passed.get(message_id, 0)
            self.passed[message_id] = before + 1
            self.held.append((message_id, before, keys))
        self.pending.clear()

    def seen(self, frames: list[str]) -> None:
        """Frames followed from the owner's log: note the ends of its replies with an id passed (for :meth:`settle`)."""
        if not self.passed:
            return
        for data in frames:
            if data.startswith(CHUNK_PREFIX):  # most frames are chunks: not parsed
                continue
            frame = json.loads(data)
            message_id, agent, seq = frame.get("id"), frame.get("agent"), frame.get("seq")
            if agent is None or frame.get("type") not in _ENDED or message_id not in self.passed:
                continue
            cancelled = frame.get("finish_reason") == "cancelled"
            self.ends.append((seq if isinstance(seq, int) else 0, message_id, agent, cancelled))

    def settle(self, conn: Connection, frames: list[str]) -> None:
        """The session is taken over here, ``frames`` replayed: let go the held cancels the owner took."""
        self.seen(frames)
        stopped = self._stopped()
        let_go: set[int] = set()
        for message_id, before, keys in self.held:
            if stopped[message_id] > before:
                let_go.update(keys)
        if let_go:
            conn._inbox[:] = [msg for msg in conn._inbox if id(msg) not in let_go]

    def _stopped(self) -> collections.Counter[MessageId]:
        # How many of the owner's messages with each id ended cancelled: once each, however many agents it had.
        loading = self.ahead.loading
        record = None
        if loading is not None and loading.done() and not loading.cancelled() and loading.exception() is None:
            record = loading.result()
        upto = record.seq if record is not None and record.pending is not None else None
        replies: dict[MessageId, list[_Reply]] = {}
        stopped: collections.Counter[MessageId] = collections.Counter()
        for seq, message_id, agent, cancelled in self.ends:
            if upto is not None and record is not None and seq > upto:
                upto = None  # the record's messages from here on (its frames are those up to its seq)
                self._pending(replies, record)
            group = replies.setdefault(message_id, [])
            reply = next((reply for reply in group if reply.takes(agent)), None)
            if reply is None:
                # A message the record does not list: its agent ending again begins the next, and
                # the one before is taken to have had the agents that ended it.
                for before in group:
                    if before.agents is None:
                        before.agents = frozenset(before.ended)
                reply = _Reply(None)
                group.append(reply)
            reply.ended.add(agent)
            if cancelled and not reply.stopped:
                reply.stopped = True
                stopped[message_id] += 1
        return stopped

    def _pending(self, replies: dict[MessageId, list[_Reply]], record: SessionRecord) -> None:
        # The owner's messages pending at the record's seq take the ends after it, in order. The
        # first may have ended for some of its agents by then: their ends grouped before are its.
        pending = list(record.pending or ()) if record.busy else []
        earlier = {message_id: group[-1] for message_id, group in replies.items() if group}
        replies.clear()
        for at, (message_id, _, named) in enumerate(pending):
            reply = _Reply(frozenset({named}) if named is not None else frozenset(self.ahead.agents))
            if at == 0 and record.ended:
                reply.ended |= record.ended
                before = earlier.get(message_id)
                reply.stopped = before is not None and before.stopped and bool(before.ended & record.ended)
            replies.setdefault(message_id, []).append(reply)


class _Reply:
    """One of the owner's messages with an id, as its agents end their replies (:meth:`Doubts._stopped`)."""

    __slots__ = ("agents", "ended", "stopped")

    def __init__(self, agents: frozenset[str] | None) -> None:
        self.agents = agents  # the agents answering it; None when not known (any)
        self.ended: set[str] = set()  # those whose end was seen
        self.stopped = False  # whether one of them ended cancelled (counted once)

    def takes(self, agent: str) -> bool:
        """Whether an end of ``agent`` with this message's id may be this message's."""
        return agent not in self.ended and (self.agents is None or agent in self.agents)


_ENDED = frozenset({"stream_end", "response", "error"})  # the frames of an agent that end its reply


def held_at(conn: Connection, held: dict[int, MessageId], message_id: MessageId) -> list[int]:
    """Where in the inbox the held messages with ``message_id`` (not cancelled yet) are, in order."""
    if not held:
        return []
    return [at for at, msg in enumerate(conn._inbox) if held.get(id(msg), _NONE) == message_id]


def hold_behind(
    conn: Connection,
    held: dict[int, MessageId],
    doubtful: dict[int, MessageId],
    at: list[int],
    cancel: WSMessage,
    arrived: int,
) -> list[WSMessage]:
    """Hold ``cancel`` right behind each held message at ``at`` (itself behind the last); those held.

    On one process a cancel drops every queued message with its id (PROTOCOL.md §5): here each
    is dropped as it is admitted (:func:`cancel_behind`), before the answering task can start
    it. The copies behind the earlier ones are quiet: one of them finding nothing to drop (its
    message refused) answers nothing; only the cancel itself may answer ``not_found``, and only
    when none of them dropped one. Each is marked with ``arrived``, how many messages were held
    before the cancel came: the ones it drops count as queued for those (:class:`Behind`), as on
    one process. A message with a cancel held behind it moves from ``held`` to ``doubtful``:
    that cancel is the owner's should its own message with the id be cancelled by it
    (:class:`Doubts`), so a later cancel of the id is held behind it too, after the first.
    """
    # Which cancel a copy came from, and when it came (aiohttp's extra: None for a text frame).
    mark = f"{next(_groups)} {arrived}"
    group = [WSMessage(WSMsgType.TEXT, cancel.data, _LOUD + mark)]
    for n, where in enumerate(reversed(at)):  # from the back: the positions before stay right
        key = id(conn._inbox[where])
        message_id = held.pop(key, None)
        if message_id is not None:
            doubtful[key] = message_id
        if n:
            group.append(WSMessage(WSMsgType.TEXT, cancel.data, _QUIET + mark))
        after = where + 1  # behind the cancels held there before
        while after < len(conn._inbox) and _is_held_cancel(conn._inbox[after]):
            after += 1
        conn._inbox.insert(after, group[-1])
    return group


def _is_held_cancel(msg: WSMessage) -> bool:
    return isinstance(msg.extra, str) and msg.extra.startswith(_MARKS)


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
