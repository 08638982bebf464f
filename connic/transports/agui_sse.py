"""AG-UI runs over HTTP: the session's sink, and the SSE stream of each run.

:class:`ThreadRuns` is what the ``agui`` transport attaches to a thread's session
while runs stream on it; it hands each frame to its run's :class:`SSERun`. A run
turns the session's frames of its message into
AG-UI events (:class:`~connic.transports.agui_events.RunEvents`), encodes them
with ``ag-ui-protocol``'s ``EventEncoder`` and queues them in a bounded outbox;
:meth:`SSERun.stream` writes the outbox to the response. A client that stops
reading fills the outbox and then the socket's buffer: after ``send_timeout``
it is dropped (a slow consumer), so a run's memory stays bounded.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import TYPE_CHECKING, Any

from aiohttp import web

from connic.errors import ConnicError, SlowConsumer
from connic.frames import MessageId

if TYPE_CHECKING:
    from ag_ui.core import BaseEvent
    from ag_ui.encoder import EventEncoder

    from connic.metrics import Metrics
    from connic.transports.agui_events import RunEvents

__all__ = ["SSERun", "ThreadRuns"]

Frame = dict[str, Any]

log = logging.getLogger("connic.agui")

_POLL = 1.0  # seconds between looks at whether a quiet client is still connected


class SSERun:
    """The sink of one run: connic frames in, SSE-encoded AG-UI events out, in a bounded outbox."""

    __slots__ = (
        "_room",
        "_wake",
        "close_code",
        "encoder",
        "events",
        "items",
        "label",
        "limit",
        "metrics",
        "name",
        "request",
        "send_timeout",
    )

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
        self.events = events
        self.encoder = encoder
        self.request = request
        self.limit = limit
        self.send_timeout = send_timeout
        self.metrics = metrics
        self.label = label
        self.name = events.thread_id  # for the logs
        self.items: list[str] = []
        self.close_code: int | None = None  # set once the stream is over: 1000, 1001, 4010, 1006 (client gone)
        self._room = asyncio.Event()
        self._wake = asyncio.Event()

    @property
    def gone(self) -> bool:
        """Whether nothing more reaches the client (dropped, or it went away)."""
        return self.close_code is not None and self.close_code != 1000

    # --- the run's frames, from its thread's ThreadRuns ------------------------------

    def put_nowait(self, frame: Frame) -> None:
        """An ack or a refusal: queued at once (a client two outboxes behind is dropped)."""
        if self.close_code is None:
            self._queue(self.events.frame(frame))
            if len(self.items) > 2 * self.limit:
                self.slow_consumer()

    def offer(self, frame: Frame) -> bool:
        """A reply frame, if there is room now."""
        if self.close_code is not None:
            return True  # nobody reads any more: the reply goes on into the log and history
        if len(self.items) >= self.limit:
            return False
        self._queue(self.events.frame(frame))
        return True

    async def send(self, frame: Frame) -> None:
        """A reply frame, waiting up to ``send_timeout`` for room; past it the client is dropped."""
        try:
            async with asyncio.timeout(self.send_timeout):
                while self.close_code is None and len(self.items) >= self.limit:
                    self._room.clear()
                    await self._room.wait()
        except TimeoutError:
            self.slow_consumer()
        if self.close_code is None:
            self._queue(self.events.frame(frame))

    def fail(self, error: ConnicError) -> None:
        """End the run now with ``error``'s code (``RUN_ERROR``)."""
        if self.close_code is None and not self.events.done:
            self.metrics.errors.inc(self.label, error.code)
            self._queue(self.events.failed(error.code, error.message))

    # --- queueing -------------------------------------------------------------------

    def start(self, event: BaseEvent) -> None:
        """Queue the run's first event."""
        self._queue([event])

    def _queue(self, events: list[BaseEvent]) -> None:
        if events:
            encode = self.encoder.encode
            self.items.extend(encode(event) for event in events)
            self._wake.set()

    # --- writing --------------------------------------------------------------------

    async def stream(self, response: web.StreamResponse) -> None:
        """Write the outbox to ``response`` until the run's last event is out or the client is gone."""
        request = self.request
        while True:
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
            batch = "".join(self.items).encode()
            self.items.clear()
            self._room.set()
            try:
                async with asyncio.timeout(self.send_timeout):
                    await response.write(batch)
            except TimeoutError:
                self.slow_consumer()
                return
            except (ConnectionError, RuntimeError):
                # aiohttp: "Cannot write to closing transport", or the connection reset.
                self.close_code = self.close_code or 1006
                return

    def slow_consumer(self) -> None:
        """The client stopped reading: drop the connection, free the outbox."""
        if self.close_code is not None:
            return
        self.close_code = SlowConsumer.close_code or 4010
        self.metrics.slow_consumers.inc(self.label)
        log.warning("thread %s: client stopped reading its event stream; dropping it", self.name)
        self.items.clear()
        self._room.set()
        self._wake.set()
        transport = self.request.transport
        if transport is not None:
            transport.abort()


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
            run.put_nowait(frame)

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
