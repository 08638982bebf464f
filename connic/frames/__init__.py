"""The wire is data: client and server frames, and their JSON form.

Server frames (:mod:`connic.frames.server`) are slotted attrs classes whose JSON
:func:`encode` writes; client frames (:mod:`connic.frames.client`) are what
:func:`parse_client_frame` makes of a text frame, raising the
:class:`connic.errors.ProtocolError` subclass whose code PROTOCOL.md names.
Everything is importable from here.
"""

from connic.frames.client import (
    MAX_DEPTH,
    AuthFrame,
    CancelFrame,
    ClientFrame,
    HistoryRequest,
    MessageFrame,
    PingFrame,
    ResumeFrame,
    parse_client_frame,
    too_deep,
)
from connic.frames.server import (
    MAX_ID_LENGTH,
    PROTOCOL,
    Ack,
    Connected,
    ErrorFrame,
    History,
    MessageId,
    Pong,
    ProgressFrame,
    Response,
    ServerFrame,
    StreamChunk,
    StreamEnd,
    StreamStart,
    ToolCallFrame,
    ToolResultFrame,
    encode,
    sequenced,
)

__all__ = [
    "MAX_DEPTH",
    "MAX_ID_LENGTH",
    "PROTOCOL",
    "Ack",
    "AuthFrame",
    "CancelFrame",
    "ClientFrame",
    "Connected",
    "ErrorFrame",
    "History",
    "HistoryRequest",
    "MessageFrame",
    "MessageId",
    "PingFrame",
    "Pong",
    "ProgressFrame",
    "Response",
    "ResumeFrame",
    "ServerFrame",
    "StreamChunk",
    "StreamEnd",
    "StreamStart",
    "ToolCallFrame",
    "ToolResultFrame",
    "encode",
    "parse_client_frame",
    "sequenced",
    "too_deep",
]
