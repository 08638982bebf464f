"""Admitting a message to a session: acked and queued, or refused, as it arrives.

Part of :class:`~connic.session.ChatSession` (kept apart for size): :func:`admit` is
the session's ``admit`` method itself, assigned in the class rather than called from
it, since every message comes through it. It checks, in this order, the server's
drain, ``max_messages``, ``rate_limit`` (which may ask a shared store), the agent the
message names and ``max_queued``; a message that passes is counted, queued for the
answering task (:mod:`connic.session_answering`, started here with the first one)
and acked.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable
from typing import TYPE_CHECKING

from connic.errors import (
    MessageLimitReached,
    QueueFull,
    RateLimited,
    ServerShuttingDown,
    StoreUnavailable,
    UnknownAgent,
)
from connic.frames import Ack, MessageFrame, encode
from connic.message import Message, release_cancellation
from connic.session_answering import answer_loop
from connic.session_state import SessionState

if TYPE_CHECKING:
    from connic.session import ChatSession

__all__ = ["admit"]

log = logging.getLogger("connic.session")


async def admit(session: ChatSession, frame: MessageFrame, waiting: Callable[[], int] | None = None) -> None:
    """Accept a message (ack it and queue it) or refuse it with a sequenced error frame.

    ``waiting``: how many messages wait to be answered, for ``max_queued``, when not the queue's
    length (messages a resume held behind another process's reply, :class:`~connic.transports.ws_held.Behind`).
    """
    sessions = session.sessions
    opts = sessions.options
    if sessions.draining:
        session.refuse(ServerShuttingDown("the server is shutting down"), frame.id)
        return
    if _over_limit(session, frame):
        return
    if session.bucket is not None:
        try:
            wait = await session.bucket.acquire()  # a shared store's bucket answers over the network
        except StoreUnavailable as exc:
            log.warning("session %s: the session store failed: %s", session.id, exc.why)
            if session.sink is not None:
                session.sink.end(exc, True)  # not acked: the client sends it again once resumed
            return
        if session.state is SessionState.ENDED:
            return  # ended (or moved to another process) meanwhile: its connection is closing
        if sessions.draining:
            session.refuse(ServerShuttingDown("the server is shutting down"), frame.id)
            return
        # Asked again: another message of the session (an AG-UI run posted at the same time) may
        # have been accepted while this one waited for its token, and max_messages reached.
        if _over_limit(session, frame):
            return
        if wait:
            sessions.metrics.rate_limited.inc(sessions.label)
            retry_after = math.ceil(wait * 1000) / 1000  # never 0: that would say "retry now"
            session.refuse(
                RateLimited(f"over the rate limit; retry in {retry_after:.3f} s", retry_after=retry_after), frame.id
            )
            return
    if frame.agent is not None and frame.agent not in sessions.chains:
        names = ", ".join(sessions.agent_names)
        session.refuse(UnknownAgent(f"no agent {frame.agent!r} on this connector (agents: {names})"), frame.id)
        return
    queued = len(session.queue) if waiting is None else waiting()  # asked now: the admission may have waited
    if queued >= opts.max_queued:
        session.refuse(QueueFull(f"{queued} messages are already waiting to be answered"), frame.id)
        return
    session.count += 1
    sessions.metrics.messages.add(sessions.key)
    message_id = frame.id if frame.id is not None else f"auto-{session.count}"
    session.last_activity = session._loop.time()
    session.queue.append(Message(session, frame, message_id, session.count))
    session.idle.clear()
    # Wake the answering task before queueing the ack: it then runs before the ack's
    # flush, so a quick answer leaves in the same write as its ack (which still goes first).
    if session._answering is None:
        session._answering = asyncio.create_task(answer_loop(session))
        session._answering.add_done_callback(release_cancellation)
    elif session._wakeup is not None and not session._wakeup.done():
        session._wakeup.set_result(None)
    session._send_nowait(encode(Ack(message_id, session.count, frame.agent)))
    sessions.store.save(session)  # a shared store: the count holds even if this process dies next


def _over_limit(session: ChatSession, frame: MessageFrame) -> bool:
    """Whether the session reached ``max_messages``: the message is then refused (and the session ends when idle)."""
    limit = session.sessions.options.max_messages
    if not (session.limit_reached or session.count >= limit):
        return False
    session.refuse(MessageLimitReached(f"this session reached its limit of {limit} messages"), frame.id)
    session.limit_reached = True
    if not session.busy:
        session.end(MessageLimitReached(), notify=False)
    return True
