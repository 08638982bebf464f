"""What the transports built on the session core share: secrets, origins, turn chains, the auth brake, sessions.

:class:`SessionTransport` is the base of the ``websocket`` and ``agui`` transports:
it checks the configured secrets at start-up, decides which browser origins may
connect, builds one turn chain per agent, keeps the per-address brake on failed
authentications, and makes the connector's :class:`~connic.sessions.Sessions` once
the runtime has given the transport its store and metrics. Its ``Options`` derive
from :class:`SessionTransportOptions`, the keys both transports share.
"""

from __future__ import annotations

import fnmatch
import hmac
import ipaddress
import os
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

import attrs

from connic.agent import Agent
from connic.config import ConnectorConfig, at_least_one, in_range, non_negative, positive
from connic.errors import ConfigError
from connic.middleware import MiddlewareFunc
from connic.pipeline import TurnChain, build_turn_chain
from connic.sessions import Sessions
from connic.throttle import AuthThrottle
from connic.transport import Transport

__all__ = ["RateLimit", "SessionTransport", "SessionTransportOptions", "local_origin"]


@attrs.frozen
class RateLimit:
    """A token bucket: at most ``messages`` messages per ``per`` seconds, refilled smoothly."""

    messages: int = attrs.field(validator=at_least_one)
    per: float = attrs.field(validator=positive)


@attrs.frozen
class SessionTransportOptions:
    """The keys every session transport has, with one meaning and one default on each (docs/configuration.md).

    A transport's ``Options`` derive from this and add the rest of what
    :class:`~connic.sessions.SessionOptions` asks for (``progress_events``,
    ``resume_window`` and ``on_disconnect``, whose defaults differ between transports),
    then their own keys.
    """

    streaming: bool = True
    require_auth: bool = True
    secrets: tuple[str, ...] = ()
    allowed_origins: tuple[str, ...] = ()
    session_timeout: float = attrs.field(default=3600.0, validator=[positive, in_range(0, 86400)])
    max_messages: int = attrs.field(default=100, validator=in_range(1, 10_000))
    max_queued: int = attrs.field(default=10, validator=at_least_one)
    agent_timeout: float = attrs.field(default=300.0, validator=positive)
    send_queue: int = attrs.field(default=256, validator=at_least_one)
    send_timeout: float = attrs.field(default=30.0, validator=positive)
    rate_limit: RateLimit | None = None
    replay_buffer: int = attrs.field(default=4096, validator=in_range(1, 1_000_000))
    producer_timeout: float = attrs.field(default=10.0, validator=positive)
    max_history_bytes: int = attrs.field(default=4 * 1024 * 1024, validator=at_least_one)
    max_auth_failures: int = attrs.field(default=10, validator=non_negative)
    auth_failure_window: float = attrs.field(default=60.0, validator=positive)


class SessionTransport(Transport):
    """A transport whose clients authenticate with the connector's secrets and talk in sessions."""

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
        opts = self.options
        env_secret = os.environ.get("CONNIC_SECRET")
        secrets = [*opts.secrets, *([env_secret] if env_secret else [])]
        if any(not s for s in secrets):
            raise ConfigError(f"{where}: {key}.secrets: a secret must not be empty")
        # os.environ decodes bytes that are not UTF-8 to lone surrogates, which str.encode
        # refused with a traceback from run and check; a dict config may hold them too.
        if env_secret and not _encodable(env_secret):
            raise ConfigError(f"CONNIC_SECRET: the environment variable is not valid UTF-8 text ({key}.secrets)")
        if not all(_encodable(s) for s in opts.secrets):
            raise ConfigError(f"{where}: {key}.secrets: a secret must be valid Unicode text (no lone surrogates)")
        if opts.require_auth and not secrets:
            raise ConfigError(
                f"{where}: {key}.secrets: require_auth is on but no secret is configured "
                "(set secrets, the CONNIC_SECRET environment variable, or require_auth = false)"
            )
        self._secrets = [s.encode() for s in secrets]
        self.agent_names = tuple(agents)
        self.chains: dict[str, TurnChain] = {
            name: build_turn_chain(
                agent,
                streaming_on=opts.streaming,
                agent_timeout=opts.agent_timeout,
                user_middleware=self.middleware,
                progress_events=opts.progress_events,
            )
            for name, agent in agents.items()
        }
        # With auth off there is nothing to guess: the brake is off too.
        self.throttle = AuthThrottle(
            opts.max_auth_failures if opts.require_auth else 0,
            opts.auth_failure_window,
            name=connector.path,
        )
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

    def secret_matches(self, secret: str | None) -> bool:
        """Whether ``secret`` is one of the configured secrets, compared in constant time.

        Any string is compared, even one that is not valid Unicode text (a lone surrogate
        from JSON's ``"\\ud800"``, or header bytes aiohttp decoded with ``surrogateescape``):
        such a secret is simply wrong.
        """
        if secret is None:
            return False
        given = secret.encode("utf-8", "surrogatepass")
        ok = False
        for candidate in self._secrets:
            ok |= hmac.compare_digest(given, candidate)
        return ok

    def origin_allowed(self, origin: str | None, host: str | None = None) -> bool:
        """Whether a handshake with this ``Origin`` header (and ``Host`` header) may upgrade.

        With ``allowed_origins`` set, only those. Without it, any origin when auth is
        on (the secret is the credential); when auth is off, a browser page from
        anywhere could drive the connector (cross-site WebSocket hijacking), so only
        pages of this server's own origin (``host``, when it is an IP address) and
        loopback origins (``localhost``, ``127.0.0.0/8``, ``[::1]``, any port) may.
        A handshake without ``Origin`` is not from a browser and is always allowed.
        """
        if origin is None:
            return True
        patterns = self.options.allowed_origins
        if patterns:
            origin = origin.lower()
            return any(fnmatch.fnmatchcase(origin, p.lower()) for p in patterns)
        return self.options.require_auth or local_origin(origin, host)


_LOOPBACK_NAMES = ("localhost", "localhost.")


def local_origin(origin: str, host: str | None) -> bool:
    """A loopback origin, or this server's own origin when the client reached it by IP address.

    A name other than localhost is never trusted from ``Host``: under DNS rebinding a
    foreign page's name resolves to this server, and its Origin then equals Host.
    """
    try:
        parts = urlsplit(origin.strip().lower())
        hostname = parts.hostname
        netloc = parts.netloc
    except ValueError:
        return False
    if parts.scheme not in ("http", "https") or not hostname:
        return False
    if hostname in _LOOPBACK_NAMES or hostname.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(hostname)
    except ValueError:
        return False  # a DNS name: see above
    if address.is_loopback:
        return True
    return host is not None and netloc == host.strip().lower()


def _encodable(text: str) -> bool:
    """Whether ``text`` is valid Unicode text: it encodes as UTF-8."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True
