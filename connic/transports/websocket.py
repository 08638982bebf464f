"""The ``websocket`` transport: the Connic WebSocket connector (PROTOCOL.md)."""

from __future__ import annotations

import asyncio
import fnmatch
import hmac
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import attrs
from aiohttp import web

from connic.agent import Agent
from connic.config import ConnectorConfig, in_range, non_negative, positive
from connic.errors import ConfigError
from connic.middleware import MiddlewareFunc
from connic.pipeline import TurnChain, build_turn_chain
from connic.session import Sessions
from connic.transport import Transport
from connic.transports._aiohttp_raw import Socket
from connic.transports.ws_connection import Connection

__all__ = ["RateLimit", "WebSocketTransport"]

log = logging.getLogger("connic.websocket")

SECRET_HEADER = "X-Connic-Secret"
SECRET_QUERY = ("secret", "X-Connic-Secret")


def _at_least_one(_: object, attribute: attrs.Attribute[Any], value: int) -> None:
    if value < 1:
        raise ValueError(f"{attribute.name} must be at least 1, got {value!r}")


@attrs.frozen
class RateLimit:
    """A token bucket: at most ``messages`` messages per ``per`` seconds, refilled smoothly."""

    messages: int = attrs.field(validator=_at_least_one)
    per: float = attrs.field(validator=positive)


