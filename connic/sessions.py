"""What the sessions of one connector share, and the contract between a session and its transport.

:class:`Sessions` holds a connector's agents (their chains), options, metrics
and the store, and makes, finds and drains its sessions (:mod:`connic.session`).
A transport attaches a :class:`Sink` to a session to receive its frames; the
session reads its limits from the connector's options through
:class:`SessionOptions`.
"""

from __future__ import annotations

import asyncio
import hmac
import time
import uuid
from collections.abc import Mapping
from typing import Protocol

from connic.errors import ConnicError, StoreUnavailable
from connic.metrics import Metrics
from connic.pipeline import TurnChain
from connic.session import ChatSession, SessionState
from connic.stores import Follow, SessionStore

__all__ = ["RateLimitOptions", "SessionOptions", "Sessions", "Sink", "token_matches"]


class Sink(Protocol):
    """What a transport attaches to a session: where its frames go."""

    def send_nowait(self, data: str) -> None:
        """Queue an encoded frame without waiting (acks and refusals)."""

    def offer(self, data: str) -> bool:
        """Queue an encoded frame of a reply if there is room now; False when :meth:`send` must wait."""

    async def send(self, data: str) -> None:
        """Queue an encoded frame of a reply, waiting for room while the client is behind."""

    def end(self, error: ConnicError, notify: bool) -> None:
        """The session ended for good: close with ``error``'s close code (after an error frame if ``notify``)."""


class RateLimitOptions(Protocol):
    """The shape of a connector's ``rate_limit``."""

    @property
    def messages(self) -> int: ...
    @property
    def per(self) -> float: ...


class SessionOptions(Protocol):
    """The connector options the session core reads (docs/configuration.md)."""

    @property
    def streaming(self) -> bool: ...
    @property
    def max_messages(self) -> int: ...
    @property
    def max_queued(self) -> int: ...
    @property
    def session_timeout(self) -> float: ...
    @property
    def rate_limit(self) -> RateLimitOptions | None: ...
    @property
    def resume_window(self) -> float: ...
    @property
    def replay_buffer(self) -> int: ...
    @property
    def on_disconnect(self) -> str: ...
    @property
    def max_history_bytes(self) -> int: ...
    @property
    def producer_timeout(self) -> float: ...


class Sessions:
    """The sessions of one connector: what they share, and making, resuming and draining them."""

    def __init__(
        self,
        *,
        label: str,
        chains: Mapping[str, TurnChain],
        options: SessionOptions,
        metrics: Metrics,
        store: SessionStore,
    ) -> None:
        self.label = label  # the connector's path, the metrics' label and the logs' name for it
        self.key = (label,)  # the metrics' label values, shared by every session
        self.chains = dict(chains)
        self.agent_names = tuple(chains)
        self.options = options
        self.metrics = metrics
        self.store = store
        self.draining = False
        self.live: set[ChatSession] = set()  # this process's sessions, attached or detached

    async def open(self, session_id: str | None = None) -> ChatSession:
        """A new session, kept in the store; its id is ``session_id`` when the client names it (AG-UI's threadId)."""
        session = ChatSession(self, session_id if session_id is not None else str(uuid.uuid4()))
        started = time.perf_counter()
        try:
            await self.store.add(session)
        finally:  # a call that failed (a store timing out) is counted too, at the time it took
            self.metrics.store_seconds.observe(time.perf_counter() - started, "add")
        self.live.add(session)
        self.metrics.sessions.inc(self.label)
        self.metrics.sessions_open.inc(self.label)
        return session

    async def find(
        self, session_id: str, token: str, last_seq: int, follow: Follow | None = None, *, takeover: bool = True
    ) -> ChatSession | None:
        """The session a resume names, if it can be resumed with this token from ``last_seq``.

        When another process serves it, it is taken over once that process lets it go;
        meanwhile ``follow`` gets the frames that process logs (:meth:`SessionStore.take`).
        With ``takeover`` that process is told its connection is taken over, so that it lets
        the session go at once; an AG-UI run passes False: it is no resume of that process's
        stream, and waits for it to let the session go (its runs over) as a second run of the
        thread on one process waits behind the first.
        """
        started = time.perf_counter()
        try:
            session = await self.store.get(session_id)
        finally:
            self.metrics.store_seconds.observe(time.perf_counter() - started, "get")
        if session is None:
            session = await self._take(session_id, token, last_seq, follow, takeover)  # may wait for another process
        if (
            session is None
            or session.sessions is not self
            or session.state is SessionState.ENDED
            or not token_matches(session.token, token)
            or last_seq > session.seq
        ):
            return None
        return session

    async def _take(
        self, session_id: str, token: str, last_seq: int, follow: Follow | None, takeover: bool
    ) -> ChatSession | None:
        """A session a shared store keeps but no connection of this process serves: take it over and rebuild it."""
        if not self.store.durable:
            return None  # a store of this process's live sessions only: nothing to take over
        # Its owner may still be answering: wait for it to let go (never two copies at once).
        wait = self.options.producer_timeout
        record = await self.store.take(
            session_id, wait, follow, last_seq, label=self.label, token=token, takeover=takeover
        )
        if record is None:
            return None
        # This process owns the session now: if it cannot be rebuilt, the store must let it
        # go, or its lease is renewed for ever with no session here and no other process can
        # ever take it.
        try:
            session = ChatSession.restore(self, record)
            await self.store.add(session)
        except asyncio.CancelledError:
            self.store.abandon(session_id, "cancelled")
            raise
        except StoreUnavailable as exc:
            self.store.abandon(session_id, exc.why)
            raise
        except Exception as exc:  # a record the store read but that does not fit a session (not connic's own data)
            self.store.abandon(session_id, f"its record cannot be rebuilt: {exc!r}")
            raise StoreUnavailable("this session's record in the store cannot be read") from exc
        self.live.add(session)
        self.metrics.sessions_open.inc(self.label)
        if not record.busy and session.clock() - session.last_activity >= self.options.session_timeout:
            session.end()  # it expired while no process held it: gone for good, as on any process
            return None
        if last_seq > session.seq:
            # The client saw frames its last process numbered but never got into the store: that
            # process died between sending them and its next write. The session goes on, numbered
            # from the client's (a seq used twice would be dropped by the client as a duplicate).
            session.number_from(last_seq)
        # Replies the dead owner left unfinished: every agent answering the message (the one it
        # named, or each of the connector's) but those that ended theirs, whether it had sent
        # something or not.
        lost = [
            (mid, agent)
            for mid, ended, named in record.lost
            for agent in ((named,) if named is not None else self.agent_names)
            if agent not in ended
        ]
        if lost:
            session.producer_lost(lost)
        return session

    async def shutdown(self, grace: float) -> None:
        """Drain every session (queued messages refused, in-flight replies given ``grace`` seconds), then end them.

        Sessions end with this process, unless the store outlives it (``durable``).
        """
        self.draining = True
        await asyncio.gather(*(s.drain(grace) for s in list(self.live)), return_exceptions=True)
        for session in list(self.live):
            if self.store.durable:
                session.leave()  # a shared store keeps it: it resumes on another (or the next) process
            else:
                session.end()


def token_matches(expected: str | None, token: str) -> bool:
    """Whether a client's resume ``token`` is the session's (``expected``), compared in constant time.

    Any string is compared, even one that is not valid Unicode (a lone surrogate): it simply does
    not match. A session without a token (``None``) matches nothing.
    """
    return expected is not None and hmac.compare_digest(expected.encode(), token.encode("utf-8", "surrogatepass"))
