"""Which session an AG-UI ``threadId`` names, for one ``agui`` connector, and joining it.

A thread is a connic session: :meth:`Threads.thread` finds it (in this process, or
in a shared store, taken over from another process), or opens it under the client's
id; a session another connector opened needs its resume token. :meth:`Threads.join`
attaches the sink the thread's SSE runs share (:class:`~connic.transports.agui_sse.ThreadRuns`),
and :meth:`Threads.leave` lets it go when its last run is over.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

from aiohttp import web

from connic.errors import SessionTakenOver, StoreUnavailable
from connic.frames import MessageId
from connic.session import ChatSession, SessionState
from connic.sessions import Sessions, token_matches
from connic.stores import Follow

if TYPE_CHECKING:
    from ag_ui.core import RunAgentInput

    from connic.transports.agui import AguiTransport
    from connic.transports.agui_sse import SSERun, ThreadRuns

__all__ = ["TOKEN_HEADER", "Threads", "forwarded_token", "seed"]

TOKEN_HEADER = "X-Connic-Resume-Token"


class Threads:
    """The threads of one agui connector: finding, opening, joining and leaving their sessions."""

    def __init__(self, transport: AguiTransport) -> None:
        self.transport = transport
        # thread id -> the lock of the runs looking it up, and how many hold it or wait for it
        self._finding: dict[str, tuple[asyncio.Lock, list[int]]] = {}
        self.streaming: dict[str, ThreadRuns] = {}  # session id -> the sink its SSE runs share
        # thread id -> the lookup of the resume following another process for it here, and
        # whether a newer resume took it over
        self._followers: dict[str, tuple[asyncio.Task[object], list[bool]]] = {}

    def leave(self, session: ChatSession, runs: ThreadRuns, run_id: str, sink: SSERun) -> None:
        """A run's stream is over (done, or its client gone): the thread goes on without it."""
        runs.runs.pop(run_id, None)
        if runs.runs:
            # Other runs still stream on this thread: only this one's reply is the client's loss.
            gone = sink.close_code != 1000
            if gone and session.sessions.options.on_disconnect == "cancel" and _pending(session, run_id):
                session.cancel(run_id)
            return
        # The last run: the session stays for the thread's next run (on_disconnect says whether
        # an unfinished reply goes on meanwhile).
        if self.streaming.get(session.id) is runs:
            del self.streaming[session.id]
        session.detach(runs)

    @contextlib.asynccontextmanager
    async def _one_at_a_time(self, thread_id: str) -> AsyncIterator[None]:
        # Two runs of one thread looking it up at once take turns: both would otherwise open
        # the same new thread, or attach to it twice. The lock goes only when no run holds it
        # or waits for it: right after a release the woken waiter does not hold it yet, and a
        # new lock made then would let a third run in beside it.
        entry = self._finding.get(thread_id)
        if entry is None:
            entry = self._finding[thread_id] = (asyncio.Lock(), [0])
        lock, users = entry
        users[0] += 1
        try:
            async with lock:
                yield
        finally:
            users[0] -= 1
            if not users[0] and self._finding.get(thread_id) is entry:
                del self._finding[thread_id]

    async def join(
        self, run: RunAgentInput, given: str | None, peer: str
    ) -> tuple[ChatSession, ThreadRuns] | web.Response:
        """The thread's session, with the sink its SSE runs share attached; or the response refusing it.

        ``given`` is the resume token the client sent; ``peer`` its address, for the
        failed-authentication brake.
        """
        from connic.transports.agui_sse import ThreadRuns

        async with self._one_at_a_time(run.thread_id):
            while True:
                found = await self._thread(run.thread_id, given, peer, create=True)
                if isinstance(found, web.Response):
                    return found
                assert found is not None  # create: never None
                session, fresh = found
                if fresh or not session.limit_reached or session.busy:
                    break
                # Over max_messages, its last runs ended with no run streaming (a session stays
                # for a WebSocket resume then, to fetch them): an SSE run has no use for them, and
                # the thread starts again, as it does when they end with a run streaming.
                session.end()
            runs = self.streaming.get(session.id)
            if runs is not None and session.sink is runs:
                return session, runs  # another run of the thread streams: this one joins it
            runs = ThreadRuns()
            if fresh:
                seed(session, run)
                session.attach(runs)
            else:
                last = session.seq
                replay = await session.replay(runs, last)  # takes over a connection attached to it
                if replay is None or session.state is SessionState.ENDED:
                    return self.transport.refuse(409, f"thread {run.thread_id!r} was taken over meanwhile; run again")
                session.resume(runs, last + len(replay[1]))
            self.streaming[session.id] = runs
            return session, runs

    async def thread(
        self,
        thread_id: str,
        given: str | None,
        peer: str,
        *,
        create: bool = True,
        follow: Callable[[Sessions], Follow] | None = None,
        after: int = 0,
    ) -> tuple[ChatSession, bool] | web.Response | None:
        """The session ``thread_id`` names, and whether it is new; or the response refusing it.

        ``given`` is the resume token the client sent, which a session another connector
        opened needs; a wrong or missing one counts against ``peer`` as a failed
        authentication (PROTOCOL.md §7). With ``create`` false an unknown thread is not
        opened: None. ``follow`` (a resume of the WebSocket binding) is given the sessions
        of the thread's connector and says where the frames go that another process serving
        the thread logs meanwhile (:meth:`Sessions.find <connic.sessions.Sessions.find>`):
        the thread is read from the log after seq ``after`` (its start rebuilds the runs' events).
        """
        if follow is None:
            async with self._one_at_a_time(thread_id):
                return await self._thread(thread_id, given, peer, create=create)
        # A resume that follows another process holds the thread's turn for as long as that
        # process serves it (its runs). A newer resume of the thread takes it over at once, as the
        # Connic protocol's does (session_taken_over), rather than waiting for its turn behind it.
        task = asyncio.current_task()
        assert task is not None
        older = self._followers.get(thread_id)
        if older is not None:
            # Only a resume that may have the thread takes another over (as the Connic protocol's
            # claim checks the token first); one that may not is refused here, without waiting.
            known = await self._owner(thread_id)
            if not isinstance(known, tuple):
                return known
            refused = self._refused(thread_id, known, given, peer)
            if refused is not None:
                return refused
            older = self._followers.get(thread_id)  # another may have come meanwhile
            if older is not None:
                older[1][0] = True
                older[0].cancel()
        mine = self._followers[thread_id] = (task, [False])
        try:
            async with self._one_at_a_time(thread_id):
                return await self._thread(thread_id, given, peer, create=create, follow=follow, after=after)
        except asyncio.CancelledError:
            if not mine[1][0]:
                raise
            task.uncancel()
            raise SessionTakenOver("another connection resumed this thread") from None
        finally:
            if self._followers.get(thread_id) is mine:
                del self._followers[thread_id]

    async def _thread(
        self,
        thread_id: str,
        given: str | None,
        peer: str,
        *,
        create: bool,
        follow: Callable[[Sessions], Follow] | None = None,
        after: int = 0,
    ) -> tuple[ChatSession, bool] | web.Response | None:
        known = await self._owner(thread_id)
        if isinstance(known, web.Response):
            return known
        if known is None:
            if not create:
                return None
            try:
                return await self.transport.sessions.open(thread_id), True
            except StoreUnavailable:
                # A shared store refuses to open a thread another process opened meanwhile (two
                # first runs of it at once): it is a known thread now, continued as one.
                known = await self._owner(thread_id)
                if known is None:
                    raise
                if isinstance(known, web.Response):
                    return known
        refused = self._refused(thread_id, known, given, peer)
        if refused is not None:
            return refused
        owner, token = known
        # A run (``create``: the one lookup that may open the thread) of a thread this connector
        # opened is no resume of the stream another process serves: that process's runs stream
        # on, and this one waits for the thread to be let go (queued behind them, as on one
        # process). A session of another connector is attached there to that connector's own
        # connection, which a run takes over as on one process (closed with 4011).
        takeover = not create or owner is not self.transport.sessions
        session = None
        if token is not None:
            # What a follow gets first is the log after ``after`` (None if trimmed).
            handed = follow(owner) if follow is not None else None
            session = await owner.find(thread_id, token, after, handed, takeover=takeover)
        if session is None:
            return self.transport.refuse(
                409, f"thread {thread_id!r} cannot be continued now (ended, or served elsewhere)"
            )
        return session, False

    def _refused(
        self, thread_id: str, known: tuple[Sessions, str | None], given: str | None, peer: str
    ) -> web.Response | None:
        """The 403 for a thread of another connector without its resume token (``given``), or with a wrong one."""
        owner, token = known
        # A session another connector opened: its resume token proves the client's claim to it
        # (PROTOCOL.md §7), as a resume over that connector would, and a wrong one is a failed
        # authentication, so that tokens cannot be guessed faster than secrets.
        if owner is self.transport.sessions or (given is not None and token_matches(token, given)):
            return None
        self.transport.throttle.failed(peer)
        return self.transport.refuse(
            403,
            f"thread {thread_id!r} is a session of connector {owner.label!r}: "
            f"send its resume_token in the {TOKEN_HEADER} header",
        )

    async def _owner(self, thread_id: str) -> tuple[Sessions, str | None] | web.Response | None:
        """The sessions of the connector that opened thread ``thread_id`` and its resume token; None if unknown."""
        store = self.transport.store
        live = await store.get(thread_id)
        if live is not None:
            return live.sessions, live.token
        record = await store.load(thread_id)
        if record is None:
            return None
        owner = self._peer(record.label)
        if owner is None:
            why = f"thread {thread_id!r} is a session of connector {record.label!r}, not served here"
            return self.transport.refuse(409, why)
        return owner, record.token

    def _peer(self, label: str) -> Sessions | None:
        if label == self.transport.connector.path:
            return self.transport.sessions
        for transport in self.transport.runtime_transports:
            sessions = getattr(transport, "sessions", None)
            if isinstance(sessions, Sessions) and sessions.label == label:
                return sessions
        return None


