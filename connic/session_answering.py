"""A session's answering task: it answers the queued messages one after another.

Part of :class:`~connic.session.ChatSession` (kept apart for size): the session starts
:func:`answer_loop` with its first message and wakes it for each one after; the task
lives as long as the session. :func:`connic.message.answer` runs a message's agents.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from connic.agent import HistoryEntry
from connic.errors import InternalError, MessageLimitReached
from connic.message import answer
from connic.session_state import SessionState
from connic.session_timer import on_idle

if TYPE_CHECKING:
    from connic.session import ChatSession

__all__ = ["answer_loop"]

log = logging.getLogger("connic.session")


async def answer_loop(session: ChatSession) -> None:
    """Answer queued messages one after another, for the life of the session."""
    try:
        await _answer_queued(session)
    except Exception:
        # The chain contains every agent failure: this is connic's own bug. The session
        # cannot go on without its answering task; the server and other sessions can.
        log.exception("session %s: answering failed; ending the session", session.id)
        session.end(InternalError("the session failed; start a new one"))


async def _answer_queued(session: ChatSession) -> None:
    loop = session._loop
    while True:
        while not session.queue:
            session.idle.set()
            if session.limit_reached and session.state is not SessionState.DETACHED:
                session.end(MessageLimitReached(), notify=False)
                return
            # Over its limit but detached: the replies wait in the log for the client, which
            # gets them and then 4009 when it resumes (session_resume.resume), or the resume
            # window runs out first. Ending now would throw them away.
            on_idle(session)
            session._wakeup = loop.create_future()
            try:
                await session._wakeup
            finally:
                session._wakeup = None
        message = session.queue.pop(0)
        session.current = message
        message.at = loop.time()
        history = session.history
        seen = history.view()  # what came before this message
        newest = len(history)  # where this exchange starts: kept whole when trimming
        history.add(HistoryEntry("user", message.frame.text, None, message.id, message.number))
        # A shared store writes the user message now (batched): if this process dies
        # mid-reply, the process taking the session over has it (PROTOCOL.md §7).
        session.sessions.store.save(session)
        try:
            await answer(session, message, seen)
        finally:
            session.current = None
            session.last_activity = loop.time()
        # Each agent's answer went into the history as its reply ended (Message.emit).
        bound = session.sessions.options.max_history_bytes
        if history.size > bound:
            history.trim(bound, newest)
        session.sessions.store.save(session)
