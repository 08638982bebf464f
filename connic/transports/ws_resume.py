"""Resuming a session on a WebSocket connection (PROTOCOL.md §7).

This is part of :class:`~connic.transports.ws_connection.Connection`, kept in its own
module for size: :func:`resume` takes over the session a ``resume`` frame names (or
opens a fresh one when it cannot), replays what the client missed and goes live;
while a shared store waits for another process to let the session go, the socket is
still read (:func:`_reading_meanwhile`). The functions act for the connection and use
its internals as its own methods would.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any

from aiohttp import WSMsgType

from connic.errors import InvalidResume, SessionTakenOver, StoreUnavailable
from connic.frames import (
    CancelFrame,
    HistoryRequest,
    MessageFrame,
    MessageId,
    PingFrame,
    Pong,
    ResumeFrame,
    encode,
)
from connic.message import release_cancellation
from connic.session import ChatSession, SessionState
from connic.stores import Follow
from connic.transports.ws_ahead import AfterRead
from connic.transports.ws_bound import Bound
from connic.transports.ws_follow_history import FollowedHistory, consume
from connic.transports.ws_held import Ahead, Behind, Doubts, cancel_behind, held_at, hold_behind, parse_held

if TYPE_CHECKING:
    from connic.transports.ws_connection import Connection

__all__ = ["cancel_behind", "resume", "resume_instead"]  # cancel_behind: from .ws_held, for the connection

log = logging.getLogger("connic.websocket")


async def resume(conn: Connection, frame: ResumeFrame) -> bool:
    """Resume the session ``frame`` names, or start a fresh one (PROTOCOL.md §7); whether it resumed."""
    if frame.problem is not None:
        conn._error(InvalidResume(frame.problem))
        await conn._open_fresh(False)
        return False
    assert frame.session_id is not None and frame.resume_token is not None and frame.last_seq is not None
    sessions = conn.transport.sessions
    following: list[int] = []  # the seq followed to, while another process answers (PROTOCOL.md §7)
    began: asyncio.Future[None] = asyncio.get_running_loop().create_future()  # done once following
    moves: list[asyncio.Future[None]] = []  # done when the find follows further (_reading_meanwhile)
    ahead = Ahead(sessions.agent_names)  # the owner's queued messages, ahead of the held ones
    doubts = Doubts(ahead)  # cancels of held messages passed to the owner too (_reading_meanwhile)
    stalled: list[asyncio.Task[None]] = []  # while following with the outbox full: its watch

    def follow(frames: list[str] | None, last: int) -> None:
        if not following:
            _connected_following(conn, frame, last, recovered=frames is not None)
            if not began.done():
                began.set_result(None)
        doubts.seen(frames or [])
        ahead.seen(frames or [])
        conn.writer.extend(frames or [])
        if conn.writer.full and not (stalled and not stalled[0].done()):
            stalled[:] = [asyncio.create_task(_slow_consumer(conn))]
            stalled[0].add_done_callback(release_cancellation)
        following[:] = [last]
        for moved in moves:
            if not moved.done():
                moved.set_result(None)
        moves.clear()

    try:
        for _ in range(2):
            here = await sessions.store.get(frame.session_id)  # live on this process: no claim
            finding = sessions.find(frame.session_id, frame.resume_token, frame.last_seq, follow)
            # Only a shared store may wait on another process: the memory store answers at once.
            if not sessions.store.durable:
                session = await finding
            else:
                try:
                    session = await _reading_meanwhile(
                        conn, finding, frame, following, began, follow, moves, doubts, ahead
                    )
                except SessionTakenOver as exc:
                    # A newer resume (elsewhere, or on the owner itself) took the session over while
                    # this one followed its owner: as a connection taken over on one process.
                    conn.close(exc)
                    return False
            if session is not None and session is here and sessions.store.durable:
                # A resume following it on another process is taken over (its goodbye then ignored),
                # as a connection here would be: before the client hears connected, and before the
                # replay (which must not await between it and attaching).
                await sessions.store.resumed(session.id)
            last_seq = following[0] if following else frame.last_seq
            replay = await session.replay(conn, last_seq) if session is not None else None
            if replay is not None or session is None or following or session.state is not SessionState.ENDED:
                break
            # The store let the detached, idle session go (it saves it for any process) while
            # this resume awaited: its copy here is left, find it again in the store. A session
            # that ended for good is gone from the store too: the second find says so.
    finally:
        for stall in stalled:
            stall.cancel()  # no longer following: the frames from here on wait for room, as any reply's
    if following and (session is None or replay is None):
        # connected said resumed: the session is still in the store, to be resumed again.
        if not _gone(conn):
            conn.close(StoreUnavailable("the process answering this session did not let it go; resume again"))
        return False
    if session is None or replay is None:
        sessions.metrics.resumes.inc(sessions.label, "failed")
        # A wrong token counts as a failed authentication, so tokens cannot be guessed
        # faster than secrets (the session itself is never locked by it).
        conn.transport.throttle.failed(conn.peer or "unknown")
        await conn._open_fresh(False)
        return False
    recovered, frames = replay
    doubts.settle(conn, frames)  # with the owner's last frames, not followed before it let the session go
    ahead.seen(frames)  # and so does what the held messages count (Ahead.count)
    sessions.metrics.resumes.inc(sessions.label, "resumed" if recovered else "not_recovered")
    sessions.metrics.replayed_frames.inc(sessions.label, amount=len(frames))
    conn.session = session
    conn.fresh = False
    conn.writer.name = session.id
    if following and conn._inbox:
        # What the client sent while the owner's reply ran waits behind it, as on one process.
        conn._behind = Behind(session, ahead)
    if not following:
        conn._connected(session, resumed=True, recovered=recovered)
    conn.writer.extend(frames)
    session.resume(conn, last_seq + len(frames))
    # The client waits for these: out now, not after every other resume of a burst that
    # this step of the event loop handles too (a mass reconnect after a network blip).
    conn.writer.flush()
    log.info(
        "resume session=%s peer=%s connector=%s last_seq=%d replayed=%d recovered=%s",
        session.id,
        conn.peer,
        conn.transport.connector.path,
        frame.last_seq,
        len(frames),
        recovered,
    )
    return True


async def resume_instead(conn: Connection, frame: ResumeFrame) -> None:
    """A resume as the client's first frame after a handshake-authenticated ``connected``."""
    session = conn.session
    assert session is not None
    if not conn.fresh or session.seq:
        conn._error(InvalidResume("resume must be the first frame of a connection"))
        return
    conn.session = None
    session.end()  # the fresh session nobody used
    await conn._resume(frame)


