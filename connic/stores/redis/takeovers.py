"""The ``redis`` store's takeovers across processes: a resume elsewhere closes the owner's connection (4011).

PROTOCOL.md §7: resuming a session that still has a connection moves it to the new
connection, and the old one gets ``session_taken_over`` (4011), across processes too.
When a resume's claim (the ``CLAIM`` script, after it checked the resume token) finds
another process owning the session, and did not tell that owner yet (a resume tells the
first owner it finds, and one that took the session meanwhile), it sets the session's takeover
flag (:func:`~connic.stores.redis.keys.takeover_key`, for a lease, naming the owner's fence) and publishes the
session id on the store's takeover channel
(:func:`~connic.stores.redis.keys.takeover_channel`), to which every process listens.
The owner takes the flag and ends the session's connection (:meth:`ChatSession.taken_over
<connic.session.ChatSession.taken_over>`): the session, detached, is let go once it is
idle, and the resume, following its frames meanwhile, takes it. The owner also takes the
flag of each session it holds when it renews their leases (``RENEW``), in case the
pub/sub message was lost.

A client whose resume follows the owner's reply may say goodbye (close 1000) before the
owner lets the session go: PROTOCOL.md §7 ends the session then, as on one process. The
follower (only once its claim checked the resume token, and checking it again) sets the
session's end flag (:func:`~connic.stores.redis.keys.end_key`, for as long as the
record lives) and publishes the session id on the end channel
(:func:`~connic.stores.redis.keys.end_channel`): the owner, told so or finding the
flag when it renews the lease, ends the session as its own client's 1000 close would
(:meth:`ChatSession.end <connic.session.ChatSession.end>`: the reply stops, the session is
deleted, its flag with it). If the owner died, or let the session go instead of ending it
(a resume here that was rebuilding it failed), the next claim finds the flag and ends the
session instead of taking it (the ``CLAIM`` script); one no process owns is ended at once
(``END``).

A resume is taken over by a newer one even while it only follows the owner's reply (it
owns nothing to be told through the owner): each resume that follows claims with a nonce
of its own, which its first claim makes the session's *resumer*
(:func:`~connic.stores.redis.keys.resumer_key`), and a resume on the owning process
itself clears (:meth:`Takeovers.resumed`). Either publishes the session id on the takeover
channel when it replaced another resumer: a follower here claims again at once (and at
least every few tenths of a second between its reads, in case the message was lost), finds
its nonce no longer the resumer (the ``CLAIM`` script's ``-3``) and ends its connection with
``session_taken_over`` (4011), as on one process. Its goodbye meanwhile is ignored: ``END``
checks the nonce too.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from connic.errors import SessionTakenOver, StoreUnavailable
from connic.stores import Follow
from connic.stores.redis.cancels import CANCEL_RETRY, CANCEL_RETRY_FOR, Cancels
from connic.stores.redis.keys import (
    end_channel,
    every_key,
    resumer_key,
    session_keys,
    takeover_channel,
    takeover_key,
    token_digest,
)

if TYPE_CHECKING:
    from connic.stores.redis.follower import Follower

__all__ = ["Takeovers"]

log = logging.getLogger("connic.stores.redis")

_AGAIN = 0.02  # seconds before looking again for the connection of a session a resume here is attaching
_TRIES = 150  # for at most 3 s: a resume reads the log and rebuilds the session within the store's timeout


class Takeovers(Cancels):
    """What :class:`~connic.stores.redis.RedisStore` does with takeovers across processes (a base class of it)."""

    _follower: Follower  # the reader of the logs followed here (set by Taking)

    def __init__(self) -> None:
        super().__init__()
        # The nonce of each resume following a session from here (by its follow callback): its goodbye's.
        self._resumers: dict[Follow, str] = {}

    def _channels(self) -> dict[str, Callable[[str], None]]:
        """The cancel channel, the takeover channel and the end channel."""
        prefix = self.options.key_prefix
        return {
            **super()._channels(),
            takeover_channel(prefix): self._told,
            end_channel(prefix): self._told_end,
        }

    async def _caught_up(self) -> None:
        """As :meth:`Cancels._caught_up`, and the takeover flags set for the sessions owned here meanwhile.

        A Redis that accepts ``SUBSCRIBE`` but refuses ``GETDEL`` (``-LOADING`` while it loads its
        data after a restart, ``-READONLY`` on a replica) refuses every one: one warning for
        them all, not one per owned session. Not retried here: the flags stay, and the next
        lease renewal (``RENEW``, every third of the lease) takes each of them.
        """
        await super()._caught_up()
        owned = list(self._fences)
        # One round trip: _shared sends the calls of one round of the event loop together.
        taken = await asyncio.gather(*(self._takeover_flag(sid) for sid in owned), return_exceptions=True)
        failed = [exc for exc in taken if isinstance(exc, StoreUnavailable)]
        if failed:
            log.warning(
                "redis store: taking the takeover flags of %d of %d session(s) owned here failed: %s"
                " (the lease renewals take them)",
                len(failed),
                len(owned),
                failed[0].why,
            )
        for exc in taken:
            if isinstance(exc, BaseException) and not isinstance(exc, StoreUnavailable):
                raise exc

    def _told(self, session_id: str) -> None:
        """A resume elsewhere took this session over: take its flag if this process owns it.

        Owned, not only live: a resume here may have just claimed it, not rebuilt it yet.
        A resume here that follows it claims again at once: it may be the one taken over.
        """
        if session_id in self._fences:
            self._spawn(self._take_takeover(session_id))
        self._follower.tell(session_keys(self.options.key_prefix, session_id)[3])

    async def resumed(self, session_id: str) -> None:
        """A resume here attached a connection to the session live here: a resume following it elsewhere is taken over.

        One round trip per such resume (``RESUMED``), awaited before the client hears
        ``connected``: the follower's goodbye after it is ignored. Redis failing is only
        logged: the session is live here, the resume goes on.
        """
        prefix = self.options.key_prefix
        args = [takeover_channel(prefix), session_id]
        try:
            await self._call(self._shared_script("RESUMED", [resumer_key(prefix, session_id)], args))
        except StoreUnavailable as exc:
            log.warning("session %s: telling resumes following it elsewhere failed: %s", session_id, exc.why)

    async def _take_takeover(self, session_id: str) -> None:
        """A resume elsewhere took this session over (its pub/sub message): take its flag, and act if it was set for it.

        Taking the flag (``GETDEL``) makes one of this message and the next renewal act on it,
        never both. The flag names the fence of the owner it was set for: one set for an
        earlier owner (a process that died before taking it; this one took the session over
        since) is no takeover of this process's connection.
        """
        try:
            await self._takeover_flag(session_id)
        except StoreUnavailable as exc:
            log.warning("session %s: taking its takeover flag failed: %s", session_id, exc.why)
            # the flag stays: the renewer takes it

    async def _takeover_flag(self, session_id: str) -> None:
        """:meth:`_take_takeover` without the warning: StoreUnavailable when Redis refuses (the flag stays)."""
        flag = await self._shared("GETDEL", takeover_key(self.options.key_prefix, session_id))
        owned = self._fences.get(session_id)
        if flag is not None and owned is not None and flag == str(owned[0]):
            self._taken_over(session_id)

    def _taken_over(self, session_id: str, tries: int = _TRIES) -> None:
        """A resume on another process took the session over: its connection here ends with 4011.

        A session that a resume here took a moment ago (the other resume found this process
        owning it) is not attached yet: the connection about to attach is the one taken over,
        so this looks again soon, for a while (a resume that fails lets the session go).
        """
        session = self._live.get(session_id)
        if session is not None and session.sink is not None:
            log.info("session %s: resumed on another process: its connection here is taken over", session_id)
            session.taken_over()
        elif session_id in self._fences and (session is None or session.resuming) and tries > 0:
            asyncio.get_running_loop().call_later(_AGAIN, self._taken_over, session_id, tries - 1)

    def end(self, session_id: str, label: str, token: str, follow: Follow | None = None) -> None:
        """A client following the session from here said goodbye (close 1000): its owner ends it, in the background.

        Unless a newer resume took it over meanwhile (``follow``'s nonce is no longer the session's resumer).
        """
        nonce = self._resumers.get(follow, "") if follow is not None else ""
        self._spawn(self._send_end(session_id, label, token, nonce))

    async def _send_end(self, session_id: str, label: str, token: str, nonce: str) -> None:
        """Run the END script, tried again while Redis fails (as cancels are, :data:`CANCEL_RETRY_FOR` at most).

        Dropped at the first failure, a goodbye sent while Redis stalled left the session
        resumable for its whole TTL instead of ending it. Tried again later it is still the
        goodbye of the resume that follows: END refuses it once a newer resume took it over.
        """
        prefix = self.options.key_prefix
        keys = every_key(prefix, session_id)
        args = [label, token_digest(token), end_channel(prefix), session_id, nonce]
        loop = asyncio.get_running_loop()
        failing_since: float | None = None
        while True:
            try:
                done = await self._call(self._shared_script("END", keys, args))
                break
            except StoreUnavailable as exc:
                now = loop.time()
                if failing_since is None:
                    failing_since = now
                    log.warning(
                        "session %s: passing the client's goodbye to its owner failed: %s; retrying for %g s",
                        session_id,
                        exc.why,
                        CANCEL_RETRY_FOR,
                    )
                if now - failing_since >= CANCEL_RETRY_FOR:
                    # The session stays resumable (detached), as it was before the goodbye.
                    log.warning("session %s: the client's goodbye not passed to its owner: given up", session_id)
                    return
                await asyncio.sleep(CANCEL_RETRY)
        if done == 2:
            log.info("session %s: its client said goodbye while no process owned it: ended", session_id)
        elif done == 0 and nonce:
            log.info("session %s: a goodbye from a resume a newer one took over: ignored", session_id)

    def _told_end(self, session_id: str) -> None:
        """A client following this session elsewhere said goodbye (its pub/sub message): end it if this process owns it.

        The flag is not taken here: it stays until the session's end deletes it with the
        session, so that a copy this process lets go instead still ends at the next claim.
        """
        if session_id in self._fences:
            self._ended_elsewhere(session_id)

    def _ended_elsewhere(self, session_id: str, tries: int = _TRIES) -> None:
        """The client following the session on another process said goodbye: it ends here, for good.

        As its own client's close 1000 would end it (PROTOCOL.md §7): its reply stops, its
        queue is dropped, it is deleted from the store. A connection still attached (not yet
        taken over) closes with 4011, as the resume took it over. A session that a resume
        here claimed a moment ago and is still rebuilding is looked for again soon.
        """
        session = self._live.get(session_id)
        if session is not None:
            log.info("session %s: its client said goodbye on another process: ended", session_id)
            session.end(SessionTakenOver("another connection resumed this session"))
        elif session_id in self._fences and tries > 0:
            asyncio.get_running_loop().call_later(_AGAIN, self._ended_elsewhere, session_id, tries - 1)
