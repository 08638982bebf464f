"""How a transport runs one agent's turn: connic's built-in layers around the user middleware.

The chain for one agent is, outermost first::

    error boundary -> serialiser -> time limit (agent_timeout) -> user middleware ... -> agent

The error boundary turns failures into ``error`` frames (any exception from agent or
middleware code, ``SystemExit`` and ``KeyboardInterrupt`` included: only the task's own
cancellation goes through) and logs them on ``connic.agent``; the serialiser turns
the text chunks, :class:`connic.Usage` and the progress events below it into frames
(streaming forwards each chunk, buffering sends one ``response``; progress events go
out as they come when the connector has ``progress_events``, else nowhere); the time limit cancels
an agent that runs past ``agent_timeout``. The user middleware and the agent are
one fold, :func:`connic.middleware.compose`; the three built-in layers are the
body of the chain's own coroutine (docs/performance.md).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import types
from collections.abc import Coroutine, Sequence
from typing import Any, Protocol

from connic import telemetry
from connic.agent import Agent, Progress, ToolCall, ToolResult, Turn, Usage
from connic.errors import AgentError, AgentTimeout, ConnicError
from connic.frames import (
    ErrorFrame,
    ProgressFrame,
    Response,
    StreamChunk,
    StreamEnd,
    StreamStart,
    ToolCallFrame,
    ToolResultFrame,
)
from connic.middleware import EXPECTED_ITEMS, Emit, MiddlewareFunc, agent_endpoint, compose

__all__ = ["TurnChain", "build_turn_chain"]

log = logging.getLogger("connic.agent")


class TurnChain(Protocol):
    """What :func:`build_turn_chain` returns: ``await chain(turn, emit)`` answers one turn.

    The chain runs in the caller's task (the time limit cancels that task).
    """

    def __call__(self, turn: Turn, emit: Emit, /) -> Coroutine[Any, Any, None]:
        """Answer ``turn``, pushing its frames to ``emit``."""
        ...


class _TimeLimit:
    """Cancels turns that run past ``seconds``, with one timer for all of them.

    Every deadline is ``seconds`` after its start, so the dict (insertion-ordered)
    is also deadline-ordered: one timer waits for the oldest, and when it fires,
    expires what is due and waits for the next. On the event loop's clock, like
    the timer itself. The timer runs in an empty context: armed from a turn, it would
    keep that turn's context (its trace, message, session and history) until it fires,
    and from its own callback again, for as long as turns keep running.
    """

    __slots__ = ("_handle", "_loop", "_running", "seconds")

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._running: dict[_Deadline, None] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handle: asyncio.TimerHandle | None = None

    def deadline(self, task: asyncio.Task[Any], agent: str) -> _Deadline:
        """The time limit of one turn of ``agent``, run by ``task``: ``with limit.deadline(...):``."""
        return _Deadline(self, task, agent)

    def start(self, deadline: _Deadline) -> None:
        """Start timing ``deadline``'s turn."""
        loop = deadline.task.get_loop()
        if loop is not self._loop:  # a chain outlives a test's event loop
            self._loop, self._running, self._handle = loop, {}, None
        deadline.at = loop.time() + self.seconds
        self._running[deadline] = None
        if self._handle is None:
            self._handle = loop.call_later(self.seconds, self._expire, context=contextvars.Context())

    def stop(self, deadline: _Deadline) -> None:
        """The turn ended (its timer, if it was the oldest, fires and finds it gone)."""
        self._running.pop(deadline, None)

    def _expire(self) -> None:
        self._handle = None
        loop = self._loop
        assert loop is not None
        now = loop.time()
        running = self._running
        while running:
            deadline = next(iter(running))
            if deadline.at > now:
                self._handle = loop.call_later(deadline.at - now, self._expire, context=contextvars.Context())
                return
            del running[deadline]
            deadline.expired = True
            deadline.task.cancel()


class _Deadline:
    """One running turn's time limit, as a context: a cancellation it caused leaves as AgentTimeout.

    A CancelledError that nobody sent (the task is not being cancelled) was raised by
    agent code itself, a future of its own cancelled, say: it leaves as that turn's
    failure. Any other cancellation goes through.
    """

    __slots__ = ("agent", "at", "expired", "limit", "task")

    def __init__(self, limit: _TimeLimit, task: asyncio.Task[Any], agent: str) -> None:
        self.limit = limit
        self.task = task
        self.agent = agent
        self.at = 0.0
        self.expired = False

    def __enter__(self) -> None:
        self.limit.start(self)

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: types.TracebackType | None
    ) -> None:
        self.limit.stop(self)
        if isinstance(exc, asyncio.CancelledError):
            if self.expired and self.task.uncancel() == 0:
                raise AgentTimeout(f"agent {self.agent!r} ran past its {self.limit.seconds:g} s time limit") from None
            if not self.expired and not self.task.cancelling():
                raise _StrayCancel(exc) from exc


