"""The session core: one conversation, whichever transport carries it.

A :class:`ChatSession` holds what outlives a connection (PROTOCOL.md §7): the
history, each agent's state, the counters and limits, the queue of accepted
messages, the task that answers them, and the sequenced replay log. It has no
sockets: a transport *attaches* a :class:`Sink` (its connection) to receive the
session's frames, and *detaches* it when the connection ends. While detached,
replies keep going into the replay log; a connection that resumes reads the log
from the client's ``last_seq`` and then goes on live.

:class:`Sessions` holds what the sessions of one connector share (agents,
options, metrics, the store) and makes, resumes and drains them.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import hmac
import logging
import math
import secrets
import traceback
import uuid
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from connic.agent import HistoryEntry, HistoryView, Session, Turn
from connic.errors import (
    ConnicError,
    InternalError,
    MessageLimitReached,
    NotFound,
    QueueFull,
    RateLimited,
    ServerShuttingDown,
    SessionExpired,
    SessionTakenOver,
    UnknownAgent,
)
from connic.flow import Flag, TokenBucket
from connic.frames import (
    ErrorFrame,
    History,
    MessageFrame,
    MessageId,
    Response,
    ServerFrame,
    StreamChunk,
    StreamEnd,
    StreamStart,
    encode,
    encode_ack,
    sequenced,
)
from connic.metrics import Metrics
from connic.pipeline import TurnChain
from connic.stores import ReplayLog, SessionStore

__all__ = ["ChatSession", "SessionOptions", "SessionState", "Sessions", "Sink", "release_cancellation"]

log = logging.getLogger("connic.session")


class SessionState(enum.Enum):
    """Where a session is in its life."""

    ATTACHED = "attached"  # a connection receives its frames
    DETACHED = "detached"  # its connection ended; resumable until the window runs out
    ENDED = "ended"  # for good: never resumed again


class Sink(Protocol):
    """What a transport attaches to a session: where its frames go."""

    def send_nowait(self, data: str) -> None:
        """Queue an encoded frame without waiting (acks and refusals)."""

    async def send(self, data: str) -> None:
        """Queue an encoded frame of a reply, waiting for room while the client is behind."""

    def end(self, error: ConnicError, notify: bool) -> None:
        """The session ended for good: close with ``error``'s close code (after an error frame if ``notify``)."""


class RateLimitOptions(Protocol):
    """The shape of a connector's ``rate_limit``."""

    @property
    def messages(self) -> int: ...
    @property
    def per(self) -> float: ...


class SessionOptions(Protocol):
    """The connector options the session core reads (docs/configuration.md)."""

    @property
    def streaming(self) -> bool: ...
    @property
    def max_messages(self) -> int: ...
    @property
    def max_queued(self) -> int: ...
    @property
    def session_timeout(self) -> float: ...
    @property
    def rate_limit(self) -> RateLimitOptions | None: ...
    @property
    def resume_window(self) -> float: ...
    @property
    def replay_buffer(self) -> int: ...
    @property
    def on_disconnect(self) -> str: ...
    @property
    def max_history_bytes(self) -> int: ...