def _pending(session: ChatSession, message_id: MessageId) -> bool:
    """Whether a message is still queued or being answered in ``session``."""
    current = session.current
    return (current is not None and current.id == message_id) or any(m.id == message_id for m in session.queue)


def seed(session: ChatSession, run: RunAgentInput) -> None:
    """Give a thread connic has just opened the history the run's earlier messages tell.

    Should anything fail on the way, the session ends: a new thread left open, never
    attached, would never expire (its timer starts at attach).
    """
    from connic.transports.agui_events import seed_of

    try:
        history = session.history
        for entry in seed_of(run, session.sessions.agent_names):
            history.add(entry)
        # Held to the bound as a thread's history is after each exchange: the body may be
        # max_body_bytes of earlier messages, and the agent must not see more than the bound.
        bound = session.sessions.options.max_history_bytes
        if history.size > bound:
            history.trim(bound, len(history))
    except BaseException:
        session.end()
        raise


def forwarded_token(run: RunAgentInput) -> str | None:
    """The resume token a client put in ``forwardedProps.connic.resume_token`` (where headers cannot go)."""
    props = run.forwarded_props
    if isinstance(props, dict):
        connic = props.get("connic")
        if isinstance(connic, dict) and isinstance(connic.get("resume_token"), str):
            token: str = connic["resume_token"]
            return token
    return None