class WebSocketTransport(Transport):
    """The Connic WebSocket connector: streaming chat with sessions."""

    @attrs.frozen
    class Options:
        """A websocket connector's own keys (see docs/configuration.md)."""

        streaming: bool = True
        require_auth: bool = True
        secrets: tuple[str, ...] = ()
        session_timeout: float = attrs.field(default=3600.0, validator=[positive, in_range(0, 86400)])
        max_messages: int = attrs.field(default=100, validator=in_range(1, 10_000))
        auth_timeout: float = attrs.field(default=10.0, validator=positive)
        allowed_origins: tuple[str, ...] = ()
        heartbeat: float = attrs.field(default=30.0, validator=non_negative)
        max_frame_bytes: int = attrs.field(default=1024 * 1024, validator=_at_least_one)
        max_queued: int = attrs.field(default=10, validator=_at_least_one)
        agent_timeout: float = attrs.field(default=300.0, validator=positive)
        send_queue: int = attrs.field(default=256, validator=_at_least_one)
        send_timeout: float = attrs.field(default=30.0, validator=positive)
        compress: bool = False
        rate_limit: RateLimit | None = None
        resume_window: float = attrs.field(default=120.0, validator=[non_negative, in_range(0, 86400)])
        replay_buffer: int = attrs.field(default=4096, validator=in_range(1, 1_000_000))
        on_disconnect: Literal["continue", "cancel"] = "continue"
        producer_timeout: float = attrs.field(default=10.0, validator=positive)
        max_auth_frame_bytes: int = attrs.field(default=16 * 1024, validator=_at_least_one)
        max_history_bytes: int = attrs.field(default=4 * 1024 * 1024, validator=_at_least_one)

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
        env_secret = os.environ.get("CONNIC_SECRET")
        secrets = [*self.options.secrets, *([env_secret] if env_secret else [])]
        if any(not s for s in secrets):
            raise ConfigError(f"{where}: {key}.secrets: a secret must not be empty")
        if self.options.require_auth and not secrets:
            raise ConfigError(
                f"{where}: {key}.secrets: require_auth is on but no secret is configured "
                "(set secrets, the CONNIC_SECRET environment variable, or require_auth = false)"
            )
        self._secrets = [s.encode() for s in secrets]
        self.agent_names = tuple(agents)
        self.chains: dict[str, TurnChain] = {
            name: build_turn_chain(
                agent,
                streaming_on=self.options.streaming,
                agent_timeout=self.options.agent_timeout,
                user_middleware=self.middleware,
            )
            for name, agent in agents.items()
        }
        self.connections: set[Connection] = set()
        self.draining = False
        self._sessions: Sessions | None = None

    @property
    def sessions(self) -> Sessions:
        """This connector's sessions (made once the runtime has given the transport its store and metrics)."""
        if self._sessions is None:
            self._sessions = Sessions(
                label=self.connector.path,
                chains=self.chains,
                options=self.options,
                metrics=self.metrics,
                store=self.store,
            )
        return self._sessions

    def install(self, app: web.Application) -> None:
        """Serve the connector's path."""
        app.router.add_get(self.connector.path, self.handle)

    def check_secret(self, secret: str | None) -> bool:
        """Constant-time comparison against every configured secret.

        Any string is compared, even one that is not valid Unicode text (a lone
        surrogate from JSON's ``"\\ud800"``, or header bytes that are not UTF-8,
        which aiohttp decodes with ``surrogateescape``): such a secret is simply wrong.
        """
        if secret is None:
            return False
        given = secret.encode("utf-8", "surrogatepass")
        ok = False
        for candidate in self._secrets:
            ok |= hmac.compare_digest(given, candidate)
        return ok

    def auth_frame_bytes(self, request: web.Request) -> int | None:
        """The frame size bound before authentication; None when the handshake already authenticated."""
        opts = self.options
        if not opts.require_auth or opts.max_auth_frame_bytes >= opts.max_frame_bytes:
            return None
        if self.check_secret(self.handshake_secret(request)):
            return None
        return opts.max_auth_frame_bytes

    def origin_allowed(self, origin: str | None) -> bool:
        """Whether a handshake with this ``Origin`` header may upgrade."""
        patterns = self.options.allowed_origins
        if not patterns or origin is None:
            return True
        origin = origin.lower()
        return any(fnmatch.fnmatchcase(origin, p.lower()) for p in patterns)

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
        if not self.origin_allowed(request.headers.get("Origin")):
            self.metrics.refused.inc(self.connector.path, "403")
            raise web.HTTPForbidden(text="origin not allowed\n")
        path = self.connector.path
        if self.draining:
            self.metrics.refused.inc(path, "503")
            raise web.HTTPServiceUnavailable(text="server is shutting down\n")
        opts = self.options
        ws = Socket(
            autoping=False,  # the connection answers pings and keeps its own heartbeat (ws_connection)
            max_msg_size=opts.max_frame_bytes + 1,  # aiohttp refuses sizes >= max_msg_size
            compress=opts.compress,
            timeout=2.0,
            auth_frame_bytes=self.auth_frame_bytes(request),
        )
        if not ws.can_prepare(request).ok:
            raise web.HTTPBadRequest(text=f"this is a WebSocket endpoint: connect with ws://...{self.connector.path}\n")
        peer = request.remote or "unknown"
        refusal = self.gate.enter(peer)
        if refusal is not None:
            self.metrics.refused.inc(path, str(refusal))
            if refusal == 503:
                raise web.HTTPServiceUnavailable(text="too many connections\n", headers={"Retry-After": "5"})
            raise web.HTTPTooManyRequests(text="too many connections from your address\n", headers={"Retry-After": "5"})
        try:
            await ws.prepare(request)
            conn = Connection(self, ws, request)
            self.connections.add(conn)
            try:
                await conn.run(self.handshake_secret(request))
            finally:
                self.connections.discard(conn)
        finally:
            self.gate.leave(peer)
        return ws

    async def shutdown(self, grace: float) -> None:
        """Drain every session in parallel (finish in-flight replies for up to ``grace``), then close 1001."""
        self.draining = True
        sessions = self.sessions
        conns = list(self.connections)
        if conns:
            log.info("closing %d connection(s) on %s (grace %g s)", len(conns), self.connector.path, grace)
        await sessions.shutdown(grace)
        await asyncio.gather(*(c.shutdown() for c in conns), return_exceptions=True)
