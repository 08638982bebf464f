"""Client frames: what :func:`parse_client_frame` makes of a text frame, or the error it raises.

Each error is the :class:`connic.errors.ProtocolError` subclass whose code PROTOCOL.md names.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import re
from collections.abc import Mapping
from itertools import accumulate
from typing import Any

import attrs

from connic.agent import File
from connic.errors import InvalidJSON, InvalidMessage, UnknownType
from connic.frames.server import MAX_ID_LENGTH, MessageId


@attrs.define
class AuthFrame:
    """``{"secret": ...}`` or ``{"type": "auth", "secret": ...}``; ``secret`` None if absent or not a string."""

    secret: str | None


@attrs.define
class MessageFrame:
    """A message to the agents, in any of its accepted forms."""

    id: MessageId | None
    text: str
    context: Mapping[str, Any]
    files: tuple[File, ...] = ()
    agent: str | None = None


@attrs.define
class CancelFrame:
    """``{"type": "cancel", "id": ...}``."""

    id: MessageId


@attrs.define
class PingFrame:
    """``{"type": "ping"}``."""


@attrs.define
class HistoryRequest:
    """``{"type": "history"}``: the client asks for the session's conversation (PROTOCOL.md §8)."""


@attrs.define
class ResumeFrame:
    """``{"type": "resume", "session_id", "resume_token", "last_seq", "secret"}`` (PROTOCOL.md §7).

    A field that is missing or of the wrong type is ``None``: the frame still
    authenticates with its secret, and :attr:`problem` says what was wrong.
    """

    secret: str | None
    session_id: str | None
    resume_token: str | None
    last_seq: int | None

    @property
    def problem(self) -> str | None:
        """What makes this resume frame invalid, or None."""
        if self.session_id is None or self.resume_token is None:
            return "resume needs string session_id and resume_token"
        if self.last_seq is None:
            return "resume needs last_seq, a non-negative integer"
        return None


ClientFrame = AuthFrame | MessageFrame | CancelFrame | PingFrame | HistoryRequest | ResumeFrame


def _resume(frame: Mapping[str, Any]) -> ResumeFrame:
    def string(name: str) -> str | None:
        value = frame.get(name)
        return value if isinstance(value, str) and len(value) <= MAX_ID_LENGTH else None

    last_seq = frame.get("last_seq")
    if isinstance(last_seq, bool) or not isinstance(last_seq, int) or not 0 <= last_seq < 2**63:
        last_seq = None
    secret = frame.get("secret")
    return ResumeFrame(
        secret if isinstance(secret, str) else None, string("session_id"), string("resume_token"), last_seq
    )


def _message_id(value: Any, required: bool = False) -> MessageId | None:
    if value is None and not required:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise InvalidMessage("id must be a string or an integer")
    if isinstance(value, str) and len(value) > MAX_ID_LENGTH:
        raise InvalidMessage(f"id must be at most {MAX_ID_LENGTH} characters")
    if isinstance(value, int) and not -(2**63) <= value < 2**63:
        raise InvalidMessage("an integer id must fit in 64 bits")
    return value


