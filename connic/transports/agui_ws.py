"""AG-UI's WebSocket binding (AG-UI #2084): ``RunAgentInput`` frames in, events out as JSON text frames.

One connection serves one thread (the first frame's ``threadId``), any number of
runs one after another (or queued, ``max_queued``). Every event carries connic's
``seq``: the number of the session frame it comes from (``RUN_STARTED`` that of
the message's ``ack``). A client that lost its connection connects again and
sends ``{"type": "resume", "threadId": ..., "lastSeq": N}`` first: the events
after ``N`` come again from the thread's replay log, then live ones
(PROTOCOL.md §7); with a shared store, the runs another process still streams are
followed meanwhile (:mod:`~connic.transports.agui_resume`). ``{"type": "cancel",
"runId": ...}`` cancels a run.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from aiohttp import WSMessage, WSMsgType, web

from connic.errors import ConnicError, InvalidMessage, InvalidResume, NotFound
from connic.frames import MAX_DEPTH, sequenced, too_deep
from connic.metrics import close_code_label
from connic.session import ChatSession, SessionState
from connic.transports.agui_outbox import Outbox, shown
from connic.transports.ws_writer import Close

if TYPE_CHECKING:
    from ag_ui.core import BaseEvent, RunAgentInput

    from connic.transports.agui import AguiTransport
    from connic.transports.agui_events import RunEvents

__all__ = ["WSBinding"]

log = logging.getLogger("connic.agui")


class WSBinding(Outbox[str]):
    """One WebSocket connection of the binding: the sink of its thread's session, and its reader."""

    __slots__ = ("_receiving", "agent", "dropped", "following", "held", "runs", "session", "transport", "ws")

    def __init__(
        self, transport: AguiTransport, ws: web.WebSocketResponse, request: web.Request, agent: str | None
    ) -> None:
        opts = transport.options
        super().__init__(
            request,
            limit=opts.send_queue,
            send_timeout=opts.send_timeout,
            metrics=transport.metrics,
            label=transport.connector.path,
        )
        self.transport = transport
        self.ws = ws
        self.agent = agent  # the agent every run of this connection goes to; None: all of them
        self.session: ChatSession | None = None
        self.runs: dict[Any, RunEvents] = {}  # connic message id (= runId) -> its events
        # While a resume follows another process serving the thread (agui_resume.py): the
        # thread's id and agents, the messages read meanwhile (handled after it, in order) and
        # the read under way.
        self.following: tuple[str, Sequence[str]] | None = None
        self.held: collections.deque[WSMessage] = collections.deque()
        self._receiving: asyncio.Future[WSMessage] | None = None
        # The runs a resume following another process dropped while they were queued there: the
        # frames of them still to come (one that began meanwhile, ending cancelled) are not sent,
        # until an ack says a new run has that id.
        self.dropped: set[Any] = set()

    def end(self, error: ConnicError, notify: bool) -> None:
        """The session ended (expired, over its limit, taken over): every open run ends, then the socket."""
        entries: list[Any] = []
        for run in self.runs.values():
            entries += self._entries(run.failed(error.code, error.message), None)
        self.urgent([*entries, Close(error.close_code or 1000, error.code)])

    # --- translating -----------------------------------------------------------------

    def _put(self, item: str) -> None:
        self._translate(item, silent=False)

    def _name(self) -> str:
        return self.session.id if self.session is not None else "-"

    def _translate(self, data: str, *, silent: bool) -> None:
        frame = json.loads(data)
        message_id = frame.get("id")
        if message_id is None:
            return  # not a run's frame
        if message_id in self.dropped:
            if frame.get("type") != "ack":
                return
            self.dropped.discard(message_id)
        run = self.runs.get(message_id)
        if run is None:
            # A run this connection did not start (begun before a resume): its events from here on.
            run = self.runs[message_id] = self._events(str(message_id))
            run.announced = frame.get("type") != "ack"
        events = run.frame(frame)
        if not silent and events:  # silent: a frame the client had before it resumed
            self.items += self._entries(events, frame.get("seq"))
            self._wake.set()
        if run.done:
            del self.runs[message_id]

    def _events(self, run_id: str) -> RunEvents:
        from connic.transports.agui_events import RunEvents

        if self.session is None:
            assert self.following is not None
            thread_id, agents = self.following
        else:
            thread_id = self.session.id
            agents = (self.agent,) if self.agent is not None else self.session.sessions.agent_names
        return RunEvents(thread_id, run_id, agents, announce=True)

    @staticmethod
    def _entries(events: list[BaseEvent], seq: int | None) -> list[str]:
        out = []
        for event in events:
            data = event.model_dump_json(by_alias=True)
            out.append(sequenced(data, seq) if seq is not None else data)
        return out

    def _error(self, error: ConnicError) -> None:
        """A frame connic cannot run: a ``RUN_ERROR`` naming what is wrong (no run started, no seq).

        Bounded like an ack: a client that sends bad frames and never reads is dropped.
        """
        from ag_ui.core import RunErrorEvent

        self.metrics.errors.inc(self.label, error.code)
        self.urgent(self._entries([RunErrorEvent(message=error.message, code=error.code)], None))

    # --- life cycle ------------------------------------------------------------------

    async def run(self) -> None:
        """Read frames until the socket ends; a writer task sends the outbox meanwhile."""
        path = self.transport.connector.path
        metrics = self.transport.metrics
        metrics.connections.inc(path)
        metrics.connections_open.inc(path)
        loop = asyncio.get_running_loop()
        started = loop.time()
        writer = asyncio.create_task(self._write())
        try:
            while True:
                msg = await self.receive()
                if msg.type in _ENDED:
                    break
                if msg.type is WSMsgType.ERROR:
                    # A frame aiohttp refused (1009, 1002, 1007): the code sent, which the socket's
                    # close_code is not once its reader has failed (1006).
                    self.close_code = getattr(self.ws, "sent_code", None)
                    break
                if msg.type is WSMsgType.TEXT:
                    await self._on_text(msg.data)
                elif msg.type is WSMsgType.BINARY:
                    self._error(InvalidMessage("binary frames are not supported; send JSON text frames"))
                if self.close_code is not None:
                    break
        finally:
            session = self.session
            if session is not None:
                session.detach(self)  # the thread stays for the next connection (on_disconnect applies)
            if self.close_code is None:
                self.close_code = self.ws.close_code or 1000
            self._wake.set()
            try:
                try:
                    async with asyncio.timeout(self.send_timeout):
                        await writer
                except TimeoutError:
                    writer.cancel()
                if not self.ws.closed:
                    await self.ws.close()
            finally:
                # Counted even when aiohttp cancels this handler (its client is gone, as a
                # slow consumer's is once dropped): the connection is over either way.
                writer.cancel()
                if self._receiving is not None:
                    self._receiving.cancel()
                metrics.connections_open.dec(path)
                metrics.closes.inc(path, close_code_label(self.close_code))
                log.info(
                    "close session=%s peer=%s connector=%s code=%s authenticated=True duration=%.3fs",
                    session.id if session is not None else "-",
                    self.request.remote,
                    path,
                    self.close_code,
                    loop.time() - started,
                )

    async def receive(self) -> WSMessage:
        """The next message: one held while a resume followed another process, else the socket's next."""
        if self.held:
            return self.held.popleft()
        receiving, self._receiving = self._receiving, None
        return await (receiving if receiving is not None else self.ws.receive())

    def receiving(self) -> asyncio.Future[WSMessage]:
        """The socket's next message, read in the background (a resume awaits its store meanwhile)."""
        if self._receiving is None:
            self._receiving = asyncio.ensure_future(self.ws.receive())
        return self._receiving

    def received(self) -> WSMessage | None:
        """The message :meth:`receiving` read, once it came (it is the caller's then)."""
        receiving = self._receiving
        if receiving is None or not receiving.done():
            return None
        self._receiving = None
        return receiving.result()

    async def _write(self) -> None:
        while True:
            if not self.items:
                if self.close_code is not None:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            batch = self.take()
            try:
                for item in batch:
                    if isinstance(item, Close):
                        self.close_code = item.code
                        await self.ws.close(code=item.code, message=item.reason.encode())
                        return
                    async with self.writing():
                        await self.ws.send_str(item)
                    self.went_out()
            except TimeoutError:
                self.slow_consumer()
                return
            except (ConnectionError, RuntimeError):
                return  # the client is gone

    # --- reading ---------------------------------------------------------------------

    async def _on_text(self, text: str) -> None:
        from ag_ui.core import RunAgentInput
        from pydantic import ValidationError

        from connic.transports.agui_events import BadInput, message_of

        # As a POSTed run's body is: json's parser recurses once per level, and a deep frame
        # raised RecursionError out of this reader, ending the connection with no error.
        if text.count("[") + text.count("{") > MAX_DEPTH and too_deep(text):
            self._error(InvalidMessage(f"the frame nests arrays and objects deeper than {MAX_DEPTH} levels"))
            return
        try:
            data = json.loads(text)
        except (ValueError, RecursionError):  # RecursionError: a deep frame on an already deep stack
            self._error(InvalidMessage("the frame is not valid JSON"))
            return
        kind = data.get("type") if isinstance(data, dict) else None
        if kind == "resume":
            from connic.transports.agui_resume import resume

            await resume(self, data)
            return
        if kind == "cancel":
            self._cancel(data.get("runId"))
            return
        try:
            run = RunAgentInput.model_validate(data)
            frame = message_of(run, self.agent)
        except ValidationError as exc:
            first = exc.errors(include_url=False, include_input=False)[0]
            field = ".".join(str(part) for part in first["loc"]) or "frame"
            self._error(InvalidMessage(f"RunAgentInput.{field}: {first['msg']}"))
            return
        except BadInput as exc:
            self._error(InvalidMessage(f"RunAgentInput.{exc}"))
            return
        if self.session is None:
            if not await self._open(run):
                return
        elif run.thread_id != self.session.id:
            self._error(InvalidMessage(f"this connection serves thread {self.session.id!r}; connect again for another"))
            return
        session = self.session
        assert session is not None
        if frame.id in self.runs:
            self._error(InvalidMessage(f"run {run.run_id!r} is already under way"))
            return
        self.runs[frame.id] = self._events(run.run_id)
        await session.admit(frame)

    def _cancel(self, run_id: Any) -> None:
        session = self.session
        run = self.runs.get(run_id) if isinstance(run_id, str) else None
        if session is None or run is None:
            self._error(NotFound(f"no run of this connection has runId {shown(run_id)}"))
            return
        queued = any(message.id == run_id for message in session.queue)
        session.cancel(run_id)  # one being answered ends cancelled, through its frames
        if queued:
            # Dropped before it began: no frame of the session says so.
            del self.runs[run_id]
            self.urgent(self._entries(run.dropped(), None))

    async def _open(self, run: RunAgentInput) -> bool:
        from connic.transports.agui_threads import TOKEN_HEADER, forwarded_token, seed

        given = self.request.headers.get(TOKEN_HEADER) or forwarded_token(run)
        found = await self.transport.threads.thread(run.thread_id, given, self.request.remote or "unknown")
        if isinstance(found, web.Response) or found is None:
            text = found.text if found is not None else None
            self._error(InvalidResume(text.strip() if text else "this thread cannot be continued"))
            return False
        session, fresh = found
        if fresh:
            seed(session, run)  # ends the session should it fail
            self.session = session
            session.attach(self)
            return True
        self.session = session
        return await self._take(session, session.seq)

    async def _take(self, session: ChatSession, last_seq: int, *, followed: int | None = None) -> bool:
        """Attach to a known session: the frames after ``last_seq`` from its log, then live ones.

        The log is read from its start when it still has it: the frames up to ``last_seq`` are
        not sent again, but they tell each run's events where it is (a text message already
        open, a step under way), so the client gets the rest of a run as if it had never left.
        When it lost the start, it is read from its oldest frame held (if that is no later than
        ``last_seq``), which tells as much as is left of that; else from ``last_seq``.
        ``followed``: the seq up to which a resume following another process had the log
        (:mod:`~connic.transports.agui_resume`): the runs' events are where it left them, the
        log is read on from there.
        """
        start = followed if followed is not None else 0
        replay = await session.replay(self, start)
        # Read again only when the log lost frames: None is a newer resume that overtook this one.
        # From its oldest frame held, the next one evicted: should it go before it is read, from
        # the oldest held then (later each time), until that is last_seq.
        while followed is None and last_seq and start != last_seq and replay is not None and not replay[0]:
            start = max(oldest_before(session.seq, session.sessions.options.replay_buffer, last_seq), start + 1)
            replay = await session.replay(self, start)
        if replay is None or session.state is SessionState.ENDED:
            self.session = None
            self._error(InvalidResume("another connection took this thread over meanwhile"))
            return False
        recovered, frames = replay
        if not recovered:
            self._error(InvalidResume(f"the thread's log no longer holds every event after {max(start, last_seq)}"))
        for index, data in enumerate(frames):
            self._translate(data, silent=start + index + 1 <= last_seq)
        if start:
            self._unseen(session)
        session.resume(self, start + len(frames))
        return True

    def _unseen(self, session: ChatSession) -> None:
        """Know the runs of ``session`` still under way that the log read gave no frame of.

        Read from after ``lastSeq`` (the log lost the thread's start), the log says nothing of a
        run begun before whose next frame has not come yet (an agent thinking, a run queued):
        a ``cancel`` of it was ``not_found`` where it should stop or drop it. The client had its
        ``RUN_STARTED`` (its ack is older than ``lastSeq``): its events go on from its next frame.
        """
        pending = [session.current] if session.current is not None else []
        for message in [*pending, *session.queue]:
            if message.id not in self.runs and session.cancels(message.id):
                run = self.runs[message.id] = self._events(str(message.id))
                run.announced = True


def oldest_before(newest: int, capacity: int, last_seq: int) -> int:
    """Where to read a log that lost a thread's start: after its oldest frame held, or ``last_seq``.

    A log of ``capacity`` frames whose newest is ``newest`` holds those after ``newest - capacity``.
    Read from there, its frames up to ``last_seq`` (not sent again) say where each run is, which
    read from ``last_seq`` they could not: a text message the client saw start would start again.
    """
    oldest = newest - capacity
    return oldest if 0 < oldest < last_seq else last_seq


_ENDED = (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED)  # the socket's end: nothing more is read