async def _reading_meanwhile(
    conn: Connection,
    finding: Awaitable[ChatSession | None],
    frame: ResumeFrame,
    following: list[int],
    began: asyncio.Future[None],
    follow: Follow,
    moves: list[asyncio.Future[None]],
    doubts: Doubts,
    ahead: Ahead,
) -> ChatSession | None:
    """Await ``finding`` while still reading the socket.

    Finding a session another process answers can take as long as its reply: the
    client's pings and pongs are answered meanwhile (the heartbeat sees it alive), and
    its other frames are held in order, to be handled once the session is taken over,
    but for what the client says to the session that cannot wait (PROTOCOL.md §5, §7):

    - a ``cancel`` naming messages held here is held right behind each one with its id: each
      admitted (acked) and dropped at once (:func:`cancel_behind`), as a cancel drops every
      queued message with its id on one process; but ids need not be unique, and the owner's
      message in flight (or queued) with that id comes first (docs/protocol.md, "Cancelling"):
      the cancel is passed to the owner too, which acts on it only then (without ``not_found``
      else), and the held cancel is let go if the owner's reply with that id ended cancelled
      meanwhile (:class:`~connic.transports.ws_held.Doubts`);
    - any other ``cancel`` is passed to the process answering the session at once, even
      behind held frames (its outcome, a cancelled reply's end or ``not_found``, comes back
      in the log; a cancel no process takes waits for the next owner, which answers it);
    - a close with 1000 ends the session there, as it would here (the client said goodbye);
    - a ``history`` request with nothing held before it is answered from the store, as the
      owner would answer it (PROTOCOL.md §8), while the reply there goes on
      (:class:`~connic.transports.ws_follow_history.FollowedHistory`).

    ``began`` is done once the find follows another process (``following`` then holds
    the seq followed to): what came before it (a cancel, the socket's end) is acted on then.
    ``follow`` is the find's follow callback: which of this process's resumes says goodbye.
    A future put in ``moves`` is done when the find follows further. ``ahead`` counts the
    messages the owner queued ahead of each held message, for ``max_queued``
    (:class:`~connic.transports.ws_held.Ahead`): it is told of each held message and of each
    cancel passed to the owner.
    SessionTakenOver when a newer resume took the session over meanwhile.
    """
    assert frame.session_id is not None
    store = conn.transport.sessions.store
    held: dict[int, MessageId] = {}  # id() of each message held in the inbox that names its id: that id
    doubtful: dict[int, MessageId] = {}  # those of them with a held cancel behind (hold_behind)
    cancels: dict[int, MessageId] = {}  # id() of each other cancel held before the find followed: its id
    task = asyncio.ensure_future(finding)
    history = FollowedHistory(conn, frame.session_id, following, moves)
    bound = Bound(conn.transport.sessions.options.max_queued)  # what is held at most (ws_bound)
    owner = AfterRead(ahead, store)  # the cancels go to the owner once its record was read
    try:
        while not task.done():
            if conn._receiving is None and not _gone(conn):
                conn._receiving = asyncio.ensure_future(conn.ws.receive())
                conn._receiving.add_done_callback(consume)
            waiting: set[asyncio.Future[Any]] = {task}
            if conn._receiving is not None:
                waiting.add(conn._receiving)
            if not began.done():
                waiting.add(began)
            waiting |= history.waiting()
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            history.step()
            if cancels and following:
                # The find follows another process now: the cancels held till then go there.
                for msg in [msg for msg in conn._inbox if id(msg) in cancels]:
                    doubts.direct(owner, frame.session_id, cancels.pop(id(msg)))
                    conn._inbox.remove(msg)
            if following:
                doubts.pass_on(owner, frame.session_id)
            receiving = conn._receiving
            if receiving is not None and receiving.done():
                conn._receiving = None
                msg = receiving.result()
                conn.heartbeat.last_seen = conn._loop.time()
                parsed = parse_held(msg.data) if msg.type is WSMsgType.TEXT else None
                at = []
                if isinstance(parsed, CancelFrame):
                    at = sorted(held_at(conn, held, parsed.id) + held_at(conn, doubtful, parsed.id))
                if msg.type is WSMsgType.PING or msg.type is WSMsgType.PONG:
                    conn._control(msg.type, msg.data)
                elif isinstance(parsed, PingFrame) and following and not conn._inbox and history.asked is None:
                    # The client checks the link meanwhile; before connected (not following yet) it is
                    # held, as on one process, where a ping behind the resume frame is answered after it.
                    conn.writer.send_nowait(encode(Pong()))
                elif isinstance(parsed, CancelFrame) and (following or at):
                    if at and bound.full(conn):
                        bound.refuse(conn, f"{len(conn._inbox)} frames are held while another process answers", None)
                    elif at:
                        group = hold_behind(conn, held, doubtful, at, msg, ahead.arrived)
                        doubts.hold(group, parsed.id)
                        # Where it came: the owner acts on it too (once the find follows it).
                        ahead.passed(parsed.id, group[0].extra)
                        if following:
                            doubts.pass_on(owner, frame.session_id)
                    else:
                        # Another process answers (this one follows its frames): the cancel goes there.
                        ahead.passed(parsed.id)
                        doubts.direct(owner, frame.session_id, parsed.id)
                elif isinstance(parsed, HistoryRequest) and following and not conn._inbox and history.asked is None:
                    history.ask(msg)
                elif (kept := bound.hold(conn, msg, parsed)) is not None:
                    if type(parsed) is MessageFrame:  # admitted once taken over: behind what the owner queued now
                        ahead.held()
                    if isinstance(parsed, MessageFrame) and parsed.id is not None:
                        held[id(kept)] = parsed.id
                    elif isinstance(parsed, CancelFrame):
                        cancels[id(kept)] = parsed.id
                        ahead.passed(parsed.id)  # where it came: it goes to the owner once the find follows it
                    conn._inbox.append(kept)
            if following:
                ahead.follows(store, frame.session_id)
            if following and _gone(conn):
                if task.done() and not task.cancelled() and isinstance(task.exception(), SessionTakenOver):
                    # Taken over by a newer resume in this very step: its goodbye ends nothing.
                    return task.result()
                _leave(conn, task, frame, follow)
                return None
        history.hold()  # not answered yet: the session's new owner here answers it, in order
        if ahead.loading is not None and not ahead.loading.done():
            # The cancels waiting for the owner's record go to it before this process goes on
            # as the session's owner (AfterRead passes them as the read comes back).
            await asyncio.wait([ahead.loading])
        return task.result()
    except BaseException:
        # The resume goes no further (its handler is cancelled): a session the find took over
        # from the store, in this very step or before its own cancellation lands, is let go.
        # Left as it was rebuilt, never replayed nor attached, it would have no timer and stay
        # owned here for ever.
        task.add_done_callback(_let_go)
        raise
    finally:
        task.cancel()
        history.stop()


