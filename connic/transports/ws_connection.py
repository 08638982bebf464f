"""One WebSocket connection: it authenticates, attaches to a session and reads.

The connection only orchestrates. The handler's task is its one reader for its
whole life: it authenticates the client (:mod:`.ws_auth`; or resumes its session,
PROTOCOL.md §7, :mod:`.ws_resume`), then reads frames and hands them to the session
core (:mod:`connic.session`), whose own task answers messages, so pings, pongs and
cancels get through while an agent works. The session sends its frames back
through the connection's :class:`~connic.transports.ws_writer.Writer`. When
the socket ends, the session ends with it only if the client closed with 1000;
any other end detaches it, to be resumed by a later connection.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from typing import TYPE_CHECKING

from aiohttp import WSMessage, WSMsgType, web

from connic.errors import (
    ConnicError,
    ProtocolError,
    ServerRestarting,
    ServerShuttingDown,
    StoreUnavailable,
    UnsupportedFrame,
)
from connic.flow import Flag
from connic.frames import (
    CancelFrame,
    Connected,
    ErrorFrame,
    HistoryRequest,
    MessageFrame,
    PingFrame,
    Pong,
    ResumeFrame,
    encode,
    parse_client_frame,
)
from connic.message import release_cancellation
from connic.metrics import close_code_label
from connic.session import ChatSession
from connic.transports._aiohttp_raw import limit_read_size, raw_transport, write_control
from connic.transports.ws_auth import authenticate
from connic.transports.ws_held import Behind
from connic.transports.ws_keepalive import Heartbeat
from connic.transports.ws_resume import cancel_behind, resume, resume_instead
from connic.transports.ws_writer import Writer

if TYPE_CHECKING:
    from connic.transports.websocket import WebSocketTransport

__all__ = ["Connection", "Phase"]

log = logging.getLogger("connic.websocket")


class Phase(enum.Enum):
    """Where a connection is in its life."""

    AUTHENTICATING = "authenticating"  # no session yet
    OPEN = "open"  # attached to a session
    CLOSED = "closed"  # the socket ended


class Connection:
    """One client connection, attached to one session at a time."""

    __slots__ = (
        "_behind",
        "_history",
        "_inbox",
        "_loop",
        "_receiving",
        "client_close",
        "closed",
        "fresh",
        "heartbeat",
        "peer",
        "phase",
        "session",
        "started",
        "transport",
        "writer",
        "ws",
    )

    def __init__(self, transport: WebSocketTransport, ws: web.WebSocketResponse, request: web.Request) -> None:
        self.transport = transport
        self.ws = ws
        self.peer = request.remote
        self.phase = Phase.AUTHENTICATING
        self.session: ChatSession | None = None
        self.fresh = False  # the session was made for this connection and no message was sent yet
        self.client_close: int | None = None  # the code of a close the client started
        self.closed = Flag()  # set once the connection has cleaned up
        self._inbox: list[WSMessage] = []  # read while a resume waited (_reading_meanwhile), not yet handled
        self._behind: Behind | None = None  # the inbox's messages, held behind another process's reply
        self._receiving: asyncio.Future[WSMessage] | None = None  # a read begun then, still under way
        self._history: tuple[object, int, int, str] | None = None  # see _history_frame
        self._loop = asyncio.get_running_loop()
        self.started = self._loop.time()
        opts = transport.options
        limit_read_size(request)
        self.writer = Writer(
            ws,
            request,
            raw_transport(request),
            compress=opts.compress,
            limit=opts.send_queue,
            send_timeout=opts.send_timeout,
            metrics=transport.metrics,
            label=transport.connector.path,
        )
        self.heartbeat = Heartbeat(self.writer, opts.heartbeat)

    # --- the Sink the session sends through --------------------------------------

    def send_nowait(self, data: str) -> None:
        """Queue a control frame."""
        self.writer.send_nowait(data)
        if self.writer.closing:
            self._detach()

    def offer(self, data: str) -> bool:
        """Queue a reply frame if there is room now."""
        if not self.writer.offer(data):
            return False
        if self.writer.closing:
            self._detach()
        return True

    async def send(self, data: str) -> None:
        """Queue a reply frame, waiting for room."""
        await self.writer.send(data)
        if self.writer.closing:
            self._detach()

    def _detach(self) -> None:
        # Nothing more reaches this client: the session goes on without it at once
        # (on_disconnect applies now, not once the socket is seen closed).
        if self.session is not None and self.client_close is None:
            self.session.detach(self)

    def end(self, error: ConnicError, notify: bool) -> None:
        """The session ended (expired, over its limit, taken over): close with its code."""
        self.close(error, notify)

    # --- life cycle -----------------------------------------------------------

    async def run(self, handshake_secret: str | None) -> None:
        """Authenticate, then read until the socket closes; always clean up."""
        metrics = self.transport.metrics
        path = self.transport.connector.path
        metrics.connections.inc(path)
        metrics.connections_open.inc(path)
        self.heartbeat.start()
        try:
            if await authenticate(self, handshake_secret):
                self.transport.authenticated(self)  # it stops counting against [server] max_unauthenticated
                await self._read()
        except StoreUnavailable as exc:
            # A shared store failed opening or resuming the session: 1011, try again later. The
            # client is told what failed, the log also what the store said.
            log.warning("session %s: the session store failed: %s", self.writer.name, exc.why)
            self.close(exc)
        finally:
            await self._cleanup()

    async def _cleanup(self) -> None:
        # The handler may itself be cancelled here (aiohttp's handler_cancellation),
        # so what must happen does not wait on anything first.
        task = asyncio.current_task()
        if task is not None:
            # Added as the connection ends rather than as it starts: a callback list on
            # every idle connection's task costs memory for a task that is rarely cancelled.
            task.add_done_callback(release_cancellation)
        self.phase = Phase.CLOSED
        self._history = None
        self.heartbeat.stop()
        if self._receiving is not None:
            self._receiving.cancel()
        session = self.session
        if session is not None:
            if self.client_close == 1000 and session.sink is self:
                session.end()  # the client said goodbye: the session is over (PROTOCOL.md §7)
            else:
                session.detach(self)  # any other end, a client's close with another code too
        try:
            await self.writer.finish()
            if not self.ws.closed:
                await self.ws.close()
        finally:
            self._account_close()
            self.closed.set()

    def _account_close(self) -> None:
        # What connic decided, else the code of a close the client began (1000 ends its session,
        # any other detaches it: aiohttp's answer to it would say 1000 for both), else the first
        # code the socket sent, else what the client sent.
        code = self.writer.close_code
        if code is None:
            code = self.client_close
        if code is None:
            code = getattr(self.ws, "sent_code", None)
        if code is None:
            code = self.ws.close_code
        metrics = self.transport.metrics
        path = self.transport.connector.path
        metrics.connections_open.dec(path)
        metrics.closes.inc(path, close_code_label(code))
        session = self.session
        # One line per connection; never secrets, never message text.
        log.info(
            "close session=%s peer=%s connector=%s code=%s authenticated=%s duration=%.3fs",
            session.id if session is not None else "-",
            self.peer,
            path,
            code,
            session is not None,
            self._loop.time() - self.started,
        )

    def close(self, error: ConnicError, notify: bool = True) -> None:
        """Close with ``error``'s close code, after an error frame (``id: null``) if ``notify``."""
        writer = self.writer
        if writer.closing:
            return
        if notify:
            self.transport.metrics.errors.inc(self.transport.connector.path, error.code)
            writer.send_nowait(encode(ErrorFrame(id=None, code=error.code, message=error.message)))
        writer.close(error.close_code or 1000, error.code)

    async def shutdown(self) -> None:
        """Server shutdown, once the sessions have drained: close 1001 (1012 when it restarts)."""
        error = (
            ServerRestarting("the server is restarting")
            if self.transport.restarting
            else ServerShuttingDown("the server is shutting down")
        )
        self.close(error)
        try:
            async with asyncio.timeout(self.transport.options.send_timeout):
                await self.closed.wait()
        except TimeoutError:
            self.writer.abort(error.close_code or 1001, error.code)

    # --- attaching to a session (once authenticated: connic/transports/ws_auth.py) ---

    async def _open_fresh(self, resumed: bool | None) -> None:
        """Attach to a new session and say so (``resumed: false`` after a failed resume)."""
        session = await self.transport.sessions.open()
        self.session = session
        self.fresh = True
        self.writer.name = session.id
        self._connected(session, resumed=resumed)
        session.attach(self)
        self.phase = Phase.OPEN
        log.info("open session=%s peer=%s connector=%s", session.id, self.peer, self.transport.connector.path)

    def _connected(self, session: ChatSession, *, resumed: bool | None, recovered: bool | None = None) -> None:
        self._send_connected(session.id, session.token, resumed, recovered, session.seq if resumed else None)

    def _send_connected(
        self, session_id: str, token: str | None, resumed: bool | None, recovered: bool | None, last_seq: int | None
    ) -> None:
        opts = self.transport.options
        frame = Connected(
            session_id=session_id,
            agents=self.transport.agent_names,
            streaming=opts.streaming,
            max_messages=opts.max_messages,
            session_timeout=_number(opts.session_timeout),
            resume_token=token,
            resumed=resumed,
            recovered=recovered,
            last_seq=last_seq,
        )
        self.writer.send_nowait(encode(frame))

    async def _resume(self, frame: ResumeFrame) -> None:
        """Resume the session ``frame`` names, or start a fresh one (:mod:`.ws_resume`)."""
        if await resume(self, frame):
            self.phase = Phase.OPEN

    # --- reading --------------------------------------------------------------

    async def _read(self) -> None:
        """Read until the socket ends; hand each frame to the session."""
        ws = self.ws
        writer = self.writer
        while True:
            if self._inbox:
                msg = self._inbox.pop(0)
            elif self._receiving is not None:
                msg, self._receiving = await self._receiving, None
            else:
                msg = await ws.receive()
            self.heartbeat.last_seen = self._loop.time()
            kind = msg.type
            if kind is WSMsgType.TEXT:
                await self._on_text(msg.data)
            elif kind is WSMsgType.BINARY:
                self._error(UnsupportedFrame("binary frames are not supported; send JSON text frames"))
            elif kind is WSMsgType.CLOSE:
                if not writer.closing:
                    self.client_close = msg.data  # the client started the close
                return
            elif kind is WSMsgType.PING or kind is WSMsgType.PONG:
                self._control(kind, msg.data)
            else:  # CLOSING, CLOSED, ERROR: the socket is done
                return
            if not self._inbox:
                self._behind = None  # what comes next was sent after the takeover
            # aiohttp hands over buffered frames without suspending; a client that sends
            # without reading must wait for its replies to go out before it is read again.
            if writer.full and not writer.closing and not await writer.wait_for_room(writer.send_timeout):
                writer.slow_consumer()

    async def _on_text(self, data: str) -> None:
        session = self.session
        if session is None:
            return  # a resume that attached nothing ended the connection (ws_resume): what comes after is dropped
        try:
            frame = parse_client_frame(data)
        except ProtocolError as exc:
            if exc.message_id is not None:
                session.refuse(exc, exc.message_id)
            else:
                self._error(exc)
            return
        if type(frame) is MessageFrame:
            self.fresh = False
            if self._behind is not None and self._behind.session is session:
                await self._behind.admit(frame)  # held by a resume while another process answered
            else:
                await session.admit(frame)
            cancelled = cancel_behind(self, frame)
            if cancelled is not None:
                # Held by a resume with its cancel right behind it: dropped (or not_found, if refused)
                # before anything else runs, as on one process where it waited behind another reply.
                session.cancel(cancelled)
            elif session.queue_full:
                # A client that pipelines messages: let the answering task take what it
                # can without waiting (a quick agent answers them all) before reading on.
                await asyncio.sleep(0)
        elif isinstance(frame, CancelFrame):
            session.cancel(frame.id)
        elif isinstance(frame, PingFrame):
            self.writer.send_nowait(encode(Pong()))
        elif isinstance(frame, HistoryRequest):
            self.writer.send_nowait(self._history_frame(session))
        elif isinstance(frame, ResumeFrame):
            await resume_instead(self, frame)
        # An auth frame once authenticated (or with auth off) is ignored, as the seed expects.

    def _history_frame(self, session: ChatSession) -> str:
        """The session's ``history`` frame: the one encoded for the last request while it still says the same.

        A history of ``max_history_bytes`` (4 MB) encoded anew for each of a burst of
        ``{"type": "history"}`` frames (18 bytes each) that the client does not read held
        the event loop and, queued, the server's memory: 300 took 0.9 GB. The same string
        queued again costs a reference. The history's list is replaced when trimmed and only
        grows otherwise: its identity, its length and the seq say whether the frame changed.
        """
        entries = session.history.entries
        cached = self._history
        if cached is not None and cached[0] is entries and cached[1] == len(entries) and cached[2] == session.seq:
            return cached[3]
        data = session.history_frame()
        self._history = (entries, len(entries), session.seq, data)
        return data

    def _error(self, error: ConnicError) -> None:
        """A connection-level error frame (``id: null``, not sequenced)."""
        self.transport.metrics.errors.inc(self.transport.connector.path, error.code)
        self.writer.send_nowait(encode(ErrorFrame(id=None, code=error.code, message=error.message)))

    def _control(self, kind: WSMsgType, payload: bytes) -> None:
        if kind is WSMsgType.PING:
            write_control(self.writer.io, WSMsgType.PONG, payload)


def _number(value: float) -> float | int:
    return int(value) if float(value).is_integer() else value
