"""Session stores: where sessions and their replay logs live between connections.

A store plugin (entry point group ``connic.stores``, chosen by ``[store] use``)
keeps the sessions of every connector of one application, so that a client
whose connection dropped can resume its session (PROTOCOL.md §7). The interface
is asynchronous where a store in another process must go over the network
(finding a session) and synchronous where a remote store would batch the work
in the background (appending a frame, forgetting a session), so that streaming
a reply never waits for a round trip per chunk.

The built-in ``memory`` store (:mod:`connic.stores.memory`) keeps everything in
the process: sessions outlive their connections, not the process. A store shared
between processes (:mod:`connic.stores.redis`) also keeps each session's
:class:`SessionRecord`, from which another process rebuilds the session
(:meth:`SessionStore.load`, :meth:`SessionStore.take`).
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import attrs

from connic.agent import HistoryEntry
from connic.flow import TokenBucket
from connic.frames import MessageId

if TYPE_CHECKING:
    from connic.session import ChatSession

__all__ = ["Follow", "LocalRateBucket", "RateBucket", "ReplayLog", "SessionRecord", "SessionStore"]

Follow = Callable[[list[str] | None, int], None]
"""Where :meth:`SessionStore.take` hands the frames another process logs while it waits.

Called first with the logged frames after the resume's ``last_seq`` (None when one of
them was evicted) and the newest seq, then with each batch of new frames and the seq of
its last one.
"""


@attrs.frozen
class SessionRecord:
    """What a shared store keeps of a session, enough for any process to rebuild it."""

    id: str
    label: str  # the connector's path
    token: str | None
    seq: int
    count: int
    limit_reached: bool
    tokens_in: int
    tokens_out: int
    states: Mapping[str, dict[str, Any]]
    history: Sequence[HistoryEntry]
    history_size: int
    busy: bool = False  # a message was queued or being answered when the record was written
    last_active: float | None = None
    """When a message last came in or was answered (Unix time: any process reads it); None if unknown."""
    pending: Sequence[tuple[MessageId, int, str | None]] | None = None
    """The messages accepted and not yet answered when the record was written, in order (the one being
    answered first): (message id, message number, the one agent it named or None). None: not known (a
    record of a store that does not keep it)."""
    ended: frozenset[str] = frozenset()
    """The agents whose reply to the first of :attr:`pending` had ended (its end frame numbered ``seq`` or
    before) when the record was written: the message may still be listed, its answer winding down."""
    lost: Sequence[tuple[MessageId, frozenset[str], str | None]] = ()
    """The messages a process that died left unfinished, set by :meth:`SessionStore.take`: (message id, the agents
    whose reply to it ended, the one agent the message named or None). Every other agent that answers the message
    (the one it named, or each of the connector's) lost its reply."""


class ReplayLog(abc.ABC):
    """A session's sequenced frames, the newest ``capacity`` of them (PROTOCOL.md §7)."""

    @abc.abstractmethod
    def append(self, seq: int, data: str) -> None:
        """Log the encoded frame numbered ``seq``; evict the oldest past capacity.

        ``seq`` is one more than the last, except for a log's first frame: a session taken
        over from a process that died ahead of the store numbers on from its client's
        ``last_seq`` (:meth:`~connic.session.ChatSession.number_from`), and :meth:`since`
        then finds the numbers it skipped missing, as if evicted.
        """

    @abc.abstractmethod
    async def since(self, seq: int) -> list[str] | None:
        """Every logged frame numbered above ``seq``, oldest first; None if one of them was evicted."""

    @abc.abstractmethod
    def stats(self) -> tuple[int, int]:
        """How many frames the log holds, and their encoded size in bytes."""


class RateBucket(Protocol):
    """A session's ``rate_limit``: a token bucket, kept where the store keeps the session."""

    async def acquire(self) -> float:
        """Take a token: 0.0 when the message may go on, else the seconds until a token is available.

        Raises :class:`~connic.errors.StoreUnavailable` when the store cannot say.
        """
        ...


class LocalRateBucket(TokenBucket):
    """The bucket of a session kept in this process only: :class:`~connic.flow.TokenBucket`, never waiting."""

    __slots__ = ()

    async def acquire(self) -> float:
        """Take a token (:meth:`TokenBucket.take`)."""
        return self.take()


class SessionStore:
    """Base class of session store plugins (entry point group ``connic.stores``).

    Subclasses implement every method below but :meth:`start` and :meth:`close`.
    Like agents, a store may declare an attrs ``Options`` class, structured
    from the ``[store]`` table (less its ``use`` key) into ``self.options``.
    """

    Options: ClassVar[type[Any] | None] = None
    durable: ClassVar[bool] = False
    """Whether sessions outlive the server process (then it lets them go when it stops rather than end them)."""

    def __init__(self, options: Any = None) -> None:
        self.options = options

    async def start(self) -> None:
        """Connect to the backing service when the server starts."""

    async def close(self) -> None:
        """Release what :meth:`start` acquired when the server stops."""

    async def available(self) -> bool:
        """Whether the store can be reached now: checked before each WebSocket handshake (HTTP 503 if not).

        Must be cheap: a remote store answers from what its last calls saw, and checks
        again (bounded) only while it believes it is down. The default is always True.
        """
        return True

    async def add(self, session: ChatSession) -> None:
        """Keep a new session."""
        raise NotImplementedError

    async def get(self, session_id: str) -> ChatSession | None:
        """The live session with this id, or None if it is unknown or has ended."""
        raise NotImplementedError

    def discard(self, session_id: str) -> None:
        """Forget a session that has ended for good (a no-op if it is unknown)."""
        raise NotImplementedError

    def save(self, session: ChatSession) -> None:
        """The session changed (an exchange ended, it detached, its last reply ended): keep it.

        Called by the session core; a shared store writes the record in the background.
        The in-process default keeps nothing more than the live session.
        """

    def release(self, session: ChatSession) -> None:
        """This process let ``session`` go (:meth:`ChatSession.leave`): keep it for another process.

        Only a store that outlives the process keeps it; the default forgets it.
        """
        self.discard(session.id)

    async def load(self, session_id: str) -> SessionRecord | None:
        """The record of a session that is not live in this process, if the store keeps one.

        Only read, to check a resume before :meth:`take` (its label and token: a store may
        leave the history out). The default (a store of live sessions only) keeps no records.
        """
        return None

    async def saved_history(self, session_id: str) -> tuple[int, int, Sequence[HistoryEntry]] | None:
        """The session's saved history: its record's ``seq``, the newest seq its log holds, and its entries.

        Read at one instant, for a resume that follows the session's owner on another process
        to answer ``history`` (PROTOCOL.md §8) while that owner still answers. None when the
        store keeps no history (the default: a store of live sessions only) or no record of it.
        """
        return None

    async def take(
        self,
        session_id: str,
        wait: float,
        follow: Follow | None = None,
        after: int = 0,
        *,
        label: str | None = None,
        token: str | None = None,
        takeover: bool = True,
    ) -> SessionRecord | None:
        """Become the one process serving the session, waiting for its owner to let go.

        Without ``follow`` the wait ends after ``wait`` seconds. With it, the frames the
        owner logs after seq ``after`` are handed to ``follow`` as they come, for as long as
        the owner lives (``wait`` is then its lease: how long a dead owner goes unnoticed).
        With ``label`` and ``token`` (a resume), the session is taken, and its frames handed
        to ``follow``, only if its record has that connector label and resume token: else
        None, with nothing changed (the token compared so that timing does not reveal it).
        Returns the record as it is once owned (None if the session is gone, the check
        failed or the wait ran out); the caller rebuilds the session from it and hands it to
        :meth:`add`. With ``takeover`` (and ``label`` and ``token``) the owner is told that a
        resume takes its connection over, so that it lets the session go at once; without it
        (an AG-UI run, which is no resume of the owner's stream) the owner is left to finish
        what it answers and let the session go when it would.
        """
        return None

    def abandon(self, session_id: str, why: str) -> None:
        """Taking the session over failed after :meth:`take` returned its record: stop owning it at once.

        The session stays in the store as it is, for any process (this one too) to take
        again; ``why`` says what failed, for the log. Called when rebuilding the session from
        its record fails or is cancelled, before :meth:`add`. The default (a store whose
        :meth:`take` never returns a record) has nothing to let go.
        """

    def cancel(self, session_id: str, message_id: MessageId, *, held: bool = False) -> None:
        """Pass a ``cancel`` to the process answering the session (a client following it from here).

        ``held``: a message with that id is held here too, which the cancel drops unless the
        answering process has one with that id in flight or queued: that process then acts on
        it only in that case (no ``not_found``), and a process taking the session over never.
        Only a store shared between processes has anything to do: the default does nothing
        (a session is never answered by another process).
        """

    def end(self, session_id: str, label: str, token: str, follow: Follow | None = None) -> None:
        """End the session on the process answering it: the client of a resume following it from here closed with 1000.

        ``label`` and ``token`` are the resume's, checked again by the store; ``follow`` is
        the callback that resume gave :meth:`take` (which resume it is: one a newer resume
        took over meanwhile ends nothing). Only a store shared between processes has
        anything to do: the default does nothing.
        """

    async def resumed(self, session_id: str) -> None:
        """A resume attached a connection to the session live in this process (not taken from another).

        A resume of it following another process's reply (:meth:`take`'s ``follow``) is taken
        over by it. Only a store shared between processes has anything to do: the default
        does nothing.
        """

    def rate_bucket(self, session_id: str, messages: int, per: float) -> RateBucket:
        """The session's ``rate_limit`` bucket: ``messages`` tokens, refilled over ``per`` seconds.

        The default keeps it in this process; a store shared between processes keeps it
        with the session, so that a session moving to another process keeps its tokens.
        """
        return LocalRateBucket(messages, per)

    async def admit_connection(self, address: str, limit: int) -> str | None:
        """Count a connection from ``address`` against ``max_connections_per_ip`` (``limit`` > 0).

        Returns a ticket to hand to :meth:`release_connection` when the connection ends,
        or None when ``address`` has ``limit`` connections open already. Raises
        :class:`~connic.errors.StoreUnavailable` when the store cannot say. The default
        counts nothing (the process's own :class:`~connic.gate.ConnectionGate` does);
        a store shared between processes counts the connections of every process.
        """
        return ""

    def release_connection(self, ticket: str) -> None:
        """The connection :meth:`admit_connection` counted in has ended (a no-op for ``""``)."""

    def replay_log(self, session_id: str, capacity: int) -> ReplayLog:
        """A new, empty replay log for a session, keeping at most ``capacity`` frames."""
        raise NotImplementedError

    def __len__(self) -> int:
        """How many sessions the store keeps (attached or detached)."""
        raise NotImplementedError
