"""When a session expires: one timer per session, for whichever deadline comes first.

Part of :class:`~connic.session.ChatSession` (kept apart for size). An attached
session expires ``session_timeout`` after its last activity; a detached one also when
its ``resume_window`` runs out. A session never expires while it answers: the end of
its last reply arms the timer again.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from connic.errors import SessionExpired
from connic.session_state import SessionState

if TYPE_CHECKING:
    from connic.session import ChatSession

__all__ = ["arm", "on_idle"]


def on_idle(session: ChatSession) -> None:
    """The last queued message was answered: the timers start from now."""
    if session.state is SessionState.DETACHED:
        session._detached_at = session._loop.time()  # the window starts again when the last reply ends
        arm(session)
    elif session._timer is None:
        arm(session)


def arm(session: ChatSession) -> None:
    """Set the session's one timer for its next deadline (PROTOCOL.md §7)."""
    if session._timer is not None:
        session._timer.cancel()
    session._timer = session._loop.call_at(_deadline(session), _expire, session)


def _deadline(session: ChatSession) -> float:
    opts = session.sessions.options
    at = session.last_activity + opts.session_timeout
    if session.state is SessionState.DETACHED:
        at = min(at, session._detached_at + opts.resume_window)
    return at


def _expire(session: ChatSession) -> None:
    session._timer = None
    if session.state is SessionState.ENDED or session.busy:
        return  # the end of the last reply arms the timer again
    left = _deadline(session) - session._loop.time()
    if left > 0:
        session._timer = session._loop.call_later(left, _expire, session)
    elif session.state is SessionState.ATTACHED:
        timeout = session.sessions.options.session_timeout
        session.end(SessionExpired(f"session expired after {timeout:g} s without a message"))
    else:
        session.end()
