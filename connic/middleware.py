"""The message middleware chain.

Each turn (one message answered by one agent) runs through a push-style chain:
a middleware is ``async def mw(turn, emit, call_next)``; it may change the turn,
wrap ``emit`` to see or change what flows back, and must ``await
call_next(turn, emit)`` to go on. Push-style (rather than wrapping an async
generator) keeps ``asyncio.timeout`` and task groups safe: nothing yields
inside a cancel scope (PEP 789).

The chain a transport builds, outermost first::

    error boundary -> serialiser -> time limit (agent_timeout) -> user middleware ... -> agent

The error boundary emits server frames; the serialiser turns the items below it
(``str`` chunks, :class:`connic.Usage` and the progress events :class:`connic.ToolCall`,
:class:`connic.ToolResult` and :class:`connic.Progress`) into frames, so user middleware
sees plain text and plain values. Authentication is a connection concern, done before any turn (the
handshake or the first frame). See docs/architecture.md for why.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable, Coroutine, Sequence
from typing import Any, ClassVar, Final, cast

from connic.agent import Agent, Progress, ToolCall, ToolResult, Turn, Usage
from connic.errors import AgentError

__all__ = ["CallNext", "Emit", "Middleware", "MiddlewareFunc", "agent_endpoint", "close_stream", "compose"]

log = logging.getLogger("connic.agent")

Emit = Callable[[Any], Awaitable[None]]
"""Push one item downstream-to-client: a text chunk, Usage or progress event below the serialiser, a frame above it."""
CallNext = Callable[[Turn, Emit], Coroutine[Any, Any, None]]
"""The rest of the chain."""
MiddlewareFunc = Callable[[Turn, Emit, CallNext], Coroutine[Any, Any, None]]
"""The shape of every middleware."""


class Middleware:
    """Base class of user middleware plugins (entry point group ``connic.middleware``).

    Override :meth:`__call__`. Like agents, a middleware may declare an attrs
    ``Options`` class, structured from its config table into ``self.options``.
    Raising a :class:`connic.ConnicError` subclass (say ``InvalidMessage``)
    refuses the turn with that error code; the session goes on.
    """

    Options: ClassVar[type[Any] | None] = None

    def __init__(self, options: Any = None) -> None:
        self.options = options

    async def __call__(self, turn: Turn, emit: Emit, call_next: CallNext) -> None:
        """Pass the turn on unchanged."""
        await call_next(turn, emit)


def compose(middleware: Sequence[MiddlewareFunc], endpoint: CallNext) -> CallNext:
    """Fold ``middleware`` (outermost first) around ``endpoint`` into one callable."""
    handler = endpoint
    for mw in reversed(middleware):
        handler = _link(mw, handler)
    return handler


def _link(mw: MiddlewareFunc, call_next: CallNext) -> CallNext:
    def step(turn: Turn, emit: Emit) -> Coroutine[Any, Any, None]:
        return mw(turn, emit, call_next)  # the middleware's own coroutine: no extra frame per layer

    return step


_ITEMS = (str, Usage, ToolCall, ToolResult, Progress)
"""What an agent may yield (str first: almost every item is a chunk)."""
EXPECTED_ITEMS: Final = "str or connic.Usage, or a progress event (connic.ToolCall, connic.ToolResult, connic.Progress)"


def agent_endpoint(agent: Agent) -> CallNext:
    """The innermost handler: run ``agent.respond`` and push what it yields.

    This is where an agent's output is checked: ``respond`` must be an async
    generator (it is called once either way), and yield only ``str`` chunks,
    :class:`connic.Usage` and the progress events (:class:`connic.ToolCall`,
    :class:`connic.ToolResult`, :class:`connic.Progress`, whose fields were checked when
    the agent made them); anything else is an :class:`connic.AgentError`.
    """

    async def endpoint(turn: Turn, emit: Emit) -> None:
        stream = agent.respond(turn)
        if not hasattr(stream, "aclose"):
            raise AgentError(f"{type(agent).__name__}.respond must be an async generator")
        try:
            async for item in stream:
                if not isinstance(item, _ITEMS):
                    raise AgentError(f"agent yielded {type(item).__name__}; expected {EXPECTED_ITEMS}")
                await emit(item)
        except BaseException:
            await close_stream(cast("AsyncGenerator[Any, None]", stream), turn)  # it has aclose, checked above
            raise

    return endpoint


async def close_stream(stream: AsyncGenerator[Any, None], turn: Turn) -> None:
    """Close an agent's stream that stopped early, while the exception that stopped it propagates.

    That first exception is the turn's: an exception from the agent's own clean-up
    (its ``finally`` blocks run here) is logged on ``connic.agent`` and dropped, be it
    ``SystemExit`` or any other, except a cancellation of the task, which goes on.
    """
    try:
        await stream.aclose()
    except asyncio.CancelledError:
        raise
    except BaseException:
        log.exception(
            "agent %s failed closing its stream on message %r of session %s", turn.agent, turn.id, turn.session.id
        )
