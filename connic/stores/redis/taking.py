"""The ``redis`` store's taking over: a process owns a session another one let go, following its reply meanwhile.

A resume that finds no live copy of its session here claims it (the ``CLAIM`` script:
the resume token checked, the owner key set with a new fencing token, the record, history
and newest logged seq read, in one round trip). While another process owns it, the claim
reads the log after the client's ``last_seq`` instead, and the resume follows that owner's
frames (:class:`~connic.stores.redis.follower.Follower`) between claims, until the owner lets
the session go or its lease runs out (it died). The first claim that finds an owner tells
it that its connection is taken over (:mod:`~connic.stores.redis.takeovers`); a claim that
finds a goodbye said while following (the end flag) ends the session instead of taking it.
A session taken over is rebuilt from what the claim read (:meth:`Taking._taken`: the replies
a dead owner left unfinished are read from its log); if that fails it is let go at once
(:meth:`Taking.abandon`).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

import attrs

from connic.errors import SessionTakenOver, StoreUnavailable
from connic.frames import MessageId
from connic.stores import Follow, SessionRecord
from connic.stores.redis.connection import ms
from connic.stores.redis.follower import Follower, Following
from connic.stores.redis.keys import every_key, takeover_channel, token_digest
from connic.stores.redis.log import frames_after, logged, may_end, seq_of, unfinished
from connic.stores.redis.record import decode, holding
from connic.stores.redis.takeovers import Takeovers
from connic.stores.redis.writeback import epoch_read

if TYPE_CHECKING:
    from connic.agent import HistoryEntry

__all__ = ["UNREADABLE", "Taking"]

log = logging.getLogger("connic.stores.redis")

_POLL = 0.05  # seconds between attempts to take a session another process still owns
_FOLLOW_WAIT = 0.2  # seconds a follower waits for frames before trying again to take the session
# An owner just told that its connection is taken over lets an idle session go within a few
# milliseconds: the follower's first reads after telling it wait this much less, so that the
# new connection's first message does not wait a whole _FOLLOW_WAIT (a claim each: bounded).
_TOLD_WAIT = 0.02
_TOLD_TRIES = 5
UNREADABLE = (ValueError, TypeError, KeyError, AttributeError)  # what a record or frame that does not decode raises


class Taking(Takeovers):
    """How :class:`~connic.stores.redis.RedisStore` takes a session over from another process (a base class of it)."""

    def __init__(self) -> None:
        super().__init__()
        self._follower = Follower(self)  # the logs of the sessions resumes here follow
        # Session id: the owner's lease (ms) as each resume here that follows it gave it. Two may
        # follow one session at once (a resume taken over by a newer one, AG-UI restarting a follow):
        # each removes only its own, and _follow_leases (the cancels' TTL) holds while any is left.
        self._follow_waits: dict[str, list[int]] = {}

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
        """Own the session once its owner lets it go; its record then.

        Without ``follow`` this polls, for up to ``wait`` seconds. With it, it reads the
        log after ``after``, then follows it (:class:`~connic.stores.redis.follower.Follower`)
        handing ``follow`` each new frame and trying to take the session between reads, for
        as long as the owner holds it: its lease (``wait`` long, renewed while it lives) is
        what ends the wait. ``label`` and ``token`` are checked by the first claim, in the same
        round trip that reads the log: a resume costs one round trip before its first frame.
        When they are given and a claim finds another owner, it tells the owner to end the
        session's connection there (:mod:`~connic.stores.redis.takeovers`), once per owner,
        unless ``takeover`` is false (an AG-UI run: no resume of the owner's stream, which it
        must not cut; the token is checked all the same).
        """
        await self.flush()
        check: list[str | int] = ["", ""]
        if label is not None and token is not None:
            check = [label, token_digest(token)]
        followed: list[Following] = []
        # A resume that follows claims with a nonce of its own (:mod:`~connic.stores.redis.takeovers`):
        # SessionTakenOver once a newer resume claimed the session, or attached to it on its owner.
        nonce = secrets.token_hex(8) if follow is not None and check[0] else ""
        if follow is not None:
            self._follow_waits.setdefault(session_id, []).append(ms(wait))
            self._follow_leases[session_id] = max(self._follow_waits[session_id])
            if nonce:
                self._resumers[follow] = nonce  # for its goodbye (end)
        try:
            return await self._take(session_id, wait, follow, after, check, followed, nonce, takeover)
        finally:
            if follow is not None:
                self._unfollow(session_id, ms(wait))
                self._resumers.pop(follow, None)
            for following in followed:
                self._follower.stop(following)

    def _unfollow(self, session_id: str, lease: int) -> None:
        """A resume that followed the session with ``lease`` ends: the cancels' TTL counts on the others left."""
        waits = self._follow_waits.get(session_id, [])
        if lease in waits:
            waits.remove(lease)
        if waits:
            self._follow_leases[session_id] = max(waits)
        else:
            self._follow_waits.pop(session_id, None)
            self._follow_leases.pop(session_id, None)

    async def _take(
        self,
        session_id: str,
        wait: float,
        follow: Follow | None,
        after: int,
        check: list[str | int],
        followed: list[Following],
        nonce: str,
        takeover: bool,
    ) -> SessionRecord | None:
        """:meth:`take`'s claims, with the resume's ``nonce`` ('': none); the logs it follows put in ``followed``."""
        prefix = self.options.key_prefix
        keys = every_key(prefix, session_id)  # a goodbye elsewhere found: every key goes
        # A resume whose token the claim checks takes the owner's connection over: the claim tells
        # each owner it finds once (the first; another that took the session meanwhile).
        signal: list[str | int] = [takeover_channel(prefix), session_id] if check[0] and takeover else ["", ""]
        told = ""  # the fence of the owner last told
        quick = 0  # follow reads left that wait _TOLD_WAIT
        lease = ms(wait)
        deadline = time.monotonic() + wait
        cursor: int | None = None  # the seq handed to follow so far, once following
        claim = True  # try to take it now (at first; then after a read that found no frame, or a reply's end)
        first = "1"  # the first claim makes the nonce the session's resumer; the next ones check it still is
        claimed = 0.0  # when the last claim was sent
        result: Any = None
        since: str | None = None  # the epoch read with the first claim
        while True:
            if claim:
                # The first attempt of a resume that follows also reads the log after ``after``.
                read: str | int = after if follow is not None and cursor is None else ""
                args = [lease, read, *check, *signal, told, nonce, first, self._deadline()]
                claim_reply = self._shared_script("CLAIM", keys, args)
                epoch = self._epoch_after()  # in the claim's pipeline: what it is taken under, if it is
                claimed = time.monotonic()
                try:
                    result = await self._call(asyncio.shield(claim_reply))
                except BaseException:
                    # Cancelled (the resume's client went away) with the claim sent: Redis may run
                    # it all the same, and its owner key would then name this process, which never
                    # learns its fence, so nobody renews or releases it and every resume waits
                    # producer_timeout for it to run out. Its reply, when it comes, lets it go. Out
                    # of time, its connection is closed and no reply comes: its deadline is what
                    # keeps a claim Redis runs later (a stall) from acting.
                    claim_reply.add_done_callback(partial(self._claimed_unseen, session_id))
                    raise
                now = epoch_read(epoch)
                fence = int(result[0])
                if fence == 0 and len(result) > 3:
                    # Run after its deadline (Redis slower than its clock as read here): it changed
                    # nothing, its nonce not made the resumer either. Claimed again, as if owned.
                    self._clock_seen(int(result[3]))
                    log.info("session %s: a claim ran after its deadline: claiming again", session_id)
                else:
                    since = now if first else since
                    first = ""
                if fence == -3 and since is not None and now is not None and now != since:
                    # Not a newer resume: Redis lost its data (the resumer with it) while this one
                    # followed, and the owner wrote the session back. A store failure: resume again.
                    log.info("session %s: Redis lost its data while a resume followed it", session_id)
                    raise StoreUnavailable("the session store lost its data meanwhile; resume again")
                if fence == -3:
                    log.info("session %s: a newer resume took it over while this one followed", session_id)
                    raise SessionTakenOver("another connection resumed this session")
                if fence == -2:
                    log.info("session %s: its client said goodbye while no process owned it: ended", session_id)
                    return None
                if fence == -1:
                    return None
                if fence == 0:
                    if signal[0] and result[1] != told:  # this claim told the owner
                        quick = _TOLD_TRIES
                    told = result[1]
                if fence > 0:
                    self._hold(session_id, fence, lease)
                    self._owned(session_id, epoch)
                    if int(result[4]):  # taken once the session is live here (add)
                        self._cancels_waiting.add(session_id)
                    try:
                        return await self._taken(session_id, result[1], int(result[2]), result[3])
                    except asyncio.CancelledError:
                        self.abandon(session_id, "cancelled")
                        raise
                    except Exception as exc:
                        cause = exc.__cause__  # what did not decode, for the log (the client is told less)
                        why = exc.why if isinstance(exc, StoreUnavailable) else str(exc)
                        self.abandon(session_id, f"{why}: {cause}" if cause is not None else why)
                        if isinstance(exc, StoreUnavailable):
                            raise
                        # A record that decodes but does not fit (a seq that is no number): as unreadable.
                        raise StoreUnavailable("this session's record in the store cannot be read") from exc
            if follow is None and time.monotonic() >= deadline:
                log.warning("session %s: its owner did not let it go within %g s", session_id, wait)
                return None
            if follow is None:
                await asyncio.sleep(_POLL)
            elif cursor is None:
                read_frames = logged(result[2])
                frames = frames_after(read_frames, after)
                cursor = read_frames[-1][0] if read_frames else after
                follow(frames, cursor)
                followed.append(self._follower.follow(keys[3], cursor))
            else:
                read_frames = await self._follower.next(followed[0], _TOLD_WAIT if quick else _FOLLOW_WAIT)
                quick = max(0, quick - 1)
                claim = True
                # A newer resume may have claimed the session (the takeover channel said so), or did
                # and its message was lost: claim again now, or a while after the last claim at most.
                told_here, followed[0].told = followed[0].told, False
                if read_frames:
                    frames = frames_after(read_frames, cursor)
                    if frames is None:
                        log.warning("session %s: frames trimmed before they could be followed", session_id)
                        return None  # never a gap
                    cursor = read_frames[-1][0]
                    follow(frames, cursor)
                    # The owner lets the session go only once a reply ended: until a frame that may
                    # end one comes, reading on is enough (half the round trips per followed frame).
                    claim = told_here or time.monotonic() - claimed >= _FOLLOW_WAIT
                    claim = claim or any(may_end(frame) for frame in frames)

    def _claimed_unseen(self, session_id: str, reply: asyncio.Future[Any]) -> None:
        """A claim's reply that came after its caller gave up: a session it took is let go at once (RELEASE)."""
        if reply.cancelled() or reply.exception() is not None:
            return  # not sent, or Redis failed: whatever it did, the lease runs out
        fence = int(reply.result()[0])
        if fence > 0:
            log.warning("session %s: claimed after its resume gave up: let go", session_id)
            # Fences only grow: a newer one queued for this session already is the one to release.
            self._abandons[session_id] = max(fence, self._abandons.get(session_id, 0))
            self._kick()

    async def saved_history(self, session_id: str) -> tuple[int, int, Sequence[HistoryEntry]] | None:
        """The record's ``seq``, the newest seq its log holds and its history, read at one instant (MULTI).

        One SAVE script writes the record and its history, and the writer runs a session's SAVE
        before the APPEND of the frames numbered after it (:mod:`~connic.stores.redis.writer`):
        when the log holds a frame, every history change made before it was numbered is in what
        is read with it. StoreUnavailable when the record does not decode.
        """
        keys = self._keys(session_id)
        pipe = self._client().pipeline(transaction=True)
        pipe.get(keys[2])
        pipe.lrange(keys[4], 0, -1)
        pipe.xrevrange(keys[3], "+", "-", count=1)
        data, entries, newest = await self._call(pipe.execute())
        if data is None:
            return None
        try:
            record, _ = decode(data, entries)
            logged = seq_of(newest[0][0]) if newest else 0
        except UNREADABLE as exc:
            raise StoreUnavailable("this session's record in the store cannot be read") from exc
        return record.seq, logged, record.history

    async def _taken(self, session_id: str, data: str, newest: int, entries: list[str]) -> SessionRecord:
        """The record of a session just taken over, with the replies its owner left unfinished if it died.

        ``data`` and ``entries`` are its record and history list as the claim read them:
        StoreUnavailable when they, or its log, do not decode (the session stays in Redis as it is).
        """
        try:
            record, listed = decode(data, entries)
        except UNREADABLE as exc:
            raise StoreUnavailable("this session's record in the store cannot be read") from exc
        if listed:  # the list holds the session's entries: the next save appends to it
            self._saved[session_id] = holding(record.history)
        else:  # a record written with its history inline: the next save writes the list whole
            self._saved.pop(session_id, None)
        lost: list[tuple[MessageId, frozenset[str], str | None]] = []
        if record.busy or newest > record.seq:
            # Its owner let it go answering, or logged frames after its last save: it died
            # mid-reply. Its log says which replies did not end (at most replay_buffer frames).
            raw = await self._shared("XRANGE", self._keys(session_id)[3], "-", "+")
            try:
                lost = unfinished([frame for _, frame in logged(raw)], record.pending)
            except UNREADABLE as exc:
                raise StoreUnavailable("this session's replay log in the store cannot be read") from exc
        return attrs.evolve(record, seq=max(record.seq, newest), lost=tuple(lost))

    def abandon(self, session_id: str, why: str) -> None:
        """Taking the session over failed after the claim: stop owning it, and let it go in Redis (in the background).

        Its renewal stops at once, so that its lease runs out within ``producer_timeout`` even
        when letting it go fails too (Redis itself being what failed); nothing of it is written.
        """
        fence = self._forget(session_id)
        if fence is not None:
            log.warning("session %s: taking it over failed (%s): let go", session_id, why)
            self._abandons[session_id] = fence
            self._kick()