def build_turn_chain(
    agent: Agent,
    *,
    streaming_on: bool,
    agent_timeout: float,
    user_middleware: Sequence[MiddlewareFunc] = (),
    progress_events: bool = False,
) -> TurnChain:
    """The whole chain for one agent on one connector: ``await chain(turn, emit)`` answers a turn.

    ``emit`` receives the server frames of this agent's reply (``stream_start``,
    ``stream_chunk``, ``stream_end``, ``response`` or ``error``, and with
    ``progress_events`` the §9 frames ``tool_call``, ``tool_result`` and ``progress``). A cancelled
    turn still emits its end (``finish_reason: "cancelled"``), then re-raises.
    """
    inner = compose(user_middleware, agent_endpoint(agent))
    limit = _TimeLimit(agent_timeout)

    async def chain(turn: Turn, emit: Emit) -> None:
        task = asyncio.current_task()
        assert task is not None
        reply = _Reply(turn, emit, streaming_on, progress_events)
        try:
            try:
                with limit.deadline(task, turn.agent):
                    await inner(turn, reply.item)
            except asyncio.CancelledError:
                # Cancellation is not an error: the reply ends, marked cancelled.
                await reply.end("cancelled")
                raise
            await reply.end("stop")
        except asyncio.CancelledError:
            raise  # the task's own cancellation: never this turn's error
        except BaseException as exc:
            # The error boundary. Whatever agent or middleware code raised ends this turn
            # with an error frame: SystemExit and KeyboardInterrupt too (a library calling
            # sys.exit() must not end the server), and GeneratorExit or any other.
            await emit(_failed(turn, exc))

    return chain


class _StrayCancel(Exception):
    """A CancelledError that agent code raised without the task being cancelled."""

    def __init__(self, cancelled: asyncio.CancelledError) -> None:
        super().__init__(str(cancelled))


def _failed(turn: Turn, exc: BaseException) -> ErrorFrame:
    """The error frame for a turn that raised ``exc``; logs it on ``connic.agent``.

    Every agent failure is logged with the agent, the session and the message id,
    never the message text: expected ones (``AgentError``, ``agent_timeout``) in one
    line, anything else with its traceback.
    """
    if isinstance(exc, ConnicError):
        if isinstance(exc, AgentError):
            what, level = "timed out" if isinstance(exc, AgentTimeout) else "failed", logging.WARNING
        else:  # a middleware (or agent) refusing the turn with a code of its own
            what, level = f"was refused ({exc.code})", logging.INFO
        cause = exc.__cause__
        log.log(
            level,
            "agent %s %s on message %r of session %s: %s%s",
            turn.agent,
            what,
            turn.id,
            turn.session.id,
            exc.message,
            "" if cause is None else f" (from {type(cause).__name__})",
        )
        return ErrorFrame(id=turn.id, code=exc.code, message=exc.message, agent=turn.agent)
    kind = "CancelledError" if type(exc) is _StrayCancel else type(exc).__name__
    detail = str(exc)
    what = f"{kind}: {detail}" if detail else kind
    log.error(
        "agent %s failed on message %r of session %s: %s",
        turn.agent,
        turn.id,
        turn.session.id,
        what,
        exc_info=exc.__cause__ if type(exc) is _StrayCancel else exc,
    )
    text = f"agent {turn.agent!r} failed: {what}"
    return ErrorFrame(id=turn.id, code=AgentError.code, message=text, agent=turn.agent)


class _Reply:
    """The serialiser of one turn: its text so far, its usage and its stream state."""

    __slots__ = ("emit", "parts", "progress", "started", "streaming", "turn", "usage")

    def __init__(self, turn: Turn, emit: Emit, streaming: bool, progress: bool = False) -> None:
        self.turn = turn
        self.emit = emit
        self.streaming = streaming
        self.progress = progress
        self.parts: list[str] = []
        self.usage: Usage | None = None
        self.started = False  # stream_start sent: it goes out with the first chunk

    async def item(self, value: Any) -> None:
        """One item from the agent (or the user middleware): a text chunk, the usage or a progress event.

        The agent's items were checked where it ran (``agent_endpoint``); anything else
        here came from a user middleware.
        """
        if isinstance(value, str):
            if self.streaming:
                if value:
                    if not self.started:
                        await self._start()
                    self.parts.append(value)
                    await self.emit(StreamChunk(self.turn.id, self.turn.agent, value))
            else:
                self.parts.append(value)
        elif isinstance(value, Usage):
            self.usage = value
        elif isinstance(value, ToolCall | ToolResult | Progress):
            telemetry.event(value)  # a tool span, with or without progress_events
            if self.progress:
                await self._event(value)
        else:
            raise AgentError(f"a middleware emitted {type(value).__name__}; expected {EXPECTED_ITEMS}")

    async def _event(self, value: ToolCall | ToolResult | Progress) -> None:
        # Progress frames go out as they come, never into the text: streamed, inside the
        # stream (so one before any text opens it); unstreamed, ahead of the response.
        turn = self.turn
        if self.streaming and not self.started:
            await self._start()
        if isinstance(value, ToolCall):
            await self.emit(ToolCallFrame(turn.id, turn.agent, value.call_id, value.name, value.arguments))
        elif isinstance(value, ToolResult):
            await self.emit(
                ToolResultFrame(turn.id, turn.agent, value.call_id, value.name, value.result, value.is_error)
            )
        else:
            await self.emit(ProgressFrame(turn.id, turn.agent, value.stage, value.detail))

    async def _start(self) -> None:
        # stream_start goes with the first chunk (or the end), never ahead: a middleware or
        # agent that refuses a turn before producing anything sends only its error.
        self.started = True
        await self.emit(StreamStart(self.turn.id, self.turn.agent))

    async def end(self, reason: str) -> None:
        """The reply's last frame: ``stream_end`` (after ``stream_start`` if none went yet) or ``response``."""
        turn = self.turn
        usage = self.usage
        token_usage = usage.as_dict() if usage is not None else {"prompt_tokens": 0, "candidates_tokens": 0}
        if self.streaming:
            if not self.started:
                await self._start()
            await self.emit(StreamEnd(turn.id, turn.agent, "".join(self.parts), token_usage, reason))
        else:
            await self.emit(Response(turn.id, turn.agent, "".join(self.parts), token_usage, reason))
