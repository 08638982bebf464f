"""What a shared store keeps of a session, and rebuilding a session from it.

Part of :class:`~connic.session.ChatSession` (kept apart for size): the fields of a
:class:`~connic.stores.SessionRecord` are the session's own.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from connic.stores import SessionRecord

if TYPE_CHECKING:
    from connic.session import ChatSession

__all__ = ["record", "restore"]


def restore(session: ChatSession, record: SessionRecord) -> None:
    """Give a new session what a shared store kept of it (:func:`record` made ``record``)."""
    session.token = record.token
    session.seq = record.seq
    session.count = record.count
    session.limit_reached = record.limit_reached
    session.tokens_in = record.tokens_in
    session.tokens_out = record.tokens_out
    session.states = {name: dict(state) for name, state in record.states.items()}
    session.history.entries = list(record.history)
    session.history.size = record.history_size
    if record.busy:
        # Its process stopped answering (it died, or let the session go mid-reply): the replies
        # it left end now, with producer_lost, and a reply's end is activity, as on one process
        # (last_activity is now, as for a new session). Its last save was the message's arrival.
        return
    if record.last_active is not None:
        # session_timeout counts on across processes: a resume is not activity (PROTOCOL.md §7).
        idle = max(0.0, time.time() - record.last_active)
        session.last_activity = session.clock() - idle


def record(session: ChatSession, *, history: bool = True) -> SessionRecord:
    """What a shared store keeps of ``session``; without ``history``, an empty one (a store saving
    the entries apart, from ``session.history.entries``, need not copy them all after every exchange).
    """
    return SessionRecord(
        id=session.id,
        label=session.sessions.label,
        token=session.token,
        seq=session.seq,
        count=session.count,
        limit_reached=session.limit_reached,
        tokens_in=session.tokens_in,
        tokens_out=session.tokens_out,
        states=session.states,
        history=tuple(session.history.entries) if history else (),
        history_size=session.history.size,
        busy=session.busy,
        pending=tuple(
            (message.id, message.number, message.frame.agent)
            for message in ([session.current] if session.current is not None else []) + session.queue
        ),
        ended=frozenset(session.current.ended) if session.current is not None else frozenset(),
        last_active=time.time() - (session.clock() - session.last_activity),
    )
