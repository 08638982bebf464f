"""Server frames and their JSON form.

Server frames are slotted attrs classes, and each one's wire form is written
once: in its ``to_dict()``, which :func:`encode` turns into JSON, or, for the
frames of every turn (``ack``, ``stream_start``, ``stream_chunk``, ``stream_end``
and ``response``), in :func:`encode` itself, which their ``to_dict()`` reads
back. Frames are not frozen (one is made per chunk or message, see
docs/performance.md); treat them as values all the same.
"""

from __future__ import annotations

import json
import json.encoder
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import attrs

PROTOCOL = "connic/1"
MessageId = str | int
MAX_ID_LENGTH = 256


@attrs.define
class Connected:
    """Sent once the session is authenticated (or resumed, PROTOCOL.md §7).

    ``resume_token`` is absent when resuming is off; ``resumed`` is set only in
    answer to a ``resume`` frame, and ``recovered`` and ``last_seq`` only when it
    succeeded.
    """

    type: ClassVar[str] = "connected"
    session_id: str
    agents: tuple[str, ...]
    streaming: bool
    max_messages: int
    session_timeout: float
    resume_token: str | None = None
    resumed: bool | None = None
    recovered: bool | None = None
    last_seq: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of this frame."""
        data: dict[str, Any] = {
            "type": "connected",
            "session_id": self.session_id,
            "connector_run_id": self.session_id,
            "agents": list(self.agents),
            "protocol": PROTOCOL,
            "streaming": self.streaming,
            "max_messages": self.max_messages,
            "session_timeout": self.session_timeout,
        }
        if self.resume_token is not None:
            data["resume_token"] = self.resume_token
        if self.resumed is not None:
            data["resumed"] = self.resumed
        if self.recovered is not None:
            data["recovered"] = self.recovered
        if self.last_seq is not None:
            data["last_seq"] = self.last_seq
        return data


@attrs.define
class Ack:
    """A message was accepted; ``message_number`` counts from 1; ``agent``: the one agent it named, if it did."""

    type: ClassVar[str] = "ack"
    id: MessageId
    message_number: int
    agent: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of this frame."""
        return _read_back(self)


@attrs.define
class StreamStart:
    """An agent starts a streamed answer."""

    type: ClassVar[str] = "stream_start"
    id: MessageId
    agent: str

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of this frame."""
        return _read_back(self)


@attrs.define
class StreamChunk:
    """A piece of a streamed answer."""

    type: ClassVar[str] = "stream_chunk"
    id: MessageId
    agent: str
    chunk: str

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of this frame."""
        return _read_back(self)


@attrs.define
class StreamEnd:
    """The end of a streamed answer, with the whole text and token usage."""

    type: ClassVar[str] = "stream_end"
    id: MessageId
    agent: str
    full_response: str
    token_usage: Mapping[str, int]
    finish_reason: str = "stop"

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of this frame."""
        return _read_back(self)


@attrs.define
class Response:
    """A whole answer (streaming off)."""

    type: ClassVar[str] = "response"
    id: MessageId
    agent: str
    response: str
    token_usage: Mapping[str, int]
    finish_reason: str = "stop"

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of this frame."""
        return _read_back(self)


@attrs.define
class ToolCallFrame:
    """An agent calls a tool (PROTOCOL.md §9, sent only with ``progress_events``)."""

    type: ClassVar[str] = "tool_call"
    id: MessageId
    agent: str
    call_id: str
    name: str
    arguments: Mapping[str, Any]

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of this frame."""
        return {
            "type": "tool_call",
            "id": self.id,
            "agent": self.agent,
            "call_id": self.call_id,
            "name": self.name,
            "arguments": dict(self.arguments),
        }


@attrs.define
class ToolResultFrame:
    """A tool returned (``is_error`` when it failed; PROTOCOL.md §9)."""

    type: ClassVar[str] = "tool_result"
    id: MessageId
    agent: str
    call_id: str
    name: str
    result: Any
    is_error: bool = False

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of this frame."""
        return {
            "type": "tool_result",
            "id": self.id,
            "agent": self.agent,
            "call_id": self.call_id,
            "name": self.name,
            "result": self.result,
            "is_error": self.is_error,
        }


