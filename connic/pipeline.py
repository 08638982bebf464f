"""How a transport runs one agent's turn: connic's built-in layers around the user middleware.

The chain for one agent is, outermost first::

    error boundary -> serialiser -> time limit (agent_timeout) -> user middleware ... -> agent

The error boundary turns failures into ``error`` frames; the serialiser turns
the text chunks and :class:`connic.Usage` below it into frames (streaming
forwards each chunk, buffering sends one ``response``); the time limit cancels
an agent that runs past ``agent_timeout``. The three built-in layers run as one
coroutine, :func:`build_turn_chain`'s, which also iterates the agent itself
when there is no user middleware: one coroutine per turn instead of four, and
one timer for all turns instead of one each (docs/performance.md).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

from connic.agent import Agent, Turn, Usage
from connic.errors import AgentError, AgentTimeout, ConnicError
from connic.frames import ErrorFrame, Response, StreamChunk, StreamEnd, StreamStart
from connic.middleware import CallNext, Emit, MiddlewareFunc, agent_endpoint, agent_stream, compose, not_an_item

__all__ = ["build_turn_chain"]

log = logging.getLogger("connic.agent")


class _Deadline:
    """One running turn's time limit."""

    __slots__ = ("at", "expired", "task")

    def __init__(self, task: asyncio.Task[Any], at: float) -> None:
        self.task = task
        self.at = at
        self.expired = False


class _TimeLimit:
    """Cancels turns that run past ``seconds``, with one timer for all of them.

    A timer per turn (``call_later`` and ``cancel``) costs more than the rest of a
    quick turn's bookkeeping. Every deadline here is ``seconds`` after its start, so
    the dict (insertion-ordered) is also deadline-ordered: one timer waits for the
    oldest, and when it fires, expires what is due and waits for the next.
    """

    __slots__ = ("_handle", "_loop", "_running", "seconds")

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._running: dict[_Deadline, None] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handle: asyncio.TimerHandle | None = None

    def start(self, task: asyncio.Task[Any]) -> _Deadline:
        """Start timing ``task``'s turn."""
        loop = task.get_loop()
        if loop is not self._loop:  # a chain outlives a test's event loop
            self._loop, self._running, self._handle = loop, {}, None
        deadline = _Deadline(task, loop.time() + self.seconds)
        self._running[deadline] = None
        if self._handle is None:
            self._handle = loop.call_at(deadline.at, self._expire)
        return deadline

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
                self._handle = loop.call_at(deadline.at, self._expire)
                return
            del running[deadline]
            deadline.expired = True
            deadline.task.cancel()


def build_turn_chain(
    agent: Agent,
    *,
    streaming_on: bool,
    agent_timeout: float,
    user_middleware: Sequence[MiddlewareFunc] = (),
) -> CallNext:
    """The whole chain for one agent on one connector: ``await chain(turn, emit)`` answers a turn.

    ``emit`` receives the server frames of this agent's reply (``stream_start``,
    ``stream_chunk``, ``stream_end``, ``response`` or ``error``). A cancelled
    turn still emits its end (``finish_reason: "cancelled"``), then re-raises.
    """
    inner = compose(user_middleware, agent_endpoint(agent)) if user_middleware else None
    limit = _TimeLimit(agent_timeout)

    async def chain(turn: Turn, emit: Emit) -> None:
        parts: list[str] = []
        usage: Usage | None = None
        started = False  # stream_start sent: it goes out with the first chunk

        async def start() -> None:
            # A middleware or agent that refuses a turn before producing anything sends only its error.
            nonlocal started
            if not started:
                started = True
                await emit(StreamStart(turn.id, turn.agent))

        async def item(value: Any) -> None:
            nonlocal usage
            if isinstance(value, str):
                if streaming_on:
                    if value:
                        await start()
                        parts.append(value)
                        await emit(StreamChunk(turn.id, turn.agent, value))
                else:
                    parts.append(value)
            else:
                usage = value

        async def end(reason: str) -> None:
            token_usage = usage.as_dict() if usage is not None else {"prompt_tokens": 0, "candidates_tokens": 0}
            if streaming_on:
                await start()
                await emit(StreamEnd(turn.id, turn.agent, "".join(parts), token_usage, reason))
            else:
                await emit(Response(turn.id, turn.agent, "".join(parts), token_usage, reason))

        task = asyncio.current_task()
        assert task is not None
        try:
            try:
                deadline = limit.start(task)
                try:
                    if inner is not None:
                        await inner(turn, item)
                    else:
                        stream = agent_stream(agent, turn)
                        finished = False
                        try:
                            async for value in stream:
                                if type(value) is str and not streaming_on:
                                    parts.append(value)  # the common case, without a call
                                elif isinstance(value, (str, Usage)):
                                    await item(value)
                                else:
                                    raise not_an_item(value)
                            finished = True
                        finally:
                            if not finished:
                                await stream.aclose()
                except asyncio.CancelledError:
                    # Our own cancellation (and no one else's) is a timeout, reported as an error.
                    if deadline.expired and task.uncancel() == 0:
                        raise AgentTimeout(
                            f"agent {turn.agent!r} ran past its {agent_timeout:g} s time limit"
                        ) from None
                    raise
                finally:
                    limit.stop(deadline)
            except asyncio.CancelledError:
                # Cancellation is not an error: the reply ends, marked cancelled.
                await end("cancelled")
                raise
            await end("stop")
        except ConnicError as exc:
            if not isinstance(exc, AgentError):
                log.info("turn %r refused for agent %s: %s", turn.id, turn.agent, exc.message)
            await emit(ErrorFrame(id=turn.id, code=exc.code, message=exc.message, agent=turn.agent))
        except Exception as exc:
            log.exception("agent %s failed on message %r of session %s", turn.agent, turn.id, turn.session.id)
            text = f"agent {turn.agent!r} failed: {type(exc).__name__}: {exc}"
            await emit(ErrorFrame(id=turn.id, code=AgentError.code, message=text, agent=turn.agent))

    return chain