def _leave(conn: Connection, task: asyncio.Future[ChatSession | None], frame: ResumeFrame, follow: Follow) -> None:
    """The client is gone (its close, or the socket's end) while another process answers.

    Following that reply for nobody would hold a read of Redis, and this process's
    shutdown, until it ends. The claim checked the token (following means it did). A
    goodbye of a resume that a newer one took over meanwhile is ignored (the store checks).
    """
    assert frame.session_id is not None and frame.resume_token is not None
    last = conn._inbox[-1]
    if last.type is WSMsgType.CLOSE and last.data == 1000 and not conn.writer.closing:
        # The client said goodbye: the session ends there (or here, if taken over in this very
        # step), as on one process.
        sessions = conn.transport.sessions
        sessions.store.end(frame.session_id, sessions.label, frame.resume_token, follow)
        task.add_done_callback(_end)
    else:
        # The session stays there, detached.
        task.add_done_callback(_let_go)  # taken over in this very step: let go


async def _slow_consumer(conn: Connection) -> None:
    """Close a client that takes none of the followed frames for ``send_timeout`` as a slow consumer (4010).

    The frames of another process's reply are queued as they are followed, whether or not the
    outbox has room: that process's agent does not wait for this client. On one process the
    agent's frames wait for room, and a client that takes none for ``send_timeout`` is closed
    (PROTOCOL.md, "Errors and close codes"); here the same client is, rather than have this
    process hold the rest of the reply for it. Its socket's end stops the following: the
    session stays with the process answering it, detached and resumable.
    """
    writer = conn.writer
    if not await writer.wait_for_room(writer.send_timeout) and writer.full:
        writer.slow_consumer()