@attrs.define
class ProgressFrame:
    """What an agent is doing besides calling tools, e.g. ``stage: "thinking"`` (PROTOCOL.md §9)."""

    type: ClassVar[str] = "progress"
    id: MessageId
    agent: str
    stage: str
    detail: Any = None

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of this frame."""
        return {"type": "progress", "id": self.id, "agent": self.agent, "stage": self.stage, "detail": self.detail}


@attrs.define
class ErrorFrame:
    """An error; ``agent`` only when one agent failed, ``retry_after`` only for rate limits.

    ``message_id``: the id of a message a resume following another process refused at once
    (the frame's own ``id`` is null then: only the owner numbers the session's frames).
    """

    type: ClassVar[str] = "error"
    id: MessageId | None
    code: str
    message: str
    agent: str | None = None
    retry_after: float | None = None
    message_id: MessageId | None = None

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of this frame."""
        data: dict[str, Any] = {"type": "error", "id": self.id, "code": self.code, "message": self.message}
        if self.agent is not None:
            data["agent"] = self.agent
        if self.retry_after is not None:
            data["retry_after"] = self.retry_after
        if self.message_id is not None:
            data["message_id"] = self.message_id
        return data


@attrs.define
class Pong:
    """The answer to an application-level ping."""

    type: ClassVar[str] = "pong"

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of this frame."""
        return {"type": "pong"}


@attrs.define
class History:
    """The session's conversation so far (PROTOCOL.md §8); ``entries`` are wire-ready objects."""

    type: ClassVar[str] = "history"
    entries: tuple[Mapping[str, Any], ...]
    last_seq: int

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of this frame."""
        return {"type": "history", "entries": list(self.entries), "last_seq": self.last_seq}


ServerFrame = (
    Connected
    | Ack
    | StreamStart
    | StreamChunk
    | StreamEnd
    | Response
    | ToolCallFrame
    | ToolResultFrame
    | ProgressFrame
    | ErrorFrame
    | Pong
    | History
)

_dumps: Callable[[Any], str] = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
_string: Callable[[str], str] = json.encoder.encode_basestring


_USAGE_KEYS = ("prompt_tokens", "candidates_tokens")


def _id(message_id: MessageId) -> str:
    return _string(message_id) if type(message_id) is str else _dumps(message_id)


def _usage(usage: Mapping[str, int]) -> str:
    if tuple(usage) == _USAGE_KEYS:
        prompt, candidates = usage["prompt_tokens"], usage["candidates_tokens"]
        if type(prompt) is int and type(candidates) is int:
            return f'{{"prompt_tokens":{prompt},"candidates_tokens":{candidates}}}'
    return _dumps(dict(usage))


def sequenced(data: str, seq: int) -> str:
    """An encoded frame with ``"seq": seq`` added as its last member (every frame is a JSON object)."""
    return f'{data[:-1]},"seq":{seq}}}'


CHUNK_PREFIX = '{"type":"stream_chunk"'
"""How :func:`encode` begins every ``stream_chunk``: readers of encoded frames skip chunks by it unparsed."""


def encode(frame: ServerFrame) -> str:
    """The JSON text of a server frame: what ``json`` makes of ``frame.to_dict()``.

    The frames of every turn are written here by hand (hot path, see docs/performance.md),
    each in its fields' order after ``type``; tests/test_frames.py checks them against json.
    """
    if type(frame) is StreamChunk:
        return f'{CHUNK_PREFIX},"id":{_id(frame.id)},"agent":{_string(frame.agent)},"chunk":{_string(frame.chunk)}}}'
    if type(frame) is Response:
        return (
            f'{{"type":"response","id":{_id(frame.id)},"agent":{_string(frame.agent)},'
            f'"response":{_string(frame.response)},"token_usage":{_usage(frame.token_usage)},'
            f'"finish_reason":{_string(frame.finish_reason)}}}'
        )
    if type(frame) is StreamEnd:
        return (
            f'{{"type":"stream_end","id":{_id(frame.id)},"agent":{_string(frame.agent)},'
            f'"full_response":{_string(frame.full_response)},"token_usage":{_usage(frame.token_usage)},'
            f'"finish_reason":{_string(frame.finish_reason)}}}'
        )
    if type(frame) is Ack:
        if frame.agent is None:
            return f'{{"type":"ack","id":{_id(frame.id)},"message_number":{frame.message_number}}}'
        return (
            f'{{"type":"ack","id":{_id(frame.id)},"message_number":{frame.message_number},'
            f'"agent":{_string(frame.agent)}}}'
        )
    if type(frame) is StreamStart:
        return f'{{"type":"stream_start","id":{_id(frame.id)},"agent":{_string(frame.agent)}}}'
    return _dumps(frame.to_dict())


def _read_back(frame: ServerFrame) -> dict[str, Any]:
    """The JSON object of a frame that :func:`encode` writes by hand."""
    data: dict[str, Any] = json.loads(encode(frame))
    return data
