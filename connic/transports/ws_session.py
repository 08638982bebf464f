"""One WebSocket connection: its session, reading and answering, outgoing queue and keepalive.

The connection's own task reads and answers: a message is answered in that
task as soon as it is read, so an agent that answers without waiting (the echo
agent) costs no task switch at all. When an agent does wait (for a model, a
timer or a slow client), a reader task takes over reading beside it, so pings,
pongs, cancels and queued messages still get through; once nothing is left to
answer, the connection's task takes reading back. Messages are answered one
after another; each message's agents run concurrently in a task group. Every
frame goes out through a bounded outbox, written in batches from a callback
(or a writer task while the client is behind), so a client that stops reading
cannot grow server memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import math
import time
import traceback
import uuid
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from aiohttp import WSMsgType, web

from connic.agent import HistoryRecord, HistoryView, Turn, new_session, new_turn
from connic.errors import (
    AuthTimeout,
    ConnicError,
    MessageLimitReached,
    NotFound,
    ProtocolError,
    QueueFull,
    RateLimited,
    ServerShuttingDown,
    SessionExpired,
    SlowConsumer,
    Unauthorized,
    UnknownAgent,
    UnsupportedFrame,
)
from connic.frames import (
    AuthFrame,
    CancelFrame,
    ClientFrame,
    Connected,
    ErrorFrame,
    MessageFrame,
    MessageId,
    PingFrame,
    Pong,
    Response,
    ServerFrame,
    StreamChunk,
    StreamEnd,
    StreamStart,
    encode,
    encode_ack,
    parse_client_frame,
)
from connic.transports.ws_io import Close, Flag, Outbox, TokenBucket, sendable, text_frame, text_header

if TYPE_CHECKING:
    from connic.transports.websocket import WebSocketTransport

__all__ = ["Connection"]

log = logging.getLogger("connic.websocket")


class _Pending:
    """An accepted message, queued or being answered, and where its agents' frames go."""

    __slots__ = ("at", "cancelled", "conn", "first_chunks", "frame", "id", "number", "results", "started", "tasks")

    def __init__(self, conn: Connection, frame: MessageFrame, message_id: MessageId, number: int) -> None:
        self.conn = conn
        self.frame = frame
        self.id = message_id
        self.number = number
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.results: dict[str, str] = {}  # each agent's whole answer, for the history
        self.cancelled = False
        self.started: set[str] | None = None  # agents whose task has begun; None: one agent, in the connection's task
        self.at = 0.0  # when answering began (time.monotonic())
        self.first_chunks: set[str] | None = None  # agents that sent a chunk (streaming)

    async def emit(self, out: ServerFrame) -> None:
        """Queue one of the reply's frames; count the reply's end in the metrics."""
        conn = self.conn
        if type(out) is StreamChunk:
            first = self.first_chunks
            if first is None:
                first = self.first_chunks = set()
            if out.agent not in first:
                first.add(out.agent)
                conn.metrics.first_chunk.observe(time.monotonic() - self.at, out.agent)
        elif type(out) is Response or type(out) is StreamEnd:
            # The reply's end: its text goes into the history; the turn's metrics.
            self.results[out.agent] = out.response if isinstance(out, Response) else out.full_response
            prompt = candidates = 0
            usage = out.token_usage
            if usage:
                prompt, candidates = usage.get("prompt_tokens", 0), usage.get("candidates_tokens", 0)
                conn.tokens_in += prompt
                conn.tokens_out += candidates
            conn.metrics.turn_ended(out.agent, out.finish_reason, time.monotonic() - self.at, prompt, candidates)
        elif type(out) is ErrorFrame and out.agent is not None:
            conn.metrics.turn_ended(out.agent, "error", time.monotonic() - self.at, 0, 0)
        # Queue the frame; the common case, room in the outbox, costs no coroutine.
        if conn.closing:
            return
        if type(out) is ErrorFrame:
            conn.metrics.errors.inc(conn.path, out.code)
        data = encode(out)
        outbox = conn.outbox
        if not outbox.put_nowait(data) and not await outbox.put(data, conn.options.send_timeout):
            conn._slow_consumer()