def _connected_following(conn: Connection, frame: ResumeFrame, last_seq: int, *, recovered: bool) -> None:
    # Another process still answers: resumed, following its frames until it lets the session go.
    assert frame.session_id is not None
    conn.writer.name = frame.session_id
    conn._send_connected(frame.session_id, frame.resume_token, True, recovered, last_seq)


_DATA = (WSMsgType.TEXT, WSMsgType.BINARY)  # after anything else (a close, an error) nothing more is read


def _gone(conn: Connection) -> bool:
    # Whether the socket ended while a resume waited (what _reading_meanwhile read last says so).
    return bool(conn._inbox) and conn._inbox[-1].type not in _DATA


def _let_go(task: asyncio.Future[ChatSession | None]) -> None:
    # What a find abandoned by its resume gives: a session no connection attaches to (unless
    # another resume of it is under way, whose own end settles it) goes on detached.
    if task.cancelled() or task.exception() is not None:
        return
    session = task.result()
    if session is not None and not session.resuming:
        session.resume_failed()


def _end(task: asyncio.Future[ChatSession | None]) -> None:
    # What a find abandoned by its resume's goodbye gives: a session taken over in that very
    # step ends here, as the client's close 1000 ends it (the store's end reaches the owner else).
    if task.cancelled() or task.exception() is not None:
        return
    session = task.result()
    if session is not None:
        session.end(SessionTakenOver("another connection resumed this session"))
