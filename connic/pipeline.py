"""connic's built-in message middleware: how a transport runs one agent's turn.

``error_boundary`` turns failures into ``error`` frames, ``limits`` enforces the
agent's time limit, and a serialiser turns text chunks into frames: streaming
forwards each chunk, buffering sends one ``response``. :func:`build_turn_chain`
folds them with the user middleware around an agent.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

from connic.agent import Agent, Turn, Usage
from connic.errors import AgentError, AgentTimeout, ConnicError
from connic.frames import ErrorFrame, Response, StreamChunk, StreamEnd, StreamStart
from connic.middleware import CallNext, Emit, MiddlewareFunc, agent_endpoint, compose

__all__ = ["buffering", "build_turn_chain", "error_boundary", "limits", "streaming"]

log = logging.getLogger("connic.agent")


async def error_boundary(turn: Turn, emit: Emit, call_next: CallNext) -> None:
    """Turn an exception from anything below into an ``error`` frame for this agent.

    Cancellation is not an error: it passes through (the serialiser reports it).
    """
    try:
        await call_next(turn, emit)
    except ConnicError as exc:
        if not isinstance(exc, AgentError):
            log.info("turn %r refused for agent %s: %s", turn.id, turn.agent, exc.message)
        await emit(ErrorFrame(id=turn.id, code=exc.code, message=exc.message, agent=turn.agent))
    except Exception as exc:
        log.exception("agent %s failed on message %r of session %s", turn.agent, turn.id, turn.session.id)
        text = f"agent {turn.agent!r} failed: {type(exc).__name__}: {exc}"
        await emit(ErrorFrame(id=turn.id, code=AgentError.code, message=text, agent=turn.agent))


def limits(agent_timeout: float) -> MiddlewareFunc:
    """Cancel an agent that runs past ``agent_timeout`` seconds; it reports ``agent_timeout``."""

    async def limit(turn: Turn, emit: Emit, call_next: CallNext) -> None:
        # A bare timer handle rather than asyncio.timeout: this runs once per agent per
        # message, and the timer is all that is needed (the same cancel-and-uncancel dance).
        task = asyncio.current_task()
        assert task is not None
        expired = False

        def expire() -> None:
            nonlocal expired
            expired = True
            task.cancel()

        timer = asyncio.get_running_loop().call_later(agent_timeout, expire)
        try:
            await call_next(turn, emit)
        except asyncio.CancelledError:
            if expired and task.uncancel() == 0:
                raise AgentTimeout(f"agent {turn.agent!r} ran past its {agent_timeout:g} s time limit") from None
            raise
        finally:
            timer.cancel()

    return limit


class _Collector:
    """What an agent has produced so far."""

    __slots__ = ("parts", "usage")

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.usage = Usage()

    @property
    def text(self) -> str:
        return "".join(self.parts)


async def streaming(turn: Turn, emit: Emit, call_next: CallNext) -> None:
    """Streaming serialiser: ``stream_start``, a ``stream_chunk`` per non-empty chunk, ``stream_end``."""
    got = _Collector()
    started = False

    async def start() -> None:
        # stream_start goes out with the first output, so a middleware or agent
        # that refuses a turn before producing anything sends only its error.
        nonlocal started
        if not started:
            started = True
            await emit(StreamStart(id=turn.id, agent=turn.agent))

    async def item(value: Any) -> None:
        if isinstance(value, str):
            if value:
                await start()
                got.parts.append(value)
                await emit(StreamChunk(id=turn.id, agent=turn.agent, chunk=value))
        else:
            got.usage = value

    try:
        await call_next(turn, item)
    except asyncio.CancelledError:
        await start()
        await emit(StreamEnd(turn.id, turn.agent, got.text, got.usage.as_dict(), "cancelled"))
        raise
    await start()
    await emit(StreamEnd(turn.id, turn.agent, got.text, got.usage.as_dict(), "stop"))


async def buffering(turn: Turn, emit: Emit, call_next: CallNext) -> None:
    """Non-streaming serialiser: one ``response`` with the whole answer."""
    got = _Collector()

    async def item(value: Any) -> None:
        if isinstance(value, str):
            got.parts.append(value)
        else:
            got.usage = value

    try:
        await call_next(turn, item)
    except asyncio.CancelledError:
        await emit(Response(turn.id, turn.agent, got.text, got.usage.as_dict(), "cancelled"))
        raise
    await emit(Response(turn.id, turn.agent, got.text, got.usage.as_dict(), "stop"))


def build_turn_chain(
    agent: Agent,
    *,
    streaming_on: bool,
    agent_timeout: float,
    user_middleware: Sequence[MiddlewareFunc] = (),
) -> CallNext:
    """The whole chain for one agent on one connector."""
    serialiser = streaming if streaming_on else buffering
    # The time limit sits inside the serialiser so that a timeout reaches it as an
    # AgentTimeout error (sent in place of stream_end), not as a cancellation.
    chain: list[MiddlewareFunc] = [error_boundary, serialiser, limits(agent_timeout), *user_middleware]
    return compose(chain, agent_endpoint(agent))
