"""A ``history`` request answered from the store while a resume follows another process's reply.

The resume (:mod:`~connic.transports.ws_resume`) holds the client's frames in order while
it follows; a ``history`` request with nothing held before it is answered at once, from
what the store saved (PROTOCOL.md §8), as the owner would have answered it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from aiohttp import WSMessage

from connic.agent import HistoryEntry
from connic.frames import History as HistoryFrame
from connic.frames import encode

if TYPE_CHECKING:
    from connic.transports.ws_connection import Connection

__all__ = ["FollowedHistory", "consume"]


class FollowedHistory:
    """A ``history`` request answered from the store while the find follows another process (PROTOCOL.md §8).

    The answer is the history as of the last frame this connection forwarded (seq F), as the
    owner would have sent it then. The store reads at one instant the record's seq S, the
    newest seq N its log holds and the history saved with the record; the owner's writer
    writes a record before the frames numbered after it (:mod:`~connic.stores.redis.writer`).
    The history read is the one as of F when S == F (saved while the owner was at F), or
    when S < F <= N: the log holds frame F, so every change made before it was numbered is
    in what was read, and none made after it (the record was saved before frame F + 1 was
    numbered). A reply goes into the history before its end frame is numbered
    (:meth:`Message.emit <connic.message.Message.emit>`): the history as of that frame holds
    it. Else it is read again: at once when F moved during the read, or once the find
    follows further or the owner's next write may have come (the frames the client got
    from the owner itself may not be logged yet). A store that keeps no history, fails
    or finds no record leaves the request held in order, for the new owner here to answer.
    """

    def __init__(
        self, conn: Connection, session_id: str, following: list[int], moves: list[asyncio.Future[None]]
    ) -> None:
        self.conn = conn
        self.session_id = session_id
        self.following = following
        self.moves = moves
        self.asked: WSMessage | None = None  # the request being answered
        self.reading: asyncio.Future[tuple[int, int, Sequence[HistoryEntry]] | None] | None = None
        self.read_at = 0  # the seq followed to when the read was sent
        self.moved: asyncio.Future[None] | None = None  # done when the find follows further, or the wait is up
        self.wait = _FIRST_WAIT  # before reading again when nothing moved

    def ask(self, msg: WSMessage) -> None:
        """Answer the request ``msg`` (nothing is held before it) once the store says how."""
        self.asked = msg
        self.wait = _FIRST_WAIT
        self._read()

    def waiting(self) -> set[asyncio.Future[Any]]:
        """What answering waits for (to be awaited with the rest of what is read meanwhile)."""
        if self.reading is not None:
            return {self.reading}
        if self.moved is not None:
            return {self.moved}
        return set()

    def step(self) -> None:
        """Act on a read that came back, or on the find following further (or the wait being up)."""
        if self.moved is not None and self.moved.done():
            self.moved = None
            self._read()
            return
        reading = self.reading
        if reading is None or not reading.done():
            return
        self.reading = None
        failed = reading.cancelled() or reading.exception() is not None
        saved = None if failed else reading.result()
        if saved is None:
            self.hold()
            return
        seq, logged, entries = saved
        at = self.read_at
        if at != self.following[0]:
            self._read()  # frames came meanwhile: the history may have changed before them
        elif seq == at or seq < at <= logged:
            answer = HistoryFrame(tuple(entry.to_dict() for entry in entries), at)
            self.conn.writer.send_nowait(encode(answer))
            self.asked = None
        else:
            loop = self.conn._loop
            moved = self.moved = loop.create_future()
            self.moves.append(moved)
            loop.call_later(self.wait, _done, moved)
            self.wait = min(self.wait * 2, _LAST_WAIT)

    def hold(self) -> None:
        """Put the request back at the head of the inbox: held, answered in order once the session is here."""
        if self.asked is not None:
            self.conn._inbox.insert(0, self.asked)
            self.asked = None
        self.stop()

    def stop(self) -> None:
        """Stop answering (the find is over)."""
        for future in (self.reading, self.moved):
            if future is not None:
                future.add_done_callback(consume)
                future.cancel()
        self.reading = self.moved = None

    def _read(self) -> None:
        self.read_at = self.following[0]
        self.reading = asyncio.ensure_future(self.conn.transport.sessions.store.saved_history(self.session_id))


# Seconds before reading the store again when what it held did not answer a history request
# and the find did not follow further: the owner's next write is due within its batch delay
# (5 ms), and a record ahead of the frames followed is followed by them. Doubling, up to the last.
_FIRST_WAIT = 0.01
_LAST_WAIT = 0.2


def _done(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def consume(future: asyncio.Future[Any]) -> None:
    """Take the outcome of a future nobody awaits any more (a read abandoned), so asyncio does not log it."""
    if not future.cancelled():
        future.exception()
