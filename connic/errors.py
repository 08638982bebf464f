"""The connic exception hierarchy.

Every error that can reach a client derives from :class:`ConnicError` and carries
its protocol error ``code`` (see PROTOCOL.md section 6) and, for errors that end
the connection, the WebSocket ``close_code``.  Transports map exceptions to
frames mechanically from these two attributes.
"""

from __future__ import annotations

from typing import ClassVar

__all__ = [
    "AgentError",
    "AgentTimeout",
    "AuthTimeout",
    "ConfigError",
    "ConnicError",
    "InternalError",
    "InvalidJSON",
    "InvalidResume",
    "InvalidMessage",
    "MessageLimitReached",
    "MessageTooLarge",
    "NotFound",
    "PluginError",
    "ProducerLost",
    "ProtocolError",
    "QueueFull",
    "RateLimited",
    "ServerRestarting",
    "ServerShuttingDown",
    "SessionExpired",
    "SessionTakenOver",
    "SlowConsumer",
    "StoreUnavailable",
    "Unauthorized",
    "UnknownAgent",
    "UnknownType",
    "UnsupportedFrame",
]


class ConnicError(Exception):
    """Root of every connic error.

    ``code`` is the protocol error code sent in an ``error`` frame; ``close_code``
    is the WebSocket close code that follows it, or ``None`` when the connection
    stays open.
    """

    code: ClassVar[str] = "internal_error"
    close_code: ClassVar[int | None] = None

    def __init__(self, message: str = "") -> None:
        super().__init__(message or self.__class__.__doc__ or self.code)

    @property
    def message(self) -> str:
        """The human-readable text of the error."""
        return str(self.args[0]) if self.args else self.code


class ConfigError(ConnicError):
    """The configuration is invalid."""

    code = "config_error"


class PluginError(ConnicError):
    """A plugin could not be found or loaded."""

    code = "plugin_error"


class ProtocolError(ConnicError):
    """A client frame broke the protocol; the connection stays open.

    ``message_id`` is the id of the offending message when it could be read.
    """

    message_id: str | int | None = None


class InvalidJSON(ProtocolError):
    """The frame is not JSON, or not a JSON object."""

    code = "invalid_json"


class InvalidMessage(ProtocolError):
    """The message frame is malformed."""

    code = "invalid_message"


class UnknownType(ProtocolError):
    """The frame's type is not known."""

    code = "unknown_type"


class UnsupportedFrame(ProtocolError):
    """Binary frames are not supported."""

    code = "unsupported_frame"


class UnknownAgent(ProtocolError):
    """The requested agent is not linked to this connector."""

    code = "unknown_agent"


class RateLimited(ProtocolError):
    """Too many messages; retry later."""

    code = "rate_limited"

    def __init__(self, message: str = "", retry_after: float = 0.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class QueueFull(ProtocolError):
    """Too many of this session's messages are waiting to be answered."""

    code = "queue_full"


class NotFound(ProtocolError):
    """No queued or in-flight message has that id."""

    code = "not_found"


class InvalidResume(ProtocolError):
    """A ``resume`` frame after ``connected``, or one with bad fields."""

    code = "invalid_resume"


class AgentError(ConnicError):
    """An agent failed while answering."""

    code = "agent_error"


class AgentTimeout(AgentError):
    """An agent ran past its time limit."""

    code = "agent_timeout"


class Unauthorized(ConnicError):
    """Bad or missing secret."""

    code = "unauthorized"
    close_code = 4001


class AuthTimeout(ConnicError):
    """No authentication within the auth timeout."""

    code = "auth_timeout"
    close_code = 4002


class SessionExpired(ConnicError):
    """The session was idle past its timeout."""

    code = "session_expired"
    close_code = 4008


class MessageLimitReached(ConnicError):
    """The session reached its message limit."""

    code = "message_limit_reached"
    close_code = 4009


class MessageTooLarge(ConnicError):
    """The frame is larger than the connector allows."""

    code = "message_too_large"
    close_code = 1009


class ServerShuttingDown(ConnicError):
    """The server is shutting down."""

    code = "server_shutting_down"
    close_code = 1001


class ServerRestarting(ServerShuttingDown):
    """The server is restarting (``run --reload``): the same error code, but close 1012 (service restart)."""

    close_code = 1012


class SlowConsumer(ConnicError):
    """The client stopped reading and its outgoing queue is full."""

    code = "slow_consumer"
    close_code = 4010


class InternalError(ConnicError):
    """connic failed; the connection closes."""

    code = "internal_error"
    close_code = 1011


class SessionTakenOver(ConnicError):
    """Another connection resumed this session."""

    code = "session_taken_over"
    close_code = 4011


class ProducerLost(ConnicError):
    """The process producing a reply died; that agent's reply ends here."""

    code = "producer_lost"


class StoreUnavailable(ConnicError):
    """The shared session store cannot be reached.

    ``message`` is what a client is told; ``detail`` is what the store or its client library
    said (it may name hosts, ports and scripts): for the server's log only (:attr:`why`).
    """

    code = "store_unavailable"
    close_code = 1011

    def __init__(self, message: str = "", detail: str = "") -> None:
        super().__init__(message)
        self.detail = detail

    @property
    def why(self) -> str:
        """The message and the store's own words: what the server logs."""
        return f"{self.message} ({self.detail})" if self.detail else self.message
