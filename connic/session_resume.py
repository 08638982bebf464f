"""A connection taking a session over: a resume here (replay, then resume), or one on another process.

Part of :class:`~connic.session.ChatSession` (kept apart for size): each function here is
one of its methods itself, assigned in the class, as :mod:`connic.session_admission`'s
``admit`` is (PROTOCOL.md §7). A resume first calls :func:`replay`, which takes the session
from the connection it had (4011) and reads the log from the client's ``last_seq`` while
holding the frames produced meanwhile, then :func:`resume`, which sends those the log did
not have and attaches the new connection. A resume that attaches nothing calls
:func:`resume_failed`, which leaves the session detached; :func:`taken_over` ends the
connection of a session a resume on another process took over (a shared store).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from connic.errors import MessageLimitReached, SessionTakenOver
from connic.session_state import SessionState
from connic.session_timer import arm

if TYPE_CHECKING:
    from connic.session import ChatSession
    from connic.sessions import Sink

__all__ = ["replay", "resume", "resume_failed", "taken_over"]


async def replay(session: ChatSession, sink: Sink, last_seq: int) -> tuple[bool, list[str]] | None:
    """Start resuming from ``last_seq``: whether the log still has every frame after it, and those frames.

    The current connection, if any, is taken over (4011). Frames produced
    meanwhile are held for :meth:`~connic.session.ChatSession.resume`, which the caller must call next,
    without awaiting in between, once it has sent ``connected`` and the frames.
    Returns None if another resume overtook this one.
    """
    old = session.sink
    if old is not None:
        session.sink = None
        old.end(SessionTakenOver("another connection resumed this session"), True)
    held: list[tuple[int, str]] = []
    session._held = held
    try:
        frames = await session.log.since(last_seq) if session.log is not None else None
    except BaseException:
        # A shared store's log could not be read, or the resuming connection went away: nothing
        # attaches. Left resuming, with no timer (a session a resume took over from the store has
        # none yet), it would be held here, and owned in the store, for ever.
        if session._held is held:
            session._held = None
            session.resume_failed()
        raise
    if session._held is not held or session.state is SessionState.ENDED:
        return None
    if frames is None:
        return False, []
    return True, frames


def resume(session: ChatSession, sink: Sink, replayed_to: int) -> None:
    """Go live on ``sink`` after :func:`replay`: send the frames held meanwhile that were not replayed."""
    held, session._held = session._held or [], None
    for seq, data in held:
        if seq > replayed_to:
            sink.send_nowait(data)
    session.sink = sink
    session.state = SessionState.ATTACHED
    arm(session)
    if session.limit_reached and not session.busy:
        # Its last replies ended while it was detached: the client has them now (the caller
        # sends the replay before this step of the loop ends), then the close 4009 it missed.
        session._loop.call_soon(_over_limit, session, sink)


def _over_limit(session: ChatSession, sink: Sink) -> None:
    if session.sink is sink and not session.busy:
        session.end(MessageLimitReached(), notify=False)


def resume_failed(session: ChatSession) -> None:
    """A resume found the session but attached nothing: it goes on detached, as a connection's end leaves it.

    A session a resume took over from a shared store has no timer yet: without this it
    would be held by this process, and owned in the store, for ever. A no-op while a
    connection is attached.
    """
    if session.sink is not None or session.state is SessionState.ENDED:
        return
    if session.state is SessionState.ATTACHED or not session._detached_at:
        # Its connection was taken over by the failed resume (whose detach then did nothing:
        # the session had moved on), or it was just rebuilt from the store: it detaches now.
        session._went_detached()
    arm(session)
    session.sessions.store.save(session)  # a shared store lets it go once it is idle


def taken_over(session: ChatSession) -> None:
    """A resume on another process took the session over: its connection here ends (4011), and it detaches.

    As :meth:`~connic.session.ChatSession.replay` ends the connection a resume in this process takes over. The
    session goes on here, detached, until it is idle: a shared store then lets it go and
    the resume takes it (following the reply in flight meanwhile). That reply goes on
    whatever ``on_disconnect`` says: the client did not go away. A no-op with no
    connection attached.
    """
    sink = session.sink
    if sink is None or session.state is not SessionState.ATTACHED:
        return
    session.sink = None
    sink.end(SessionTakenOver("another connection resumed this session"), True)
    session._went_detached(client_left=False)
    arm(session)
    session.sessions.store.save(session)  # a shared store lets it go once it is idle