class Sessions:
    """The sessions of one connector: what they share, and making, resuming and draining them."""

    def __init__(
        self,
        *,
        label: str,
        chains: Mapping[str, TurnChain],
        options: SessionOptions,
        metrics: Metrics,
        store: SessionStore,
    ) -> None:
        self.label = label  # the connector's path, the metrics' label and the logs' name for it
        self.key = (label,)  # the metrics' label values, shared by every session
        self.chains = dict(chains)
        self.agent_names = tuple(chains)
        self.options = options
        self.metrics = metrics
        self.store = store
        self.draining = False
        self.live: set[ChatSession] = set()  # this process's sessions, attached or detached

    async def open(self) -> ChatSession:
        """A new session, kept in the store."""
        session = ChatSession(self, str(uuid.uuid4()))
        await self.store.add(session)
        self.live.add(session)
        self.metrics.sessions.inc(self.label)
        self.metrics.sessions_open.inc(self.label)
        return session

    async def find(self, session_id: str, token: str, last_seq: int) -> ChatSession | None:
        """The session a resume names, if it can be resumed with this token from ``last_seq``."""
        session = await self.store.get(session_id)
        if (
            session is None
            or session.sessions is not self
            or session.state is SessionState.ENDED
            or session.token is None
            or not hmac.compare_digest(session.token.encode(), token.encode("utf-8", "surrogatepass"))
            or last_seq > session.seq
        ):
            return None
        return session

    async def shutdown(self, grace: float) -> None:
        """Drain every session (queued messages refused, in-flight replies given ``grace`` seconds), then end them.

        Sessions end with this process: the memory store does not outlive it.
        """
        self.draining = True
        await asyncio.gather(*(s.drain(grace) for s in list(self.live)), return_exceptions=True)
        for session in list(self.live):
            session.end()


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
        "history_bytes",
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
        self.history: list[HistoryEntry] = []
        self.history_bytes = 0
        self.states: dict[str, dict[str, Any]] = {}  # each agent's own state
        self.count = 0  # messages accepted
        self.tokens_in = 0
        self.tokens_out = 0
        self.queue: deque[_Message] = deque()
        self.current: _Message | None = None
        self.limit_reached = False
        self.idle = Flag(True)  # nothing queued or being answered
        limit = opts.rate_limit
        self.bucket = TokenBucket(limit.messages, limit.per) if limit is not None else None
        self._loop = asyncio.get_running_loop()
        self.last_activity = self._loop.time()  # when a message last came in or was answered
        self._detached_at = 0.0  # when the resume window started
        self._answering: asyncio.Task[None] | None = None
        self._wakeup: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._held: list[tuple[int, str]] | None = None  # live frames held while a resume reads the log

    # --- attaching ------------------------------------------------------------

    def attach(self, sink: Sink) -> None:
        """A new session's connection is ready for its frames."""
        self.sink = sink
        self.state = SessionState.ATTACHED
        self._arm()

    async def replay(self, sink: Sink, last_seq: int) -> tuple[bool, list[str]] | None:
        """Start resuming from ``last_seq``: whether the log still has every frame after it, and those frames.

        The current connection, if any, is taken over (4011). Frames produced
        meanwhile are held for :meth:`resume`, which the caller must call next,
        without awaiting in between, once it has sent ``connected`` and the frames.
        Returns None if another resume overtook this one.
        """
        old = self.sink
        if old is not None:
            self.sink = None
            old.end(SessionTakenOver("another connection resumed this session"), True)
        held: list[tuple[int, str]] = []
        self._held = held
        frames = await self.log.since(last_seq) if self.log is not None else None
        if self._held is not held or self.state is SessionState.ENDED:
            return None
        if frames is None:
            return False, []
        return True, frames

    def resume(self, sink: Sink, replayed_to: int) -> None:
        """Go live on ``sink`` after :meth:`replay`: send the frames held meanwhile that were not replayed."""
        held, self._held = self._held or [], None
        for seq, data in held:
            if seq > replayed_to:
                sink.send_nowait(data)
        self.sink = sink
        self.state = SessionState.ATTACHED
        self._arm()

    def detach(self, sink: Sink) -> None:
        """``sink``'s connection ended without ending the session (PROTOCOL.md §7)."""
        if self.sink is not sink or self.state is SessionState.ENDED:
            return  # taken over: the session has moved on
        self.sink = None
        opts = self.sessions.options
        if self.token is None:
            self.end()
            return
        self.state = SessionState.DETACHED
        self._detached_at = self._loop.time()
        if opts.on_disconnect == "cancel":
            self.queue.clear()
            self._cancel_current()
        self._arm()

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

    def admit(self, frame: MessageFrame) -> None:
        """Accept a message (ack it and queue it) or refuse it with a sequenced error frame."""
        sessions = self.sessions
        opts = sessions.options
        if sessions.draining:
            self.refuse(ServerShuttingDown("the server is shutting down"), frame.id)
            return
        if self.limit_reached or self.count >= opts.max_messages:
            self.refuse(
                MessageLimitReached(f"this session reached its limit of {opts.max_messages} messages"), frame.id
            )
            self.limit_reached = True
            if not self.busy:
                self.end(MessageLimitReached(), notify=False)
            return
        if self.bucket is not None:
            wait = self.bucket.take()
            if wait:
                sessions.metrics.rate_limited.inc(sessions.label)
                retry_after = math.ceil(wait * 1000) / 1000  # never 0: that would say "retry now"
                self.refuse(
                    RateLimited(f"over the rate limit; retry in {retry_after:.3f} s", retry_after=retry_after), frame.id
                )
                return
        if frame.agent is not None and frame.agent not in sessions.chains:
            names = ", ".join(sessions.agent_names)
            self.refuse(UnknownAgent(f"no agent {frame.agent!r} on this connector (agents: {names})"), frame.id)
            return
        if len(self.queue) >= opts.max_queued:
            self.refuse(QueueFull(f"{len(self.queue)} messages are already waiting to be answered"), frame.id)
            return
        self.count += 1
        sessions.metrics.messages.add(sessions.key)
        message_id = frame.id if frame.id is not None else f"auto-{self.count}"
        self.last_activity = self._loop.time()
        self.queue.append(_Message(self, frame, message_id, self.count))
        self.idle.clear()
        self._send_nowait(encode_ack(message_id, self.count))
        if self._answering is None:
            self._answering = asyncio.create_task(self._answer_loop())
            self._answering.add_done_callback(release_cancellation)
        elif self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    def refuse(self, error: ConnicError, message_id: MessageId | None) -> None:
        """Refuse one message with an error frame, sequenced when it names the message."""
        self.sessions.metrics.errors.inc(self.sessions.label, error.code)
        retry_after = getattr(error, "retry_after", None)
        data = encode(ErrorFrame(message_id, error.code, error.message, retry_after=retry_after))
        if message_id is not None:
            self._send_nowait(data)
        elif self.sink is not None:
            self.sink.send_nowait(data)

    def cancel(self, message_id: MessageId) -> None:
        """Stop a message's agents, or drop it if it is queued (PROTOCOL.md §5)."""
        current = self.current
        if current is not None and current.id == message_id and self._cancel_current():
            return
        for queued in self.queue:
            if queued.id == message_id:
                self.queue.remove(queued)
                if not self.busy:
                    self.idle.set()
                return
        self.refuse(NotFound(f"no queued or in-flight message has id {message_id!r}"), message_id)

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
        return encode(History(tuple(entry.to_dict() for entry in self.history), self.seq))

    # --- answering ------------------------------------------------------------

    async def _answer_loop(self) -> None:
        """Answer queued messages one after another, for the life of the session."""
        try:
            await self._answer_queued()
        except Exception:
            # The chain contains every agent failure: this is connic's own bug. The session
            # cannot go on without its answering task; the server and other sessions can.
            log.exception("session %s: answering failed; ending the session", self.id)
            self.end(InternalError("the session failed; start a new one"))

    async def _answer_queued(self) -> None:
        loop = self._loop
        while True:
            while not self.queue:
                self.idle.set()
                if self.limit_reached:
                    self.end(MessageLimitReached(), notify=False)
                    return
                self._on_idle()
                self._wakeup = loop.create_future()
                try:
                    await self._wakeup
                finally:
                    self._wakeup = None
            message = self.queue.popleft()
            self.current = message
            try:
                await self._answer(message)
            finally:
                self.current = None
                self.last_activity = loop.time()

    async def _answer(self, message: _Message) -> None:
        sessions = self.sessions
        chains = sessions.chains
        message.at = self._loop.time()
        history = HistoryView(self.history)
        newest = len(self.history)  # where this exchange starts: kept whole when trimming
        self._remember(HistoryEntry("user", message.frame.text, None, message.id, message.number))
        agent = message.frame.agent
        if agent is not None or len(chains) == 1:
            # One agent answers in this task: a cancel of the message cancels this task.
            name = agent if agent is not None else sessions.agent_names[0]
            names: Sequence[str] = (name,)
            task = asyncio.current_task()
            assert task is not None
            message.tasks[name] = task
            try:
                await chains[name](self._turn(message, name, history), message.emit, task)
            except asyncio.CancelledError:
                if not message.cancelled or task.uncancel() > 0:
                    raise
        else:
            names = sessions.agent_names
            try:
                async with asyncio.TaskGroup() as group:
                    for name in names:
                        turn = self._turn(message, name, history)
                        task = message.tasks[name] = group.create_task(chains[name](turn, message.emit))
                        task.add_done_callback(release_cancellation)
            except BaseException as exc:
                # The TaskGroup's __aexit__ frame, in the error's traceback, keeps the error in
                # a local: a reference cycle through this session's frames (CPython 3.11).
                traceback.clear_frames(exc.__traceback__)
                raise
        for name in names:
            text = message.results.get(name)
            if text:
                self._remember(HistoryEntry("agent", text, name, message.id, message.number))
        if self.history_bytes > sessions.options.max_history_bytes:
            self._trim_history(newest)

    def _turn(self, message: _Message, agent: str, history: HistoryView) -> Turn:
        frame = message.frame
        state = self.states.get(agent)
        if state is None:
            state = self.states[agent] = {}
        session = Session(self.id, history, state)
        return Turn(
            message.id, message.number, frame.text, frame.context, frame.files, session, agent, message.streaming
        )

    def _remember(self, entry: HistoryEntry) -> None:
        self.history.append(entry)
        self.history_bytes += _utf8_size(entry.text)

    def _trim_history(self, newest: int) -> None:
        """Drop the oldest entries until the history fits ``max_history_bytes``.

        The exchange that starts at index ``newest`` (the one just answered) is kept
        whole, even when it alone is over the bound. The kept entries go into a new
        list: a HistoryView handed out earlier is a prefix view of the old one, which
        must not change under it.
        """
        entries = self.history
        size = self.history_bytes
        bound = self.sessions.options.max_history_bytes
        start = 0
        while start < newest and size > bound:
            size -= _utf8_size(entries[start].text)
            start += 1
        self.history = entries[start:]
        self.history_bytes = size

    # --- sending --------------------------------------------------------------

    def _number(self, data: str) -> str:
        """Give an encoded frame the next ``seq`` and log it."""
        self.seq = seq = self.seq + 1
        data = sequenced(data, seq)
        if self.log is not None:
            self.log.append(seq, data)
        if self._held is not None:
            self._held.append((seq, data))
        return data

    def _send_nowait(self, data: str) -> None:
        data = self._number(data)
        if self.sink is not None:
            self.sink.send_nowait(data)

    async def send(self, data: str) -> None:
        """Number, log and send one encoded frame of a reply."""
        data = self._number(data)
        if self.sink is not None:
            await self.sink.send(data)

    # --- time -----------------------------------------------------------------

    def _on_idle(self) -> None:
        """The last queued message was answered."""
        if self.state is SessionState.DETACHED:
            self._detached_at = self._loop.time()  # the window starts again when the last reply ends
            self._arm()
        elif self._timer is None:
            self._arm()

    def _arm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._loop.call_at(self._deadline(), self._expire)

    def _deadline(self) -> float:
        opts = self.sessions.options
        at = self.last_activity + opts.session_timeout
        if self.state is SessionState.DETACHED:
            at = min(at, self._detached_at + opts.resume_window)
        return at

    def _expire(self) -> None:
        self._timer = None
        if self.state is SessionState.ENDED or self.busy:
            return  # the end of the last reply arms the timer again
        left = self._deadline() - self._loop.time()
        if left > 0:
            self._timer = self._loop.call_later(left, self._expire)
        elif self.state is SessionState.ATTACHED:
            timeout = self.sessions.options.session_timeout
            self.end(SessionExpired(f"session expired after {timeout:g} s without a message"))
        else:
            self.end()

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