class Connection:
    """One client connection and its session."""

    __slots__ = (
        "_abort_task",
        "_beat",
        "_busy",
        "_context",
        "_expiry",
        "_finished",
        "_flush_scheduled",
        "_flusher",
        "_loop",
        "_main",
        "_path_key",
        "_pinged",
        "_reader",
        "_socket_done",
        "_writer",
        "authenticated",
        "bucket",
        "close_code",
        "closing",
        "count",
        "current",
        "draining",
        "history",
        "history_bytes",
        "idle",
        "last_activity",
        "last_seen",
        "limit_reached",
        "metrics",
        "options",
        "outbox",
        "path",
        "peer",
        "pending",
        "raw_transport",
        "session_id",
        "started",
        "states",
        "tokens_in",
        "tokens_out",
        "transport",
        "transport_io",
        "ws",
    )

    def __init__(self, transport: WebSocketTransport, ws: web.WebSocketResponse, request: web.Request) -> None:
        self.transport = transport
        self.options = transport.options
        self.ws = ws
        self.peer = request.remote
        self.session_id = str(uuid.uuid4())
        self.history: list[HistoryRecord] = []  # at most max_history_bytes of text, but for the newest exchange
        self.history_bytes = 0  # the UTF-8 size of the history's texts
        self.states: dict[str, dict[str, Any]] = {}
        self.count = 0
        self.pending: list[_Pending] = []  # at most max_queued long
        self.current: _Pending | None = None
        self.outbox = Outbox(self.options.send_queue, self._start_writer)
        self.closing = False
        self.limit_reached = False
        self.draining = False
        self.idle = Flag(True)
        self._loop = asyncio.get_running_loop()
        # time.monotonic(), not the loop's clock: _admit takes it from last_seen, at no cost.
        self.last_activity = time.monotonic()  # when the last message came in or was answered
        self.last_seen = self.last_activity  # when a frame last came in (any frame: the heartbeat's clock)
        self._beat: asyncio.TimerHandle | None = None
        self._pinged: float | None = None  # when the unanswered heartbeat ping went out
        self._main: asyncio.Task[Any] | None = None  # the connection's task: reads while idle, answers
        self._reader: asyncio.Task[None] | None = None  # reads while the connection's task waits in an answer
        self._busy = False  # the connection's task is answering
        self._socket_done = False  # the reader task saw the socket end
        self._expiry: asyncio.TimerHandle | None = None
        self._writer: asyncio.Task[None] | None = None
        self._flush_scheduled = False
        self._flusher = transport.flusher
        # The connection's own tasks (reader, writer, closer) run in the context of the
        # handler that accepted it, wherever they are started from (a shared flush callback).
        self._context = contextvars.copy_context()
        self._abort_task: asyncio.Task[Any] | None = None
        self._finished = Flag()
        self.metrics = transport.metrics
        # Frames are written straight to the transport in batches (one system call for
        # many frames); with compression on, aiohttp's writer must frame them instead.
        io = request.transport
        self.raw_transport: asyncio.Transport | None = io if isinstance(io, asyncio.Transport) else None
        if getattr(io, "max_size", 0) > _READ_SIZE:
            io.max_size = _READ_SIZE  # type: ignore[union-attr]
        self.transport_io: asyncio.Transport | None = (
            io if isinstance(io, asyncio.Transport) and not self.options.compress else None
        )
        self.path = transport.connector.path
        self._path_key = transport.path_key
        self.started = time.monotonic()
        self.authenticated = False
        self.close_code: int | None = None
        self.tokens_in = 0
        self.tokens_out = 0
        limit = self.options.rate_limit
        self.bucket = TokenBucket(limit.messages, limit.per) if limit is not None else None

    # --- life cycle -----------------------------------------------------------

    async def run(self, handshake_secret: str | None) -> None:
        """Authenticate, then read until the socket closes; always clean up."""
        self.metrics.connections.inc(self.path)
        self.metrics.connections_open.inc(self.path)
        self._main = task = asyncio.current_task()
        if task is not None:
            task.add_done_callback(_release_cancellation)
        if self.options.heartbeat:
            self._beat = self._loop.call_later(self.options.heartbeat, self._heartbeat)
        try:
            if await self._authenticate(handshake_secret):
                self.authenticated = True
                self.transport.authenticated(self)  # it stops counting against [server] max_unauthenticated
                self.metrics.sessions.inc(self.path)
                self.metrics.sessions_open.inc(self.path)
                log.info("open session=%s peer=%s connector=%s", self.session_id, self.peer, self.path)
                opts = self.options
                self._send_control(
                    Connected(
                        session_id=self.session_id,
                        agents=self.transport.agent_names,
                        streaming=opts.streaming,
                        max_messages=opts.max_messages,
                        session_timeout=_number(opts.session_timeout),
                    )
                )
                self._expiry = self._loop.call_later(
                    self.last_activity + opts.session_timeout - time.monotonic(), self._check_expiry
                )
                await self._serve()
        finally:
            await self._cleanup()

    async def _cleanup(self) -> None:
        # The handler may itself be cancelled here (aiohttp's handler_cancellation),
        # so everything that must happen is in the finally block and does not await.
        try:
            if self._expiry is not None:
                self._expiry.cancel()
            if self._reader is not None:
                self._reader.cancel()
                await asyncio.gather(self._reader, return_exceptions=True)
            if self.closing:
                self._flush()  # write what is queued (the error frame, the close) before waiting
            writer = self._writer
            if writer is not None and not writer.done() and self.closing:
                # A close was requested: let the writer flush the error frame and close.
                await asyncio.wait({writer}, timeout=self.options.send_timeout)
            if writer is not None and not writer.done():
                writer.cancel()
                await asyncio.gather(writer, return_exceptions=True)
            if self._abort_task is not None:
                await asyncio.gather(self._abort_task, return_exceptions=True)
            if not self.ws.closed:
                await self.ws.close()
        finally:
            if self._expiry is not None:
                self._expiry.cancel()
            if self._beat is not None:
                self._beat.cancel()
            if self._reader is not None:
                self._reader.cancel()
            if self._writer is not None:
                self._writer.cancel()
            if not self._finished.is_set():
                self._finished.set()
                self._account_close()
            # Nothing the connection refers to may refer back to it once it has ended, so that
            # reference counting alone frees it, and its history, as soon as it closes.
            self.outbox.detach()
            self._main = self._reader = self._writer = self._abort_task = None

    def _account_close(self) -> None:
        # What connic decided, else the first code the socket sent, else what the client sent.
        code = self.close_code
        if code is None:
            code = getattr(self.ws, "sent_code", None)
        if code is None:
            code = self.ws.close_code
        metrics = self.metrics
        metrics.connections_open.dec(self.path)
        metrics.closes.inc(self.path, str(code))
        if self.authenticated:
            metrics.sessions_open.dec(self.path)
        # One line per connection; never secrets, never message text.
        log.info(
            "close session=%s peer=%s connector=%s code=%s authenticated=%s messages=%d "
            "prompt_tokens=%d candidates_tokens=%d duration=%.3fs",
            self.session_id,
            self.peer,
            self.path,
            code,
            self.authenticated,
            self.count,
            self.tokens_in,
            self.tokens_out,
            time.monotonic() - self.started,
        )

    def close(self, error: Exception | None, code: int | None = None, reason: str = "") -> None:
        """Send ``error`` (a ConnicError with a close code) and close the socket after what is queued."""
        if self.closing:
            return
        close_code = code if code is not None else getattr(error, "close_code", None) or 1000
        reason = getattr(error, "code", reason)
        if error is not None:
            frame = ErrorFrame(id=None, code=reason, message=str(error))
            self.metrics.errors.inc(self.path, reason)
            self.outbox.put_nowait(encode(frame), control=True)
        self.closing = True
        self.close_code = close_code
        if not self.outbox.put_nowait(Close(close_code, reason), control=True):
            self._abort(close_code, reason)

    def _abort(self, code: int, reason: str) -> None:
        """Close now, without waiting for queued frames (the client is not reading)."""
        self.closing = True
        self.close_code = code
        if self._writer is not None:
            self._writer.cancel()
        if self._abort_task is None:
            self._abort_task = self._spawn(self._hard_close(code, reason))

    async def _hard_close(self, code: int, reason: str) -> None:
        try:
            async with asyncio.timeout(_CLOSE_DEADLINE):
                await self.ws.close(code=code, message=reason.encode(), drain=False)
        except (TimeoutError, ConnectionError, RuntimeError):
            pass
        finally:
            # A client that does not read would keep our unsent buffer, and the socket,
            # forever: asyncio's close() waits to flush it. Drop the connection instead.
            raw = self.raw_transport
            if raw is not None and (not raw.is_closing() or raw.get_write_buffer_size()):
                raw.abort()

    async def shutdown(self, grace: float) -> None:
        """Server shutdown: drop queued messages, finish the in-flight one, close 1001."""
        self.draining = True
        for pending in self.pending:
            self._send_control(
                ErrorFrame(id=pending.id, code=ServerShuttingDown.code, message="the server is shutting down")
            )
        self.pending.clear()
        if self.current is None:
            self.idle.set()
        try:
            async with asyncio.timeout(grace):
                await self.idle.wait()
        except TimeoutError:
            current = self.current
            if current is not None:
                current.cancelled = True
                for task in current.tasks.values():
                    task.cancel()
                try:
                    async with asyncio.timeout(1.0):
                        await self.idle.wait()
                except TimeoutError:
                    pass
        self.close(ServerShuttingDown("the server is shutting down"))
        try:
            async with asyncio.timeout(self.options.send_timeout):
                await self._finished.wait()
        except TimeoutError:
            self._abort(1001, ServerShuttingDown.code)

    # --- sending --------------------------------------------------------------

    def _start_writer(self) -> None:
        """Called on every put: make sure what was queued gets written."""
        writer = self._writer
        if self._flush_scheduled or (writer is not None and not writer.done()):
            return  # a flush or a writer task will take it
        if self.transport_io is None:
            self._writer = self._spawn(self._write_loop())
        else:
            # A plain callback, not a task, shared with the other connections served in
            # this round of the loop: after the current step, everything queued meanwhile
            # (a whole burst of chunks) goes out in one write.
            self._flush_scheduled = True
            self._flusher.add(self._loop, self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        self._ensure_reader()  # if an answer is waiting, read beside it
        writer = self._writer
        transport = self.transport_io
        if transport is None or (writer is not None and not writer.done()) or not self.outbox.items:
            return
        try:
            if transport.is_closing():
                self.closing = True
                self.outbox.take_all()
                return
            if transport.get_write_buffer_size() > _HIGH_WATER:
                # The writer task waits for the client to catch up.
                self._writer = self._spawn(self._write_loop())
                return
            close = self._write_now(transport)
        except Exception:
            log.exception("session %s: sending failed; closing 1011", self.session_id)
            self._abort(1011, "internal_error")
            return
        if close is not None:
            self._writer = self._spawn(self._close_socket(close))

    def _write_now(self, transport: asyncio.Transport) -> Close | None:
        """Write everything queued in one call; return a close met on the way (nothing after it is sent)."""
        batch: list[bytes] = []
        for item in self.outbox.take_all():
            if type(item) is str:
                # text_frame(item), with header and payload joined once, in the batch.
                try:
                    payload = item.encode()
                except UnicodeEncodeError:
                    batch.append(text_frame(item))
                    continue
                batch.append(text_header(len(payload)))
                batch.append(payload)
            else:
                assert isinstance(item, Close)
                if batch:
                    transport.write(b"".join(batch))
                return item
        if batch:
            transport.write(b"".join(batch))
        return None

    async def _close_socket(self, close: Close) -> None:
        with contextlib.suppress(ConnectionError, RuntimeError):
            await self.ws.close(code=close.code, message=close.reason.encode())

    async def _write_loop(self) -> None:
        """The slow path: compression on, or a client behind on reading."""
        ws = self.ws
        transport = self.transport_io
        try:
            while self.outbox.items:
                if transport is None:  # compression on: aiohttp frames each message itself
                    for item in self.outbox.take_all():
                        if isinstance(item, Close):
                            await ws.close(code=item.code, message=item.reason.encode())
                            return
                        await ws.send_str(sendable(item))
                    continue
                while transport.get_write_buffer_size() > _HIGH_WATER:
                    # The client is behind: wait for the kernel to take our buffer. The outbox
                    # fills meanwhile, and a client that never catches up becomes a slow consumer.
                    if transport.is_closing():
                        raise ConnectionResetError("the connection is closing")
                    await asyncio.sleep(0.005)
                if transport.is_closing():
                    raise ConnectionResetError("the connection is closing")
                close = self._write_now(transport)
                if close is not None:
                    await ws.close(code=close.code, message=close.reason.encode())
                    return
        except (ConnectionError, RuntimeError):
            # The socket closed under us; whoever is reading sees it and ends.
            self.closing = True
        except Exception:
            log.exception("session %s: sending failed; closing 1011", self.session_id)
            self._abort(1011, "internal_error")

    def _send_control(self, frame: ServerFrame) -> None:
        if self.closing:
            return
        if type(frame) is ErrorFrame:
            self.metrics.errors.inc(self.path, frame.code)
        if not self.outbox.put_nowait(encode(frame), control=True):
            self._slow_consumer()

    def _slow_consumer(self) -> None:
        if not self.closing:
            self.metrics.slow_consumers.inc(self.path)
            log.warning("session %s: client %s stopped reading; closing 4010", self.session_id, self.peer)
            self._abort(SlowConsumer.close_code or 4010, SlowConsumer.code)

    # --- reading --------------------------------------------------------------

    async def _authenticate(self, handshake_secret: str | None) -> bool:
        opts = self.options
        if not opts.require_auth:
            return True
        if handshake_secret is not None:
            if self.transport.check_secret(handshake_secret):
                return True
            self.close(Unauthorized("wrong secret"))
            return False
        try:
            # One deadline for the whole wait: pings and pongs come through receive(), and a
            # per-receive timeout would restart with each of them.
            async with asyncio.timeout(opts.auth_timeout):
                msg = await self.ws.receive()
                while msg.type is WSMsgType.PING or msg.type is WSMsgType.PONG:
                    self._dispatch(msg.type, msg.data)
                    msg = await self.ws.receive()
        except TimeoutError:
            self.close(AuthTimeout(f"no authentication within {opts.auth_timeout:g} s"))
            return False
        if msg.type is WSMsgType.TEXT:
            try:
                frame = parse_client_frame(msg.data)
            except ProtocolError:
                frame = None
            if isinstance(frame, AuthFrame):
                if self.transport.check_secret(frame.secret):
                    self._lift_auth_bound()
                    return True
                self.close(Unauthorized("wrong secret" if frame.secret else "missing secret"))
                return False
        if msg.type in (WSMsgType.TEXT, WSMsgType.BINARY):
            self.close(Unauthorized('the first frame must authenticate: {"secret": "..."}'))
        return False

    def _lift_auth_bound(self) -> None:
        # Frames up to max_frame_bytes from now on (until now: max_auth_frame_bytes).
        lift = getattr(self.ws, "authenticated", None)
        if lift is not None:
            lift()

    async def _serve(self) -> None:
        """Read and answer until the socket closes (see the module docstring)."""
        ws = self.ws
        outbox = self.outbox
        try:
            while True:
                msg = await ws.receive()
                if not self._dispatch(msg.type, msg.data):
                    return
                if self.pending:
                    await self._answer_pending()
                if self.limit_reached and not self.pending:
                    self.close(None, MessageLimitReached.close_code, MessageLimitReached.code)
                if self._reader is not None and not await self._take_back_reading():
                    return
                # aiohttp hands over buffered frames without suspending; when the outbox is
                # full, let the flush run (and wait, if the client is behind) before reading on.
                if len(outbox.items) >= outbox.limit and not self.closing:
                    await self._catch_up()
        except asyncio.CancelledError:
            # The reader task cancels this one when the socket ends under an answer.
            task = self._main
            if self._socket_done and task is not None and task.uncancel() == 0:
                return
            raise

    def _dispatch(self, kind: WSMsgType, data: Any) -> bool:
        """Handle one received message; False once the socket is done."""
        self.last_seen = time.monotonic()
        if kind is WSMsgType.TEXT:
            try:
                frame = parse_client_frame(data)
            except ProtocolError as exc:
                self._reject(exc, getattr(exc, "message_id", None))
                return True
            if type(frame) is MessageFrame:
                self._admit(frame)
            else:
                self._on_other(frame)
        elif kind is WSMsgType.BINARY:
            self._reject(UnsupportedFrame("binary frames are not supported; send JSON text frames"))
        elif kind is WSMsgType.PING:
            self._write_control(0x8A, data)  # pong, with the ping's payload
        elif kind in _ENDED:
            return False
        return True

    # --- keepalive ------------------------------------------------------------
    # connic's own rather than aiohttp's heartbeat: aiohttp's schedules a callback for
    # every chunk received, a twentieth of a quick turn's cost; this one keeps a
    # timestamp and one timer that fires only when the connection has gone quiet.

    def _heartbeat(self) -> None:
        self._beat = None
        if self.closing:
            return
        interval = self.options.heartbeat
        now = time.monotonic()
        if self._pinged is not None:
            if self.last_seen < self._pinged:
                self._drop_silent(interval)
                return
            self._pinged = None  # the pong (or anything else) came back
        quiet = now - self.last_seen
        if quiet < interval:
            self._beat = self._loop.call_later(interval - quiet, self._heartbeat)
            return
        self._pinged = now
        self._write_control(0x89, b"")
        self._beat = self._loop.call_later(interval / 2, self._heartbeat)

    def _write_control(self, opcode: int, payload: bytes) -> None:
        """Write a ping or pong now: control frames may go between any two messages."""
        raw = self.raw_transport
        # A client that sends pings but does not read gets no pongs (nor unbounded buffers).
        if raw is not None and not raw.is_closing() and raw.get_write_buffer_size() <= _HIGH_WATER:
            raw.write(bytes((opcode, len(payload))) + payload)

    def _drop_silent(self, interval: float) -> None:
        """No pong within half the heartbeat: drop the connection without a close frame (1006)."""
        log.info("session %s: no pong within %g s of a ping; dropping", self.session_id, interval / 2)
        self.closing = True
        self.close_code = 1006
        raw = self.raw_transport
        if raw is not None:
            raw.abort()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Start one of the connection's own tasks, in the context of the handler that accepted it."""
        return asyncio.create_task(coro, context=self._context)

    def _start_reader(self) -> None:
        if not self.ws.closed:
            self._reader = self._spawn(self._read_beside())

    def _ensure_reader(self) -> None:
        if self._busy and self._reader is None:
            self._start_reader()

    async def _read_beside(self) -> None:
        """Read while the connection's task waits in an answer; cancelled when it takes reading back."""
        ws = self.ws
        outbox = self.outbox
        try:
            while True:
                msg = await ws.receive()
                if not self._dispatch(msg.type, msg.data):
                    break
                if len(outbox.items) >= outbox.limit and not self.closing:
                    await self._catch_up()
        except Exception:
            log.exception("session %s: reading failed; closing", self.session_id)
        self._socket_done = True
        if self._busy and self._main is not None:
            self._main.cancel()  # what was being answered goes to no one

    async def _catch_up(self) -> None:
        if not await self.outbox.wait_for_room(self.options.send_timeout):
            self._slow_consumer()

    async def _take_back_reading(self) -> bool:
        """Stop the reader task now that nothing waits to be answered; False if the socket ended."""
        reader = self._reader
        assert reader is not None
        if not reader.done():
            # It waits in receive() (cancelling that loses nothing: the data stays queued)
            # or for room in the outbox; when closing, it is inside aiohttp's close
            # handshake, which it is left to finish.
            if not self.ws.closed:
                reader.cancel()
            await asyncio.wait({reader})
        self._reader = None
        return not self._socket_done

    def _reject(self, error: ConnicError, message_id: MessageId | None = None) -> None:
        retry_after = getattr(error, "retry_after", None)
        self._send_control(ErrorFrame(id=message_id, code=error.code, message=error.message, retry_after=retry_after))

    def _on_other(self, frame: ClientFrame) -> None:
        """A client frame other than a message."""
        if isinstance(frame, CancelFrame):
            self._cancel(frame.id)
        elif isinstance(frame, PingFrame):
            self._send_control(Pong())
        # An auth frame once authenticated (or with auth off) is ignored, as the seed expects.

    def _admit(self, frame: MessageFrame) -> None:
        opts = self.options
        if self.draining:
            self._reject(ServerShuttingDown("the server is shutting down"), frame.id)
            return
        if self.limit_reached or self.count >= opts.max_messages:
            error = MessageLimitReached(f"this session reached its limit of {opts.max_messages} messages")
            self._send_control(ErrorFrame(id=frame.id, code=error.code, message=error.message))
            self.limit_reached = True  # the connection's task closes once the queue is answered
            return
        if self.bucket is not None:
            wait = self.bucket.take()
            if wait:
                self.metrics.rate_limited.inc(self.path)
                retry_after = math.ceil(wait * 1000) / 1000  # never 0: that would say "retry now"
                limited = RateLimited(f"over the rate limit; retry in {retry_after:.3f} s", retry_after=retry_after)
                self._reject(limited, frame.id)
                return
        if frame.agent is not None and frame.agent not in self.transport.chains:
            names = ", ".join(self.transport.agent_names)
            self._reject(UnknownAgent(f"no agent {frame.agent!r} on this connector (agents: {names})"), frame.id)
            return
        # With none being answered, the first pending message is about to be: it waits behind nothing.
        waiting = len(self.pending) - (1 if self.current is None and self.pending else 0)
        if waiting >= opts.max_queued:
            self._reject(QueueFull(f"{waiting} messages are already waiting to be answered"), frame.id)
            return
        self.count += 1
        self.metrics.messages.add(self._path_key)
        message_id = frame.id if frame.id is not None else f"auto-{self.count}"
        self.last_activity = self.last_seen  # set by _dispatch, just now
        self.pending.append(_Pending(self, frame, message_id, self.count))
        self.idle.clear()
        # The ack's flush runs once the connection's task pauses: a quick answer leaves in
        # the same write as its ack, which still goes first.
        if not self.closing and not self.outbox.put_nowait(encode_ack(message_id, self.count), control=True):
            self._slow_consumer()

    def _cancel(self, message_id: MessageId) -> None:
        current = self.current
        if current is not None and current.id == message_id:
            running = [(name, t) for name, t in current.tasks.items() if not t.done()]
            if running:
                current.cancelled = True
                for name, task in running:
                    if current.started is not None and name not in current.started:
                        # Cancelled before its first step, the task would never run its
                        # serialiser: end this agent's reply here instead.
                        self._end_unstarted(current, name)
                    task.cancel()
                return
        queued = [p for p in self.pending if p.id == message_id]
        if queued:
            for pending in queued:
                self.pending.remove(pending)
            if not self.pending and self.current is None:
                self.idle.set()
            return
        self._reject(NotFound(f"no queued or in-flight message has id {message_id!r}"), message_id)

    def _end_unstarted(self, pending: _Pending, agent: str) -> None:
        usage = {"prompt_tokens": 0, "candidates_tokens": 0}
        if self.options.streaming:
            self._send_control(StreamStart(id=pending.id, agent=agent))
            self._send_control(StreamEnd(pending.id, agent, "", usage, "cancelled"))
        else:
            self._send_control(Response(pending.id, agent, "", usage, "cancelled"))

    # --- answering ------------------------------------------------------------

    async def _answer_pending(self) -> None:
        """Answer queued messages, oldest first, until none is left."""
        self._busy = True
        if not self._flush_scheduled:
            # The flush callback starts a reader if an answer waits; without one queued, ask directly.
            self._loop.call_soon(self._ensure_reader)
        chains = self.transport.chains
        try:
            while self.pending and not self._socket_done:
                pending = self.pending.pop(0)
                self.current = pending
                try:
                    frame = pending.frame
                    pending.at = time.monotonic()
                    history = HistoryView(self.history)
                    if frame.agent is not None or len(chains) == 1:
                        # One agent: run it in this task rather than a task of its own (cheaper per
                        # message); a cancel of this message cancels this task, and it carries on.
                        # (Answered here, not in a coroutine of its own: one fewer per message.)
                        name = frame.agent if frame.agent is not None else self.transport.agent_names[0]
                        task = self._main
                        assert task is not None
                        pending.tasks[name] = task
                        names: tuple[str, ...] = (name,)
                        try:
                            await chains[name](self._turn(pending, name, history), pending.emit, task)
                        except asyncio.CancelledError:
                            if not pending.cancelled or task.uncancel() > 0:
                                raise
                    else:
                        names = self.transport.agent_names
                        await self._answer_all(pending, history)
                    entries = self.history
                    newest = len(entries)
                    entries.append(("user", frame.text, None))
                    added = _utf8_size(frame.text)
                    for name in names:
                        text = pending.results.get(name)
                        if text:
                            entries.append(("agent", text, name))
                            added += _utf8_size(text)
                    self.history_bytes += added
                    if self.history_bytes > self.options.max_history_bytes:
                        self._trim_history(newest)
                finally:
                    self.current = None
                    self.last_activity = time.monotonic()
        finally:
            self._busy = False
            if not self.pending:
                self.idle.set()

    def _trim_history(self, newest: int) -> None:
        """Drop the oldest entries until the history fits ``max_history_bytes``.

        The exchange that starts at index ``newest`` (the one just answered) is kept
        whole, even when it alone is over the bound. The kept entries go into a new
        list: a HistoryView handed out earlier is a prefix view of the old one, which
        must not change under it.
        """
        entries = self.history
        size = self.history_bytes
        bound = self.options.max_history_bytes
        start = 0
        while start < newest and size > bound:
            size -= _utf8_size(entries[start][1])
            start += 1
        self.history = entries[start:]
        self.history_bytes = size

    async def _answer_all(self, pending: _Pending, history: HistoryView) -> None:
        """Every agent answers ``pending``, each in a task of its own, concurrently."""
        chains = self.transport.chains
        started: set[str] = set()
        pending.started = started

        async def run(turn: Turn) -> None:
            started.add(turn.agent)
            await chains[turn.agent](turn, pending.emit)

        try:
            async with asyncio.TaskGroup() as group:
                for name in self.transport.agent_names:
                    task = pending.tasks[name] = group.create_task(run(self._turn(pending, name, history)))
                    task.add_done_callback(_release_cancellation)
        except BaseException as exc:
            # The TaskGroup's __aexit__ frame, in the error's traceback, keeps the error in a
            # local: a reference cycle through this connection's frames (CPython 3.11).
            traceback.clear_frames(exc.__traceback__)
            raise

    def _turn(self, pending: _Pending, agent: str, history: HistoryView) -> Turn:
        frame = pending.frame
        state = self.states.get(agent)
        if state is None:
            state = self.states[agent] = {}
        return new_turn(
            pending.id,
            pending.number,
            frame.text,
            frame.context,
            frame.files,
            new_session(self.session_id, history, state),
            agent,
            self.options.streaming,
        )

    def _check_expiry(self) -> None:
        timeout = self.options.session_timeout
        left = self.last_activity + timeout - time.monotonic()
        if left > 0:
            self._expiry = self._loop.call_later(left, self._check_expiry)
        elif not self.idle.is_set():
            # A reply is in flight; its end counts as activity, so look again later.
            self._expiry = self._loop.call_later(timeout, self._check_expiry)
        else:
            self._expiry = None
            self.close(SessionExpired(f"session expired after {timeout:g} s without a message"))


_HIGH_WATER = 64 * 1024
# The most one read of the socket takes. asyncio's selector transport reads up to
# 256 KiB at a time into a new bytes object: above glibc's mmap threshold, so a
# process can settle into mapping, shrinking and unmapping that buffer (page faults
# included) for every small frame it reads, a fifth of a quick turn's server time
# (CPython issue 85451; docs/performance.md). 64 KiB is served from the heap.
_READ_SIZE = 64 * 1024
_ENDED = (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR)
_CLOSE_DEADLINE = 3.0  # seconds a slow consumer gets to take the close frame before the socket is dropped


def _utf8_size(text: str) -> int:
    """The size of ``text`` in UTF-8 (lone surrogates, which JSON lets a client send, count 3 bytes)."""
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def _release_cancellation(task: asyncio.Task[Any]) -> None:
    """Take the CancelledError of a cancelled task nobody awaits.

    A cancelled task keeps its CancelledError until someone asks for it, and the
    error's traceback holds the frames of everything it went through, the
    connection's included, while something in those frames refers back to the task
    (aiohttp's request to the handler's task, when aiohttp cancels it under
    ``handler_cancellation``; a message's ``tasks`` to its agents' tasks): the
    connection would live until the cyclic garbage collector ran.
    """
    if task.cancelled():
        with contextlib.suppress(asyncio.CancelledError):
            task.exception()


def _number(value: float) -> float | int:
    return int(value) if float(value).is_integer() else value