def _files(value: Any) -> tuple[File, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise InvalidMessage("files must be a list of {name, mime_type, data} objects")
    files = []
    for index, item in enumerate(value):
        if not isinstance(item, dict):
            raise InvalidMessage(f"files[{index}] must be an object")
        name, mime_type, data = item.get("name"), item.get("mime_type"), item.get("data")
        if not isinstance(name, str) or not isinstance(mime_type, str) or not isinstance(data, str):
            raise InvalidMessage(f"files[{index}] needs string name, mime_type and data (base64)")
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidMessage(f"files[{index}].data is not valid base64") from None
        files.append(File(name=name, mime_type=mime_type, data=raw))
    return tuple(files)


def _message(frame: Mapping[str, Any], body: Mapping[str, Any]) -> MessageFrame:
    try:
        text = body["message"] if "message" in body else body.get("content")
        if not isinstance(text, str):
            raise InvalidMessage("the message text is missing or not a string")
        context = body.get("context")
        if context is None:
            context = {}
        elif not isinstance(context, dict):
            raise InvalidMessage("context must be a JSON object")
        agent = body.get("agent")
        if agent is not None and not isinstance(agent, str):
            raise InvalidMessage("agent must be a string")
        message_id = frame.get("id")
        files = body.get("files")
        return MessageFrame(
            message_id if message_id is None else _message_id(message_id),
            text,
            context,
            () if files is None else _files(files),
            agent,
        )
    except InvalidMessage as exc:
        # Echo the id on the error when the id itself was fine.
        raw_id = frame.get("id")
        with contextlib.suppress(InvalidMessage):
            exc.message_id = _message_id(raw_id)
        raise


MAX_DEPTH = 100
"""The deepest nesting of arrays and objects a client frame may have (docs/protocol.md)."""

# JSON strings: the leftmost match at each quote is the string a parser reads there.
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
# bytes.translate arguments that keep only the brackets, as b"[" and b"]".
_AS_SQUARE = bytes.maketrans(b"{}", b"[]")
_NOT_BRACKETS = bytes(range(256)).translate(None, b"[]{}")
_STEP = [0] * 256
_STEP[ord("[")], _STEP[ord("]")] = 1, -1
_TOO_DEEP_RUN = b"[" * (MAX_DEPTH + 1)


def too_deep(text: str) -> bool:
    """Whether the arrays and objects of ``text`` nest deeper than :data:`MAX_DEPTH`.

    json's parser recurses once per level: a frame like ``[[[...]]]`` a hundred
    thousand deep raises RecursionError (or, with a high recursion limit, overflows
    the C stack), and a deep value that does parse breaks whatever walks it later.
    Measured outside strings, before parsing, and only for a frame with more opening
    brackets than the limit (the caller counts them): about as long as json takes to
    parse the same frame.
    """
    # The brackets outside strings, at C speed (UTF-8 never puts a bracket byte inside a character).
    brackets = _STRING.sub("", text).encode("utf-8", "surrogatepass").translate(_AS_SQUARE, _NOT_BRACKETS)
    if _TOO_DEEP_RUN in brackets:
        return True
    # The depth after each bracket. Invalid JSON may count wrong past its first error,
    # but json's parser stops there too: what it reaches is measured exactly.
    return max(accumulate(map(_STEP.__getitem__, brackets)), default=0) > MAX_DEPTH


def parse_client_frame(text: str) -> ClientFrame:
    """Parse one client text frame; raise a ProtocolError carrying its code."""
    # Only a frame with more opening brackets than the limit can nest deeper (hot path,
    # see docs/performance.md).
    if text.count("[") + text.count("{") > MAX_DEPTH and too_deep(text):
        raise InvalidJSON(f"the frame nests arrays and objects deeper than {MAX_DEPTH} levels")
    try:
        frame = json.loads(text)
    except (ValueError, RecursionError):  # RecursionError: a deep frame on an already deep stack
        raise InvalidJSON("the frame is not valid JSON") from None
    if not isinstance(frame, dict):
        raise InvalidJSON("the frame must be a JSON object")
    kind = frame.get("type")
    if kind is None:
        if "message" in frame or "content" in frame:
            return _message(frame, frame)
        if "secret" in frame:
            secret = frame["secret"]
            return AuthFrame(secret if isinstance(secret, str) else None)
        raise InvalidMessage("the frame has no type and no message")
    if kind == "message":
        payload = frame.get("payload")
        if payload is None and ("message" in frame or "content" in frame):
            return _message(frame, frame)
        if not isinstance(payload, dict):
            raise InvalidMessage("payload must be a JSON object with a message")
        return _message(frame, payload)
    if kind == "cancel":
        message_id = _message_id(frame.get("id"), required=True)
        assert message_id is not None
        return CancelFrame(message_id)
    if kind == "ping":
        return PingFrame()
    if kind == "history":
        return HistoryRequest()
    if kind == "resume":
        return _resume(frame)
    if kind == "auth":
        secret = frame.get("secret")
        return AuthFrame(secret if isinstance(secret, str) else None)
    shown = kind if isinstance(kind, str) else json.dumps(kind)
    raise UnknownType(f"unknown frame type {shown[:64]!r}")
