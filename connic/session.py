"""The session core: one conversation, whichever transport carries it.

A :class:`ChatSession` holds what outlives a connection (PROTOCOL.md §7): the
history, each agent's state, the counters and limits, the queue of accepted
messages, the task that answers them, and the sequenced replay log. It has no
sockets: a transport *attaches* a :class:`~connic.sessions.Sink` (its
connection) to receive the session's frames, and *detaches* it when the
connection ends. While detached, replies keep going into the replay log; a
connection that resumes reads the log from the client's ``last_seq`` and then
goes on live. :mod:`connic.sessions` makes sessions; :mod:`connic.message` runs
a message's agents. Parts of the session live in their own modules:
:mod:`connic.session_admission` (admitting a message), :mod:`connic.session_answering`
(its answering task), :mod:`connic.session_resume` (a connection taking it over: replay,
then resume), :mod:`connic.session_timer` (expiry), :mod:`connic.session_record` (what a
shared store keeps of it).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from connic import session_admission, session_record, session_resume
from connic.errors import (
    ConnicError,
    NotFound,
    ProducerLost,
    ServerShuttingDown,
)
from connic.flow import Flag
from connic.frames import ErrorFrame, MessageId, encode, sequenced
from connic.frames import History as HistoryFrame
from connic.history import History
from connic.message import Message
from connic.session_state import SessionState
from connic.session_timer import arm
from connic.stores import ReplayLog, SessionRecord

if TYPE_CHECKING:
    from connic.sessions import Sessions, Sink

__all__ = ["ChatSession", "SessionState"]

log = logging.getLogger("connic.session")


class ChatSession:
    """One conversation: its memory, limits, queue, answering task and replay log."""

    __slots__ = (
        "_answering",
        "_detached_at",
        "_held",
        "_loop",
        "_timer",
        "_wakeup",
        "bucket",
        "count",
        "current",
        "history",
        "id",
        "idle",
        "last_activity",
        "limit_reached",
        "log",
        "queue",
        "seq",
        "sessions",
        "sink",
        "state",
        "states",
        "token",
        "tokens_in",
        "tokens_out",
    )

    def __init__(self, sessions: Sessions, session_id: str) -> None:
        opts = sessions.options
        self.sessions = sessions
        self.id = session_id
        resumable = opts.resume_window > 0
        self.token = secrets.token_urlsafe(24) if resumable else None  # 192 random bits
        self.log: ReplayLog | None = sessions.store.replay_log(session_id, opts.replay_buffer) if resumable else None
        self.state = SessionState.DETACHED  # until a connection attaches
        self.sink: Sink | None = None
        self.seq = 0  # the number of the last sequenced frame
        self.history = History()
        self.states: dict[str, dict[str, Any]] = {}  # each agent's own state
        self.count = 0  # messages accepted
        self.tokens_in = 0
        self.tokens_out = 0
        self.queue: list[Message] = []  # at most max_queued: a list costs an idle session less than a deque
        self.current: Message | None = None
        self.limit_reached = False
        self.idle = Flag(True)  # nothing queued or being answered
        limit = opts.rate_limit
        self.bucket = sessions.store.rate_bucket(session_id, limit.messages, limit.per) if limit is not None else None
        self._loop = asyncio.get_running_loop()
        self.last_activity = self._loop.time()  # when a message last came in or was answered
        self._detached_at = 0.0  # when the resume window started
        self._answering: asyncio.Task[None] | None = None
        self._wakeup: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._held: list[tuple[int, str]] | None = None  # live frames held while a resume reads the log

    @classmethod
    def restore(cls, sessions: Sessions, record: SessionRecord) -> ChatSession:
        """Rebuild, detached, a session that a shared store kept (another process served it before)."""
        session = cls(sessions, record.id)
        session_record.restore(session, record)
        return session

    def record(self, *, history: bool = True) -> SessionRecord:
        """What a shared store keeps of this session (:meth:`restore` rebuilds it), its history too unless told."""
        return session_record.record(self, history=history)

    # --- attaching ------------------------------------------------------------

    def attach(self, sink: Sink) -> None:
        """A new session's connection is ready for its frames."""
        self.sink = sink
        self.state = SessionState.ATTACHED
        arm(self)

    @property
    def resuming(self) -> bool:
        """Whether a connection is between :meth:`replay` and :meth:`resume`: about to attach."""
        return self._held is not None

    # A connection taking the session over lives in connic/session_resume.py: each function is
    # the method itself, as admit is.
    replay = session_resume.replay
    resume = session_resume.resume
    resume_failed = session_resume.resume_failed
    taken_over = session_resume.taken_over

    def detach(self, sink: Sink) -> None:
        """``sink``'s connection ended without ending the session (PROTOCOL.md §7)."""
        if self.sink is not sink or self.state is SessionState.ENDED:
            return  # taken over: the session has moved on
        self.sink = None
        if self.token is None:
            self.end()
            return
        self._went_detached()
        arm(self)
        self.sessions.store.save(self)

    def _went_detached(self, *, client_left: bool = True) -> None:
        """No connection is attached now: the resume window starts; ``on_disconnect`` applies if the client left."""
        self.state = SessionState.DETACHED
        self._detached_at = self._loop.time()
        if client_left and self.sessions.options.on_disconnect == "cancel":
            self.queue.clear()
            self._cancel_current()
            self.sessions.store.save(self)  # a shared store: no longer pending, should this process die

    def leave(self) -> None:
        """This process lets the session go without ending it: the store keeps it for any process to take.

        A shared store calls this when the session is detached and idle, and the server
        when it stops; this copy is never used again (its connection, if any, is closed
        by the server's drain).
        """
        if self.state is SessionState.ENDED:
            return
        self.state = SessionState.ENDED  # this copy only: the stored session lives on
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.sink = None
        answering, self._answering = self._answering, None
        if answering is not None:
            answering.cancel()
        sessions = self.sessions
        sessions.live.discard(self)
        sessions.metrics.sessions_open.dec(sessions.label)
        self.idle.set()
        sessions.store.release(self)

    def end(self, error: ConnicError | None = None, notify: bool = True) -> None:
        """End the session for good; its connection, if any, closes with ``error``."""
        if self.state is SessionState.ENDED:
            return
        self.state = SessionState.ENDED
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        sink, self.sink = self.sink, None
        if sink is not None and error is not None:
            sink.end(error, notify)
        answering, self._answering = self._answering, None
        if answering is not None:
            answering.cancel()
        self.queue.clear()
        sessions = self.sessions
        sessions.store.discard(self.id)
        sessions.live.discard(self)
        sessions.metrics.sessions_open.dec(sessions.label)
        self.idle.set()
        log.info(
            "session ended session=%s connector=%s messages=%d prompt_tokens=%d candidates_tokens=%d",
            self.id,
            sessions.label,
            self.count,
            self.tokens_in,
            self.tokens_out,
        )

    @property
    def queue_full(self) -> bool:
        """Whether the next message would be refused with ``queue_full``."""
        return len(self.queue) >= self.sessions.options.max_queued

    @property
    def busy(self) -> bool:
        """Whether a message is queued or being answered."""
        return self.current is not None or bool(self.queue)

    # --- messages -------------------------------------------------------------

    # Admission lives in connic/session_admission.py. Its function is the method itself, not
    # called from one, so the way of every message costs no extra call (or coroutine).
    admit = session_admission.admit

    def refuse(self, error: ConnicError, message_id: MessageId | None) -> None:
        """Refuse one message with an error frame, sequenced when it names the message."""
        self.sessions.metrics.errors.inc(self.sessions.label, error.code)
        retry_after = getattr(error, "retry_after", None)
        data = encode(ErrorFrame(message_id, error.code, error.message, retry_after=retry_after))
        if message_id is not None:
            self._send_nowait(data)
        elif self.sink is not None:
            self.sink.send_nowait(data)

    def producer_lost(self, lost: Sequence[tuple[MessageId, str]]) -> None:
        """End each agent reply that a dead process left unfinished with ``producer_lost`` (PROTOCOL.md §7).

        Called once a shared store took the session over; the frames are sequenced and logged
        like any reply's end, so a resume replays them.
        """
        sessions = self.sessions
        for message_id, agent in lost:
            sessions.metrics.producer_lost.inc(sessions.label)
            sessions.metrics.errors.inc(sessions.label, ProducerLost.code)
            error = ErrorFrame(message_id, ProducerLost.code, "the process answering this message stopped", agent=agent)
            self._send_nowait(encode(error))
        log.warning("session %s: %d reply(s) lost with the process answering them", self.id, len(lost))

    def cancel(self, message_id: MessageId) -> None:
        """Stop a message's agents, or drop it if it is queued (PROTOCOL.md §5).

        A message in flight that a cancel stopped already (its end on its way) is passed over:
        a second cancel of its id drops the queued ones with it, as it would a moment later,
        once the next one began; with none queued, it is absorbed (no ``not_found``).
        """
        current = self.current
        ours = current if current is not None and current.id == message_id else None
        if ours is not None and not ours.cancelled and self._cancel_current():
            return
        kept = [queued for queued in self.queue if queued.id != message_id]
        if len(kept) < len(self.queue):  # ids need not be unique: every queued one with it goes
            self.queue[:] = kept
            if not self.busy:
                self.idle.set()
            self.sessions.store.save(self)  # a shared store: no longer pending, should this process die
            return
        if ours is not None and self._cancel_current():
            return  # stopped already, still running: a not_found would look like the session's end
        self.refuse(NotFound(f"no queued or in-flight message has id {message_id!r}"), message_id)

    def cancels(self, message_id: MessageId) -> bool:
        """Whether :meth:`cancel` of ``message_id`` would stop or drop a message (rather than answer ``not_found``)."""
        current = self.current
        if current is not None and current.id == message_id and any(not t.done() for t in current.tasks.values()):
            return True
        return any(queued.id == message_id for queued in self.queue)

    def _cancel_current(self) -> bool:
        current = self.current
        if current is None:
            return False
        running = [task for task in current.tasks.values() if not task.done()]
        if not running:
            return False
        if current.cancelled:
            return True  # cancelled already: a second cancel would look like the session's end
        current.cancelled = True
        for task in running:
            if task is self._answering:
                task.cancel()
            else:
                # An agent's own task may not have taken its first step yet: cancelled
                # now, it would never run its serialiser and its reply would not end.
                # Its first step is already scheduled, so this comes after it.
                self._loop.call_soon(task.cancel)
        return True

    def history_frame(self) -> str:
        """The encoded ``history`` frame (PROTOCOL.md §8): not sequenced, not activity."""
        return encode(HistoryFrame(tuple(entry.to_dict() for entry in self.history.entries), self.seq))

    # --- sending --------------------------------------------------------------

    def number(self, data: str) -> str:
        """Give an encoded frame the next ``seq`` and log it; what to send."""
        self.seq = seq = self.seq + 1
        data = sequenced(data, seq)
        if self.log is not None:
            self.log.append(seq, data)
        if self._held is not None:
            self._held.append((seq, data))
        return data

    def number_from(self, seq: int) -> None:
        """Number the next frame ``seq + 1``: a session taken over from a process that died ahead of the store.

        Its log in the store has a hole where that process's unlogged frames were: a resume
        from inside it is not recovered, as from an evicted frame (PROTOCOL.md §7).
        """
        self.seq = max(self.seq, seq)

    def _send_nowait(self, data: str) -> None:
        data = self.number(data)
        if self.sink is not None:
            self.sink.send_nowait(data)

    # --- time -----------------------------------------------------------------

    def clock(self) -> float:
        """The event loop's clock, which every deadline and duration of the session uses."""
        return self._loop.time()

    # --- draining -------------------------------------------------------------

    async def drain(self, grace: float) -> None:
        """Server shutdown: drop queued messages, let the in-flight one finish for ``grace`` seconds."""
        for queued in self.queue:
            self.refuse(ServerShuttingDown("the server is shutting down"), queued.id)
        self.queue.clear()
        if not self.busy:
            self.idle.set()
        try:
            async with asyncio.timeout(grace):
                await self.idle.wait()
        except TimeoutError:
            self._cancel_current()
            try:
                async with asyncio.timeout(1.0):
                    await self.idle.wait()
            except TimeoutError:
                pass
