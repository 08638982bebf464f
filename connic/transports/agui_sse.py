"""AG-UI runs over HTTP: the session's sink, and the SSE stream of each run.

:class:`ThreadRuns` is what the ``agui`` transport attaches to a thread's session
while runs stream on it; it hands each frame to its run's :class:`SSERun`. A run
turns the session's frames of its message into
AG-UI events (:class:`~connic.transports.agui_events.RunEvents`), encodes them
with ``ag-ui-protocol``'s ``EventEncoder`` and queues them in its bounded outbox
(:class:`~connic.transports.agui_outbox.Outbox`);
:meth:`SSERun.stream` writes the outbox to the response. A client that stops
reading fills the outbox and then the socket's buffer: after ``send_timeout``
it is dropped (a slow consumer), so a run's memory stays bounded.
"""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING, Any

from aiohttp import web

from connic.errors import ConnicError
from connic.frames import MessageId
from connic.transports.agui_outbox import Outbox

if TYPE_CHECKING:
    from ag_ui.core import BaseEvent
    from ag_ui.encoder import EventEncoder

    from connic.metrics import Metrics
    from connic.transports.agui_events import RunEvents

__all__ = ["SSERun", "ThreadRuns"]

Frame = dict[str, Any]

_POLL = 1.0  # seconds between looks at whether a quiet client is still connected


_PIECE = 64 * 1024  # characters of events one write takes: each is given send_timeout to go out


def _pieces(items: list[str]) -> list[bytes]:
    """``items`` joined into writes of about ``_PIECE`` characters (one, for the usual small batch).

    Written whole under one ``send_timeout``, a full outbox of large events would drop a client
    reading steadily, more slowly than that outbox a ``send_timeout``.
    """
    pieces: list[bytes] = []
    start = size = 0
    for index, item in enumerate(items):
        size += len(item)
        if size >= _PIECE:
            pieces.append("".join(items[start : index + 1]).encode())
            start, size = index + 1, 0
    if start < len(items):
        pieces.append("".join(items[start:]).encode())
    return pieces


class SSERun(Outbox[Frame]):
    """The sink of one run: connic frames in, SSE-encoded AG-UI events out, in a bounded outbox."""

    __slots__ = ("encoder", "events", "name")

    def __init__(
        self,
        events: RunEvents,
        encoder: EventEncoder,
        request: web.Request,
        *,
        limit: int,
        send_timeout: float,
        metrics: Metrics,
        label: str,
    ) -> None:
        super().__init__(request, limit=limit, send_timeout=send_timeout, metrics=metrics, label=label)
        self.events = events
        self.encoder = encoder
        self.name = events.thread_id  # for the logs

    @property
    def gone(self) -> bool:
        """Whether nothing more reaches the client (dropped, or it went away)."""
        return self.close_code is not None and self.close_code != 1000

    def fail(self, error: ConnicError) -> None:
        """End the run now with ``error``'s code (``RUN_ERROR``)."""
        if self.close_code is None and not self.events.done:
            self.metrics.errors.inc(self.label, error.code)
            self.urgent(self._encoded(self.events.failed(error.code, error.message)))

    def start(self, event: BaseEvent) -> None:
        """Queue the run's first event."""
        self.urgent(self._encoded([event]))

    # --- queueing -------------------------------------------------------------------

    def _put(self, item: Frame) -> None:
        events = self.events.frame(item)
        if events:
            self.items.extend(self._encoded(events))
            self._wake.set()

    def _encoded(self, events: list[BaseEvent]) -> list[str]:
        encode = self.encoder.encode
        return [encode(event) for event in events]

    def _name(self) -> str:
        return self.name

    # --- writing --------------------------------------------------------------------

    async def stream(self, response: web.StreamResponse) -> None:
        """Write the outbox to ``response`` until the run's last event is out or the client is gone."""
        request = self.request
        while True:
            if self.close_code is not None:
                # Dropped as a slow consumer by an agent waiting for room: end now, not a poll
                # later, so that the run is cancelled (on_disconnect) rather than run on unread.
                return
            if not self.items:
                if self.events.done:
                    self.close_code = 1000
                    return
                self._wake.clear()
                try:
                    async with asyncio.timeout(_POLL):
                        await self._wake.wait()
                except TimeoutError:
                    pass
            transport = request.transport
            if transport is None or transport.is_closing():
                self.close_code = self.close_code or 1006  # the client went away
                return
            if self.close_code is not None:
                return  # dropped as a slow consumer meanwhile
            if not self.items:
                continue
            try:
                for piece in _pieces(self.take()):
                    async with self.writing():
                        await response.write(piece)
                    self.went_out()
            except TimeoutError:
                self.slow_consumer()
                return
            except (ConnectionError, RuntimeError):
                # aiohttp: "Cannot write to closing transport", or the connection reset.
                self.close_code = self.close_code or 1006
                return


class ThreadRuns:
    """The sink of a thread's session while runs stream on it: each frame goes to its run's stream.

    Several runs of one thread may be under way at once (each its own request, the later
    ones queued behind the first, ``max_queued``): the session has one sink, this, and it
    hands each frame to the run whose message it belongs to. Frames of no run here (a
    message another connection sent) are dropped.
    """

    __slots__ = ("runs",)

    def __init__(self) -> None:
        self.runs: dict[MessageId, SSERun] = {}

    def send_nowait(self, data: str) -> None:
        """An ack or a refusal."""
        frame = json.loads(data)
        run = self.runs.get(frame.get("id"))
        if run is not None:
            run.send_nowait(frame)

    def offer(self, data: str) -> bool:
        """A reply frame, if its run has room now."""
        frame = json.loads(data)
        run = self.runs.get(frame.get("id"))
        return run.offer(frame) if run is not None else True

    async def send(self, data: str) -> None:
        """A reply frame, waiting for its run's room."""
        frame = json.loads(data)
        run = self.runs.get(frame.get("id"))
        if run is not None:
            await run.send(frame)

    def end(self, error: ConnicError, notify: bool) -> None:
        """The session ended (expired, over its limit, taken over): every run ends with ``RUN_ERROR``."""
        for run in list(self.runs.values()):
            run.fail(error)
