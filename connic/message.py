"""One accepted message: its agents' turns, and where their frames go.

:func:`answer` runs a message's agents through their chains, one in the calling
task or several in a task group; :class:`Message` receives their frames, keeps
what the session needs (each agent's whole answer, into the history as its reply
ends; the turn metrics) and hands them to the session to be numbered, logged and sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import traceback
from typing import TYPE_CHECKING, Any

from connic import telemetry
from connic.agent import HistoryEntry, HistoryView, Session, Turn
from connic.frames import (
    ErrorFrame,
    MessageFrame,
    MessageId,
    ProgressFrame,
    Response,
    ServerFrame,
    StreamChunk,
    StreamEnd,
    StreamStart,
    ToolCallFrame,
    ToolResultFrame,
    encode,
)

if TYPE_CHECKING:
    from connic.session import ChatSession

__all__ = ["Message", "answer", "release_cancellation"]


async def answer(session: ChatSession, message: Message, history: HistoryView) -> None:
    """Run every agent that answers ``message``.

    One agent answers in the calling task (the session's answering task): a cancel of
    the message cancels that task, which takes its own cancellation back here. Several
    answer concurrently, a task each.
    """
    sessions = session.sessions
    chains = sessions.chains
    agent = message.frame.agent
    if agent is not None or len(chains) == 1:
        name = agent if agent is not None else sessions.agent_names[0]
        task = asyncio.current_task()
        assert task is not None
        message.tasks[name] = task
        try:
            await telemetry.answer(chains[name], _turn(session, message, name, history), message)
        except asyncio.CancelledError:
            if not message.cancelled or task.uncancel() > 0:
                raise
        return
    try:
        async with asyncio.TaskGroup() as group:
            for name in sessions.agent_names:
                turn = _turn(session, message, name, history)
                task = message.tasks[name] = group.create_task(telemetry.answer(chains[name], turn, message))
                task.add_done_callback(release_cancellation)
    except BaseException as exc:
        # The TaskGroup's __aexit__ frame, in the error's traceback, keeps the error in
        # a local: a reference cycle through the session's frames (CPython 3.11).
        traceback.clear_frames(exc.__traceback__)
        raise


def _turn(session: ChatSession, message: Message, agent: str, history: HistoryView) -> Turn:
    frame = message.frame
    state = session.states.get(agent)
    if state is None:
        state = session.states[agent] = {}
    return Turn(
        message.id,
        message.number,
        frame.text,
        frame.context,
        frame.files,
        Session(session.id, history, state),
        agent,
        message.streaming,
    )


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


class Message:
    """An accepted message, queued or being answered."""

    __slots__ = (
        "at",
        "cancelled",
        "ended",
        "first_chunks",
        "frame",
        "handshake",
        "id",
        "number",
        "session",
        "streaming",
        "tasks",
    )

    def __init__(self, session: ChatSession, frame: MessageFrame, message_id: MessageId, number: int) -> None:
        self.session = session
        self.frame = frame
        self.id = message_id
        self.number = number
        self.streaming = session.sessions.options.streaming
        self.tasks: dict[str, asyncio.Task[Any]] = {}
        self.cancelled = False
        # The agents whose end frame (stream_end, response, an error) was numbered: a record written
        # now says so (SessionRecord.ended), for a follower to know which ends its seq covers.
        self.ended: set[str] = set()
        self.at = 0.0  # when answering began (the loop's clock)
        self.first_chunks: set[str] | None = None  # agents that sent a chunk
        self.handshake = telemetry.HANDSHAKE.get()  # the trace context of the connection that sent it

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
                metrics.first_chunk.observe(session.clock() - self.at, frame.agent)
        elif isinstance(frame, Response | StreamEnd):
            text = frame.response if isinstance(frame, Response) else frame.full_response
            if text:
                # Into the history before the end frame is numbered, and saved with it: a client
                # that has the end finds the reply in `history` (PROTOCOL.md §8), here at once and,
                # through a shared store, on a process following this one (the store writes the
                # history no later than the frame: ws_follow_history). Several agents' replies go
                # in as they end, while the others still answer.
                session.history.add(HistoryEntry("agent", text, frame.agent, self.id, self.number))
                sessions.store.save(session)
            usage = frame.token_usage
            prompt, candidates = usage.get("prompt_tokens", 0), usage.get("candidates_tokens", 0)
            session.tokens_in += prompt
            session.tokens_out += candidates
            metrics.turn_ended(frame.agent, frame.finish_reason, session.clock() - self.at, prompt, candidates)
        elif isinstance(frame, ErrorFrame):
            metrics.errors.inc(sessions.label, frame.code)
            if frame.agent is not None:
                metrics.turn_ended(frame.agent, "error", session.clock() - self.at, 0, 0)
        elif not isinstance(frame, StreamStart | ToolCallFrame | ToolResultFrame | ProgressFrame):
            # stream_start and the §9 frames pass through as they are: numbered, logged, sent.
            raise TypeError(f"a reply cannot contain a {type(frame).__name__} frame")
        data = session.number(encode(frame))
        if isinstance(frame, Response | StreamEnd | ErrorFrame) and frame.agent is not None:
            self.ended.add(frame.agent)
        sink = session.sink
        if sink is not None and not sink.offer(data):
            await sink.send(data)  # the client is behind: wait for room (backpressure)
        if self.cancelled:
            # Let a pending cancellation land even in an agent that never waits.
            await asyncio.sleep(0)
