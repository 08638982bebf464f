"""The bounded outbox both AG-UI bindings write from: an SSE run's, and a WebSocket binding connection's.

Whatever goes to the client waits here, encoded, until the writer takes it. A reply
frame waits for room (``send_queue`` entries; a client that takes nothing, neither
entries nor bytes from the socket's buffers, for ``send_timeout`` seconds is dropped);
an ack, a refusal or an error about a bad client frame is queued at once, but a
client twice ``send_queue`` behind is dropped as a slow consumer (close code
4010), so that a client that never reads cannot grow the server's memory, however
many frames it sends.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from connic.errors import SlowConsumer
from connic.flow import StallTimeout, wait_in_turns
from connic.transports._aiohttp_raw import unsent

if TYPE_CHECKING:
    from aiohttp import web

    from connic.metrics import Metrics

__all__ = ["Outbox", "shown"]

log = logging.getLogger("connic.agui")

T = TypeVar("T")

_SHOWN = 64  # characters of a client's value an error message quotes back


def shown(value: object) -> str:
    """``value`` as an error message quotes it: its repr, cut to a few dozen characters.

    An id the client sent may be as big as its frame; quoted back whole, each bad frame
    would cost the server (and the client's bandwidth) its size again.
    """
    text = repr(value)
    return text if len(text) <= _SHOWN else text[: _SHOWN - 1] + "…"


class Outbox(Generic[T]):
    """A bounded list of encoded entries between a producer and one client's writer.

    A subclass says how one item (a connic frame) becomes entries (:meth:`_put`),
    and writes :attr:`items` out, taking them with :meth:`take`.
    """

    __slots__ = ("_room", "_wake", "close_code", "items", "label", "limit", "metrics", "request", "send_timeout")

    def __init__(self, request: web.Request, *, limit: int, send_timeout: float, metrics: Metrics, label: str) -> None:
        self.request = request
        self.limit = limit
        self.send_timeout = send_timeout
        self.metrics = metrics
        self.label = label  # the connector's path, for the metrics
        self.items: list[Any] = []
        self.close_code: int | None = None  # set once nothing more is written: the close code
        self._room = asyncio.Event()
        self._wake = asyncio.Event()

    # --- what the session hands over (the Sink protocol) ------------------------------

    def send_nowait(self, item: T) -> None:
        """An ack or a refusal: queued at once (a client two outboxes behind is dropped)."""
        if self.close_code is None:
            self._put(item)
            self._bounded()

    def offer(self, item: T) -> bool:
        """A reply frame, if there is room now."""
        if self.close_code is not None:
            return True  # nobody reads any more: the reply goes on into the log and history
        if len(self.items) >= self.limit:
            return False
        self._put(item)
        return True

    async def send(self, item: T) -> None:
        """A reply frame, waiting for room; a client that takes nothing for ``send_timeout`` is dropped.

        Agents of one run take turns at its room (:func:`~connic.flow.wait_in_turns`).
        """
        if not await wait_in_turns(self._room, self.send_timeout, self._waiting, self._unsent):
            self.slow_consumer()
        if self.close_code is None:
            self._put(item)

    def _waiting(self) -> bool:
        return self.close_code is None and len(self.items) >= self.limit

    def _unsent(self) -> int:
        return unsent(self.request.transport)

    def writing(self) -> StallTimeout:
        """``async with`` around one write: TimeoutError once the client took nothing for ``send_timeout``.

        Nothing: not one byte of what was written to it (:class:`~connic.flow.StallTimeout`).
        The writer then drops it (:meth:`slow_consumer`).
        """
        return StallTimeout(self.send_timeout, self._unsent)

    def urgent(self, entries: list[Any]) -> None:
        """Entries that cannot wait (an error, the end of a run), under the same bound as :meth:`send_nowait`."""
        if self.close_code is None and entries:
            self.items.extend(entries)
            self._wake.set()
            self._bounded()

    # --- for the subclass --------------------------------------------------------------

    def _put(self, item: T) -> None:
        """Turn ``item`` into entries and queue them (``self.items``, then ``self._wake``)."""
        raise NotImplementedError

    def _name(self) -> str:
        """The thread, for the log line of a slow consumer."""
        return "-"

    def take(self) -> list[Any]:
        """Everything queued, for the writer; the outbox is empty (and has room) again."""
        batch, self.items = self.items, []
        self._room.set()
        return batch

    def went_out(self) -> None:
        """Part of what the writer took reached the socket: agents waiting for room start their wait again.

        An agent waiting behind a batch that the client takes longer than ``send_timeout`` to
        read is behind a client that reads, not a slow consumer (:func:`~connic.flow.wait_in_turns`).
        """
        if len(self.items) >= self.limit:
            self._room.set()

    def _bounded(self) -> None:
        if len(self.items) > 2 * self.limit:
            self.slow_consumer()

    def slow_consumer(self) -> None:
        """The client stopped reading: drop its connection (4010), free the outbox."""
        if self.close_code is not None:
            return
        self.close_code = SlowConsumer.close_code or 4010
        self.metrics.slow_consumers.inc(self.label)
        log.warning("thread %s: client stopped reading; dropping it (4010)", self._name())
        self.items.clear()
        self._room.set()
        self._wake.set()
        transport = self.request.transport
        if transport is not None:
            transport.abort()
