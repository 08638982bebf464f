"""How much a resume holds while it follows another process's reply, and the answers beyond it.

Part of :mod:`~connic.transports.ws_resume` (kept apart for size). While a shared store waits
for another process to let the session go, the resume holds what the client sends
(:func:`~connic.transports.ws_resume._reading_meanwhile`) until it takes the session over: a
reply of minutes would let a client that floods frames meanwhile grow this process's memory
without limit, where one process answers each frame as it comes (``max_queued``). So
:class:`Bound` holds at most :attr:`Bound.limit` frames (twice ``max_queued`` and a few: more
messages than one process could ever queue, and their cancels' copies), answered as on one
process once the session is taken over (refusals sequenced then). Past it, what it can answer
now is answered at once:

- a message is refused ``queue_full``: one process would refuse it too, behind ``max_queued``
  messages (or ``rate_limited``, checked first). Only the owner numbers the session's frames,
  so this refusal is not sequenced: ``id`` null, the message's id in ``message_id``;
- a ping gets its pong (ahead of the held messages' acks), anything else ``queue_full``
  (``id`` null): never a silent drop, never a close for sending fast;
- a binary frame gets ``unsupported_frame`` at once, held or not (one process's answer, unsequenced).

Pings and history requests held keep no padding: one shared frame each stands for them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import WSMessage, WSMsgType

from connic.errors import QueueFull, UnsupportedFrame
from connic.frames import ClientFrame, ErrorFrame, HistoryRequest, MessageFrame, MessageId, PingFrame, Pong, encode

if TYPE_CHECKING:
    from connic.transports.ws_connection import Connection

__all__ = ["SLACK", "Bound"]

SLACK = 16
"""Held frames allowed beyond twice ``max_queued`` (pings, history requests, a cancel's copies)."""

_PING = WSMessage(WSMsgType.TEXT, '{"type":"ping"}', None)
_HISTORY = WSMessage(WSMsgType.TEXT, '{"type":"history"}', None)


class Bound:
    """What a following resume holds at most; the frames past it are answered at once."""

    __slots__ = ("limit",)

    def __init__(self, max_queued: int) -> None:
        self.limit = 2 * max_queued + SLACK  # held frames in all, a held message's cancel copies included

    def full(self, conn: Connection) -> bool:
        """Whether the inbox holds :attr:`limit` frames already."""
        return len(conn._inbox) >= self.limit

    def hold(self, conn: Connection, msg: WSMessage, parsed: ClientFrame | None) -> WSMessage | None:
        """The frame to hold for ``msg`` (its padding shed), or None when it was answered at once."""
        if msg.type is WSMsgType.BINARY:  # one process answers it unsequenced, whatever it held: at once here too
            conn._error(UnsupportedFrame("binary frames are not supported; send JSON text frames"))
            return None
        if msg.type is not WSMsgType.TEXT:
            return msg  # the socket's end: always held, it ends the following (ws_resume._gone)
        if type(parsed) is MessageFrame:
            if self.full(conn):
                self.refuse(conn, f"{len(conn._inbox)} frames are held while another process answers", parsed.id)
                return None
            return msg
        if self.full(conn):
            if isinstance(parsed, PingFrame):
                conn.writer.send_nowait(encode(Pong()))
            else:
                self.refuse(conn, f"{len(conn._inbox)} frames are held while another process answers", None)
            return None
        if isinstance(parsed, PingFrame):
            return _PING
        if isinstance(parsed, HistoryRequest):
            return _HISTORY
        return msg

    def refuse(self, conn: Connection, text: str, message_id: MessageId | None) -> None:
        """Answer ``queue_full`` at once, unsequenced (``message_id``: the message refused, if it has an id)."""
        transport = conn.transport
        transport.metrics.errors.inc(transport.connector.path, QueueFull.code)
        frame = ErrorFrame(id=None, code=QueueFull.code, message=text, message_id=message_id)
        conn.writer.send_nowait(encode(frame))
