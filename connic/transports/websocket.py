"""The ``websocket`` transport: the Connic WebSocket connector (PROTOCOL.md)."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import attrs
from aiohttp import web

from connic.agent import Agent
from connic.config import ConnectorConfig, at_least_one, in_range, non_negative, positive
from connic.errors import StoreUnavailable, Unauthorized
from connic.gate import Slot
from connic.middleware import MiddlewareFunc
from connic.transports._aiohttp_raw import Socket
from connic.transports.session_transport import RateLimit, SessionTransport, SessionTransportOptions
from connic.transports.ws_connection import Connection

__all__ = ["RateLimit", "WebSocketTransport"]

log = logging.getLogger("connic.websocket")

SECRET_HEADER = "X-Connic-Secret"
SECRET_QUERY = ("secret", "X-Connic-Secret")


class _Handshake:
    """The handshake being handled: whose it is, and whether a failed authentication was counted."""

    __slots__ = ("counted", "peer")

    def __init__(self, peer: str) -> None:
        self.peer = peer
        self.counted = False


# The connection authenticates in the task of the handler that accepted it, so
# check_secret learns whose secret it compares from here, without ws_session
# passing the address along.
_HANDSHAKE: contextvars.ContextVar[_Handshake | None] = contextvars.ContextVar("connic_handshake", default=None)


class WebSocketTransport(SessionTransport):
    """The Connic WebSocket connector: streaming chat with sessions."""

    @attrs.frozen
    class Options(SessionTransportOptions):
        """A websocket connector's keys (see docs/configuration.md): the shared ones and its own."""

        progress_events: bool = False
        resume_window: float = attrs.field(default=120.0, validator=[non_negative, in_range(0, 86400)])
        on_disconnect: Literal["continue", "cancel"] = "continue"
        auth_timeout: float = attrs.field(default=10.0, validator=positive)
        heartbeat: float = attrs.field(default=30.0, validator=non_negative)
        max_frame_bytes: int = attrs.field(default=1024 * 1024, validator=at_least_one)
        compress: bool = False
        max_auth_frame_bytes: int = attrs.field(default=16 * 1024, validator=at_least_one)

    options: Options

    def __init__(
        self,
        *,
        connector: ConnectorConfig,
        options: Any,
        agents: Mapping[str, Agent],
        middleware: Sequence[MiddlewareFunc],
        where: str,
        key: str,
    ) -> None:
        super().__init__(
            connector=connector, options=options, agents=agents, middleware=middleware, where=where, key=key
        )
        self.connections: set[Connection] = set()
        self.unauthenticated: dict[Connection, Slot] = {}  # their slots in the gate, counted as unauthenticated
        self.draining = False

    def install(self, app: web.Application) -> None:
        """Serve the connector's path."""
        app.router.add_get(self.connector.path, self.handle)

    def check_secret(self, secret: str | None) -> bool:
        """Constant-time comparison against every configured secret.

        Any string is compared, even one that is not valid Unicode text (a lone
        surrogate from JSON's ``"\\ud800"``, or header bytes that are not UTF-8,
        which aiohttp decodes with ``surrogateescape``): such a secret is simply wrong.

        Inside a handshake's handler, a wrong secret counts against the client's
        address in the throttle at once, and once that address is braked nothing
        is compared any more: guesses already on their way on other sockets opened
        earlier fail too.
        """
        handshake = _HANDSHAKE.get()
        if handshake is not None and self.throttle.retry_after(handshake.peer) is not None:
            return False
        ok = self.secret_matches(secret)
        if not ok and handshake is not None and not handshake.counted:
            handshake.counted = True
            self.throttle.failed(handshake.peer)
        return ok

    def auth_frame_bytes(self, request: web.Request) -> int | None:
        """The frame size bound before authentication; None when the handshake already authenticated."""
        opts = self.options
        if not opts.require_auth or opts.max_auth_frame_bytes >= opts.max_frame_bytes:
            return None
        if self.check_secret(self.handshake_secret(request)):
            return None
        return opts.max_auth_frame_bytes

    def handshake_secret(self, request: web.Request) -> str | None:
        """The secret given at the handshake (header or query), if any."""
        secret = request.headers.get(SECRET_HEADER)
        if secret is None:
            for name in SECRET_QUERY:
                secret = request.query.get(name)
                if secret is not None:
                    break
        return secret

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """The aiohttp handler of the connector's path."""
        path = self.connector.path
        opts = self.options
        if not self.origin_allowed(request.headers.get("Origin"), request.headers.get("Host")):
            self.metrics.refused.inc(path, "403")
            hint = "" if opts.require_auth or opts.allowed_origins else " (auth is off: list it in allowed_origins)"
            raise web.HTTPForbidden(text=f"origin not allowed{hint}\n")
        if self.draining:
            self.metrics.refused.inc(path, "503")
            raise web.HTTPServiceUnavailable(text="server is shutting down\n")
        if not await self.store.available():
            # Refused before the upgrade: a session could be neither opened nor resumed (PROTOCOL.md §7).
            self.metrics.refused.inc(path, "503")
            raise web.HTTPServiceUnavailable(text="the session store cannot be reached\n", headers={"Retry-After": "5"})
        opts = self.options
        ws = Socket(
            autoping=False,  # the connection answers pings and keeps its own heartbeat (ws_connection)
            max_msg_size=opts.max_frame_bytes + 1,  # aiohttp refuses sizes >= max_msg_size
            compress=opts.compress,
            timeout=2.0,
            auth_frame_bytes=self.auth_frame_bytes(request),
            counted=lambda code: self.metrics.errors.inc(path, code),
        )
        if not ws.can_prepare(request).ok:
            raise web.HTTPBadRequest(text=f"this is a WebSocket endpoint: connect with ws://...{self.connector.path}\n")
        peer = request.remote or "unknown"
        # Before any secret is looked at: a braked address learns nothing, even with the right one.
        wait = self.throttle.retry_after(peer)
        if wait is not None:
            self.metrics.refused.inc(path, "429")
            raise web.HTTPTooManyRequests(
                text="too many failed authentications from your address\n",
                headers={"Retry-After": str(max(1, math.ceil(wait)))},
            )
        handshake = _Handshake(peer)
        _HANDSHAKE.set(handshake)  # this handler's own context: aiohttp runs each in a task of its own
        secret = self.handshake_secret(request)
        # A handshake that brings a valid secret (or needs none) is never unauthenticated.
        authenticated = not opts.require_auth or (secret is not None and self.check_secret(secret))
        slot = self.gate.enter(peer, authenticated=authenticated, evict=lambda: _drop(request))
        if isinstance(slot, int):
            self.metrics.refused.inc(path, str(slot))
            if slot == 503:
                raise web.HTTPServiceUnavailable(text="too many connections\n", headers={"Retry-After": "5"})
            raise web.HTTPTooManyRequests(text="too many connections from your address\n", headers={"Retry-After": "5"})
        conn: Connection | None = None
        ticket: str | None = None
        try:
            ticket = await self._admit_fleet(peer, path)
            await ws.prepare(request)
            conn = Connection(self, ws, request)
            self.connections.add(conn)
            if slot.unauthenticated:
                self.unauthenticated[conn] = slot
            await conn.run(secret)
        finally:
            if conn is not None:
                self.connections.discard(conn)
                self.unauthenticated.pop(conn, None)
            self.gate.leave(slot)
            if ticket:
                self.store.release_connection(ticket)
            # A 4001 without a wrong secret compared (none given, a message first) fails too.
            if conn is not None and conn.writer.close_code == Unauthorized.close_code and not handshake.counted:
                handshake.counted = True
                self.throttle.failed(peer)
        return ws

    async def _admit_fleet(self, peer: str, path: str) -> str:
        """Count the connection in ``max_connections_per_ip`` across every process sharing the store.

        Its ticket for :meth:`SessionStore.release_connection` (empty: nothing to release);
        raises the 429 over the cap, or the 503 when the store cannot say.
        """
        limit = self.gate.max_per_ip
        if not limit:
            return ""
        try:
            ticket = await self.store.admit_connection(peer, limit)
        except StoreUnavailable:
            self.metrics.refused.inc(path, "503")
            raise web.HTTPServiceUnavailable(
                text="the session store cannot be reached\n", headers={"Retry-After": "5"}
            ) from None
        if ticket is None:
            self.metrics.refused.inc(path, "429")
            raise web.HTTPTooManyRequests(text="too many connections from your address\n", headers={"Retry-After": "5"})
        return ticket

    def authenticated(self, conn: Connection) -> None:
        """``conn`` has authenticated: it no longer counts against ``max_unauthenticated``."""
        slot = self.unauthenticated.pop(conn, None)
        if slot is not None:
            self.gate.authenticated(slot)

    async def shutdown(self, grace: float) -> None:
        """Drain every session in parallel (finish in-flight replies for up to ``grace``), then close 1001."""
        self.draining = True
        sessions = self.sessions
        conns = list(self.connections)
        if conns:
            log.info("closing %d connection(s) on %s (grace %g s)", len(conns), self.connector.path, grace)
        await sessions.shutdown(grace)
        await asyncio.gather(*(c.shutdown() for c in conns), return_exceptions=True)


def _drop(request: web.Request) -> None:
    """Push out an unauthenticated connection to make room (ConnectionGate): at once, without a close frame.

    Its handler then ends within a round of the loop, so its place in ``max_connections`` frees
    as fast as squatters can take it.
    """
    transport = request.transport
    if transport is not None:
        transport.abort()