def _utf8_size(text: str) -> int:
    """The size of ``text`` in UTF-8 (lone surrogates, which JSON lets a client send, count 3 bytes)."""
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def release_cancellation(task: asyncio.Task[Any]) -> None:
    """Take the CancelledError of a cancelled task nobody awaits.

    A cancelled task keeps its CancelledError until someone asks for it, and the
    error's traceback holds the frames it went through while something in those
    frames refers back to the task (a message's ``tasks``, aiohttp's request to its
    handler's task): the session would live until the cyclic garbage collector ran.
    """
    if task.cancelled():
        with contextlib.suppress(asyncio.CancelledError):
            task.exception()


class _Message:
    """An accepted message, queued or being answered."""

    __slots__ = ("at", "cancelled", "first_chunks", "frame", "id", "number", "results", "session", "streaming", "tasks")

    def __init__(self, session: ChatSession, frame: MessageFrame, message_id: MessageId, number: int) -> None:
        self.session = session
        self.frame = frame
        self.id = message_id
        self.number = number
        self.streaming = session.sessions.options.streaming
        self.tasks: dict[str, asyncio.Task[Any]] = {}
        self.results: dict[str, str] = {}  # each agent's whole answer, for the history
        self.cancelled = False
        self.at = 0.0  # when answering began (the loop's clock)
        self.first_chunks: set[str] | None = None  # agents that sent a chunk

    async def emit(self, frame: ServerFrame) -> None:
        """One frame of an agent's reply: count it in the metrics, keep its text, send it."""
        session = self.session
        sessions = session.sessions
        metrics = sessions.metrics
        if isinstance(frame, StreamChunk):
            first = self.first_chunks
            if first is None:
                first = self.first_chunks = set()
            if frame.agent not in first:
                first.add(frame.agent)
                metrics.first_chunk.observe(session._loop.time() - self.at, frame.agent)
        elif isinstance(frame, Response | StreamEnd):
            self.results[frame.agent] = frame.response if isinstance(frame, Response) else frame.full_response
            usage = frame.token_usage
            prompt, candidates = usage.get("prompt_tokens", 0), usage.get("candidates_tokens", 0)
            session.tokens_in += prompt
            session.tokens_out += candidates
            metrics.turn_ended(frame.agent, frame.finish_reason, session._loop.time() - self.at, prompt, candidates)
        elif isinstance(frame, ErrorFrame):
            metrics.errors.inc(sessions.label, frame.code)
            if frame.agent is not None:
                metrics.turn_ended(frame.agent, "error", session._loop.time() - self.at, 0, 0)
        elif not isinstance(frame, StreamStart):
            raise TypeError(f"a reply cannot contain a {type(frame).__name__} frame")
        await session.send(encode(frame))
        if self.cancelled:
            # Let a pending cancellation land even in an agent that never waits.
            await asyncio.sleep(0)
