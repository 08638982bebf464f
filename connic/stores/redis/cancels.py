"""The ``redis`` store's cancels across processes: a ``cancel`` sent to a follower reaches the owner.

The follower adds the message id to the session's cancel list and publishes the session
id on the store's cancel channel (:func:`~connic.stores.redis.keys.cancel_channel`),
to which every process listens; the owner takes the list (the ``CANCELS`` script, only
while it owns the session) and cancels the message, or answers ``not_found``. Its lease
renewal says when a list waits (a pub/sub message lost). A cancel no owner took (the owner
let the session go, or died, before it could) waits in the list for the next owner: its
claim says so (or the channel, while it rebuilds the session), and it takes the list once
the session is live there, so that every cancel
gets its answer (PROTOCOL.md §5). A cancel of an id the follower holds a message with too
(``held``) is ``{"held": id}`` in the list: the owner acts on it only if it has a message with
that id to stop or drop (:meth:`ChatSession.cancels <connic.session.ChatSession.cancels>`), and
a next owner never (the follower settles it).
The one pub/sub listener of the store is
here too (:meth:`Cancels._listen`): it follows the channels :meth:`Cancels._channels` names
(:mod:`~connic.stores.redis.takeovers` adds its own). Its connection is checked: after
:data:`LISTEN_PING` seconds without a word from Redis it sends a PING, and a PING unanswered
within the store's ``timeout`` is a dead connection (a network that broke silently: no reset,
no end-of-file, so no error ever comes). It then subscribes again on a new one and takes at
once what was passed meanwhile (:meth:`Cancels._caught_up`), instead of leaving it to the
next lease renewal.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from connic.errors import StoreUnavailable
from connic.frames import MessageId
from connic.stores.redis.keys import cancel_channel, cancel_key
from connic.stores.redis.writeback import WriteBack

__all__ = ["CANCEL_RETRY", "CANCEL_RETRY_FOR", "LISTEN_PING", "MAX_WAITING_CANCELS", "Cancels"]

log = logging.getLogger("connic.stores.redis")

LISTEN_PING = 1.0
"""Seconds without a message on the pub/sub connection after which the listener PINGs Redis.

With the store's ``timeout`` (2 s by default) to answer, a connection that died silently is
replaced within 6 s at most (3.0 to 3.8 s measured, docs/deployment.md), well within the lease renewal
(a third of ``producer_timeout``) that would otherwise be the first to see a cancel sent
meanwhile. One PING a second per process costs Redis nothing.
"""

CANCEL_RETRY = 1.0
"""Seconds between attempts at passing the cancels waiting for a session's owner while Redis fails."""

CANCEL_RETRY_FOR = 20.0
"""Seconds the cancels waiting for a session's owner are retried while Redis fails, then dropped with a warning.

Shorter than the cancel list's own life in Redis (twice the lease, 20 s at least): a cancel
passed later could find its message long ended, or stop a later one with that id.
"""

MAX_WAITING_CANCELS = 256
"""The most cancels of one session that wait in this process to be passed to its owner.

All those waiting go in one Redis call, so they wait only while one call is under way (or,
Redis failing, while it is retried). Over this many, more are dropped with a warning: a
client flooding a follower with cancels while Redis stalls cannot grow this process's memory,
nor have its owner answer thousands at once (each `not_found` a control frame, more than two
outboxes of which close the owner's client as a slow consumer).
"""
_PING = "connic-listener"  # the PING's argument, so its answer is told from any other pong


class Cancels(WriteBack):
    """What :class:`~connic.stores.redis.RedisStore` does with cancels (a base class of it)."""

    def __init__(self) -> None:
        super().__init__()
        self._cancelling: set[asyncio.Task[None]] = set()  # cancels being passed on or taken
        self._cancels_waiting: set[str] = set()  # sessions taken over whose claim found cancels waiting
        self._follow_leases: dict[str, int] = {}  # session id: the owner's lease (ms), while a resume follows it
        # Session id: the cancels to pass to its owner after the one under way, in the order sent
        # (one task a session: two at once, on two pooled connections, could reach Redis swapped).
        self._passing: dict[str, list[str]] = {}
        self._dropping: set[str] = set()  # sessions whose cancels over MAX_WAITING_CANCELS are dropped (warned)
        # Taken lists are acted on in the order Redis gave them out: two takes at once (two
        # publishes, a renewal) could otherwise come back swapped, and a cancel sent after
        # another act first (m1's stop beginning the queued m2 that the earlier cancel dropped).
        self._taking = asyncio.Lock()
        # Sessions whose take (not a claim's) waits for that lock: it takes what is listed when it
        # runs, so one more is not queued (a take hanging, publishes and renewals would pile up).
        self._to_take: set[str] = set()

    def _forget(self, session_id: str) -> int | None:
        """As :meth:`Writer._forget`; the cancels its claim found waiting are left to the next owner."""
        self._cancels_waiting.discard(session_id)
        return super()._forget(session_id)

    def cancel(self, session_id: str, message_id: MessageId, *, held: bool = False) -> None:
        """Pass a ``cancel`` to the session's owner: a flag it checks, and a message that wakes it at once.

        The session's cancels reach its list in the order they were passed (one after another).
        """
        data = json.dumps({"held": message_id} if held else message_id)
        waiting = self._passing.get(session_id)
        if waiting is not None:
            if len(waiting) >= MAX_WAITING_CANCELS:
                if session_id not in self._dropping:  # said once per flood
                    self._dropping.add(session_id)
                    log.warning(
                        "session %s: %d cancels wait to be passed to its owner already: more are dropped",
                        session_id,
                        MAX_WAITING_CANCELS,
                    )
                return
            waiting.append(data)
            return
        self._passing[session_id] = [data]
        self._spawn(self._send_cancels(session_id))

    async def _send_cancels(self, session_id: str) -> None:
        # Every cancel waiting goes in one call: one at a time, a flood sent while Redis stalled
        # waited here and was passed one per `timeout` (each with a warning), then one round trip each.
        waiting = self._passing[session_id]
        loop = asyncio.get_running_loop()
        failing_since: float | None = None
        try:
            while waiting:
                batch = waiting[:]
                try:
                    await self._send_batch(session_id, batch)
                except StoreUnavailable as exc:
                    now = loop.time()
                    if failing_since is None:
                        failing_since = now
                        log.warning(
                            "session %s: passing %d cancel(s) to its owner failed: %s; retrying for %g s",
                            session_id,
                            len(waiting),
                            exc.why,
                            CANCEL_RETRY_FOR,
                        )
                    if now - failing_since >= CANCEL_RETRY_FOR:
                        log.warning(
                            "session %s: %d cancel(s) not passed to its owner: given up", session_id, len(waiting)
                        )
                        return
                    await asyncio.sleep(CANCEL_RETRY)
                    continue
                del waiting[: len(batch)]
                failing_since = None
        finally:
            del self._passing[session_id]
            self._dropping.discard(session_id)

    async def _send_batch(self, session_id: str, batch: list[str]) -> None:
        try:
            await self._pass_cancel(session_id, "RPUSH", *batch)
        except StoreUnavailable as exc:
            if "WRONGTYPE" not in exc.detail:  # redis-py puts the command before the error
                raise
            # A set of cancels an earlier version passed still waits (a rolling upgrade from
            # it): added to it, which the owner's CANCELS script takes as well, in no order.
            # A set holds a member once, and a cancel of the id may be there already: this
            # one is added apart, its JSON padded with spaces (it reads the same), or it
            # would never be answered.
            for data in batch:
                while not await self._pass_cancel(session_id, "SADD", data):
                    data = " " + data

    async def _pass_cancel(self, session_id: str, add: str, *data: str) -> bool:
        """Add ``data`` to the cancel key with ``add`` (RPUSH, SADD) and wake the owner; whether any was added."""
        prefix = self.options.key_prefix
        key = cancel_key(prefix, session_id)
        pipe = self._client().pipeline(transaction=False)
        pipe.execute_command(add, key, *data)
        # Only for a while: a cancel the owner never took must not cancel a later message with that id.
        # Long enough for the claim that follows a dead owner's last lease to find it.
        lease = self._follow_leases.get(session_id) or max((lease for _, lease in self._fences.values()), default=0)
        pipe.pexpire(key, 2 * max(lease, 10_000))
        pipe.publish(cancel_channel(prefix), session_id)
        added, *_ = await self._call(pipe.execute())
        return bool(added)

    def _channels(self) -> dict[str, Callable[[str], None]]:
        """The pub/sub channels :meth:`_listen` follows: what to do with a session id published on each."""
        return {cancel_channel(self.options.key_prefix): self._cancelled}

    def _cancelled(self, session_id: str) -> None:
        """A process passed a cancel to this session: take its cancels if it is live here.

        A session this process claimed but has not rebuilt yet (owned, not live) takes them
        once it is live (:meth:`_take_waiting_cancels`, from ``add``), as those its claim found:
        skipped, they waited for the next lease renewal (a third of ``producer_timeout``).
        """
        if session_id in self._live:
            self._spawn(self._take_cancels([session_id]))
        elif session_id in self._fences:
            self._cancels_waiting.add(session_id)

    async def _listen(self) -> None:
        """Act on what other processes publish for the sessions live here (:meth:`_channels`) as soon as they say so."""
        import redis.exceptions

        channels = self._channels()
        loop = asyncio.get_running_loop()
        while True:
            pubsub = self._blocking.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(*channels)
                # Subscribed again after a loss: what was published meanwhile reached nobody.
                self._spawn(self._caught_up())
                heard, pinged = loop.time(), 0.0
                while True:
                    message = await pubsub.get_message(timeout=LISTEN_PING)
                    now = loop.time()
                    if message is not None:
                        heard, pinged = now, 0.0
                        if message["channel"] in channels:
                            channels[message["channel"]](message["data"])
                    elif pinged and now - pinged > self.options.timeout:
                        raise redis.exceptions.TimeoutError(f"no answer to a PING within {self.options.timeout:g} s")
                    elif not pinged and now - heard >= LISTEN_PING:
                        # Written into the socket's buffer: on a dead connection this succeeds too,
                        # and only the missing answer tells.
                        await pubsub.ping(_PING)
                        pinged = now
            except (redis.exceptions.RedisError, OSError) as exc:
                # Redis went away: the renewer still takes the flags; listen again once it is back.
                log.debug("redis store: pub/sub channels lost (%s)", exc)
                await asyncio.sleep(1.0)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()

    async def _caught_up(self) -> None:
        """The listener (re)subscribed: take the cancels passed to the sessions live here while it was not listening."""
        live = [sid for sid in self._live if sid in self._fences]
        if live:
            await self._take_cancels(live)

    async def _take_cancels(self, session_ids: list[str], *, claimed: bool = False) -> None:
        """Take the cancels waiting for these sessions (those this process owns) and cancel their messages here.

        ``claimed``: this process just took the sessions over; a ``held`` cancel left for their
        previous owner is the follower's to settle (it drops its held message), never acted on here.
        """
        if not claimed:
            session_ids = [sid for sid in session_ids if sid not in self._to_take]
            if not session_ids:
                return
            self._to_take.update(session_ids)
        entered = False
        try:
            async with self._taking:
                entered = True
                # From here what is listed meanwhile may be too late for this take: another one is due.
                self._to_take.difference_update(session_ids if not claimed else ())
                await self._take_now(session_ids, claimed)
        finally:
            if not entered and not claimed:  # cancelled while waiting (a shutdown)
                self._to_take.difference_update(session_ids)

    def _cancels_listed(self, session_ids: list[str]) -> None:
        """A lease renewal said cancels wait for these sessions: take them in the background."""
        self._spawn(self._take_cancels(session_ids))

    async def _take_now(self, session_ids: list[str], claimed: bool) -> None:
        prefix = self.options.key_prefix
        owned = [(sid, self._fences[sid][0]) for sid in session_ids if sid in self._fences]
        if not owned:
            return
        try:

            def build(pipe: Any) -> None:
                for sid, fence in owned:
                    keys = [cancel_key(prefix, sid), self._keys(sid)[0]]
                    self._queue(pipe, "CANCELS", keys, [fence])

            results = await self._pipeline(build)
        except StoreUnavailable as exc:
            log.warning("redis store: taking cancels failed: %s", exc.why)
            return
        for (sid, _), ids in zip(owned, results, strict=True):
            if isinstance(ids, Exception):
                continue
            session = self._live.get(sid)
            cancels = [json.loads(data) for data in ids]
            if session is None or sid not in self._fences:
                # Let go while the ids were on their way here: the next owner takes them (not a held
                # one's: this process had nothing to stop, its follower drops its held message).
                for message_id in cancels:
                    if not isinstance(message_id, dict):
                        self.cancel(sid, message_id)
                continue
            for message_id in cancels:
                if not isinstance(message_id, dict):
                    session.cancel(message_id)
                elif not claimed and session.cancels(message_id["held"]):
                    session.cancel(message_id["held"])

    def _take_waiting_cancels(self, session_id: str) -> None:
        """The session, just taken over and live here, had cancels waiting when it was claimed: take them."""
        if session_id in self._cancels_waiting:
            self._cancels_waiting.discard(session_id)
            self._spawn(self._take_cancels([session_id], claimed=True))

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._cancelling.add(task)
        task.add_done_callback(self._cancelling.discard)
