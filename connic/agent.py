"""The agent API: what a plugin author writes against.

An agent is a class deriving from :class:`Agent` with one async-generator method,
:meth:`Agent.respond`, that yields text chunks and, optionally, a :class:`Usage` and
progress events (:class:`ToolCall`, :class:`ToolResult`, :class:`Progress`).
It never sees JSON or sockets: the transport hands it a :class:`Turn`.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from typing import Any, ClassVar, Literal, overload

import attrs

__all__ = [
    "Agent",
    "File",
    "HistoryEntry",
    "HistoryView",
    "Progress",
    "ProgressEvent",
    "Session",
    "ToolCall",
    "ToolResult",
    "Turn",
    "Usage",
]


MAX_TOKENS = 2**53 - 1
"""The most tokens a :class:`Usage` field may count: the largest integer every JSON reader keeps exact."""


@attrs.frozen
class Usage:
    """Token usage of one answer, reported as the frame's ``token_usage``.

    Each count is an ``int`` from 0 to :data:`MAX_TOKENS`; anything else raises
    ``TypeError`` or ``ValueError`` here, in the agent, which makes the turn an ``agent_error``.
    """

    prompt_tokens: int = 0
    candidates_tokens: int = 0

    def __attrs_post_init__(self) -> None:
        # One turn's numbers go into the frame, the session's totals and /metrics' counters:
        # a negative count would make a counter go down, a huge one break the exposition.
        # One check for both fields (two attrs validators cost twice the calls, once per turn).
        prompt, candidates = self.prompt_tokens, self.candidates_tokens
        if not (
            type(prompt) is int
            and type(candidates) is int
            and 0 <= prompt <= MAX_TOKENS
            and 0 <= candidates <= MAX_TOKENS
        ):
            _refuse(prompt, "prompt_tokens")
            _refuse(candidates, "candidates_tokens")

    def as_dict(self) -> dict[str, int]:
        """The wire form: ``{"prompt_tokens": N, "candidates_tokens": M}``."""
        return {"prompt_tokens": self.prompt_tokens, "candidates_tokens": self.candidates_tokens}


def _refuse(value: Any, name: str) -> None:
    """Raise the error for a bad count in a Usage field (nothing if ``value`` is a good one)."""
    if type(value) is not int:  # bool is an int subclass, and no count
        raise TypeError(f"Usage.{name} must be an int, not {type(value).__name__}")
    if not 0 <= value <= MAX_TOKENS:
        shown = str(value) if value.bit_length() <= 64 else f"a {value.bit_length()}-bit number"
        raise ValueError(f"Usage.{name} must be from 0 to 2**53 - 1, got {shown}")


# What the wire can carry: strict JSON (no NaN or Infinity, which JSON has no word for).
_json_check = json.JSONEncoder(ensure_ascii=False, allow_nan=False, check_circular=True).encode


def _json_value(value: Any, what: str) -> None:
    """Raise ``TypeError`` unless ``value`` encodes as strict JSON (checked once, where the agent made it)."""
    try:
        _json_check(value)
    except (TypeError, ValueError, RecursionError) as exc:
        raise TypeError(f"{what} must be JSON-serialisable: {exc}") from None


def _text(value: Any, what: str) -> None:
    if type(value) is not str:
        raise TypeError(f"{what} must be a str, not {type(value).__name__}")


@attrs.frozen
class ToolCall:
    """An agent calls a tool: sent to the client as a ``tool_call`` frame (PROTOCOL.md §9).

    ``call_id`` pairs the call with its :class:`ToolResult`; ``arguments`` is a
    mapping that encodes as JSON. Like :class:`Usage`, a bad value raises
    ``TypeError`` here, in the agent, which makes the turn an ``agent_error``.
    Progress events never enter the answer's text or the history.
    """

    call_id: str
    name: str
    arguments: Mapping[str, Any] = attrs.field(factory=dict)

    def __attrs_post_init__(self) -> None:
        _text(self.call_id, "ToolCall.call_id")
        _text(self.name, "ToolCall.name")
        if not isinstance(self.arguments, Mapping):
            raise TypeError(f"ToolCall.arguments must be a mapping, not {type(self.arguments).__name__}")
        _json_value(dict(self.arguments), "ToolCall.arguments")


@attrs.frozen
class ToolResult:
    """What a tool returned (``is_error`` when it failed): a ``tool_result`` frame (PROTOCOL.md §9).

    ``result`` is any JSON-serialisable value; a bad value raises ``TypeError`` here.
    """

    call_id: str
    name: str
    result: Any = None
    is_error: bool = False

    def __attrs_post_init__(self) -> None:
        _text(self.call_id, "ToolResult.call_id")
        _text(self.name, "ToolResult.name")
        if type(self.is_error) is not bool:
            raise TypeError(f"ToolResult.is_error must be a bool, not {type(self.is_error).__name__}")
        _json_value(self.result, "ToolResult.result")


@attrs.frozen
class Progress:
    """Anything else an agent reports doing (``"thinking"``, ``"retrieving"``): a ``progress`` frame.

    ``stage`` is a short word; ``detail`` any JSON-serialisable value or None.
    """

    stage: str
    detail: Any = None

    def __attrs_post_init__(self) -> None:
        _text(self.stage, "Progress.stage")
        if self.detail is not None:
            _json_value(self.detail, "Progress.detail")


ProgressEvent = ToolCall | ToolResult | Progress
"""What an agent may yield besides text and :class:`Usage` to tell the client what it is doing."""


@attrs.frozen
class File:
    """A file sent with a message (``payload.files``), already base64-decoded."""

    name: str
    mime_type: str
    data: bytes


@attrs.frozen
class HistoryEntry:
    """One entry of a session's conversation memory.

    ``role`` is ``"user"`` for a client message and ``"agent"`` for an agent's
    complete answer; ``agent`` names the answering agent (``None`` for users).
    ``id`` and ``message_number`` are those of the message the entry belongs to.
    """

    role: Literal["user", "agent"]
    text: str
    agent: str | None = None
    id: str | int | None = None
    message_number: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """The wire form used by the ``history`` frame (PROTOCOL.md §8)."""
        return {
            "role": self.role,
            "text": self.text,
            "id": self.id,
            "message_number": self.message_number,
            "agent": self.agent,
        }


class HistoryView(Sequence[HistoryEntry]):
    """A read-only view of the first ``length`` entries of a session's history.

    A session's history list only grows (trimming replaces the list rather than
    changing it), so a prefix of it never changes: agents get this view instead
    of a copy, which would cost time proportional to the conversation on every turn.
    """

    __slots__ = ("_entries", "_length")

    def __init__(self, entries: list[HistoryEntry], length: int | None = None) -> None:
        self._entries = entries
        self._length = len(entries) if length is None else length

    def __len__(self) -> int:
        return self._length

    @overload
    def __getitem__(self, index: int) -> HistoryEntry: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[HistoryEntry]: ...

    def __getitem__(self, index: int | slice) -> HistoryEntry | Sequence[HistoryEntry]:
        if isinstance(index, slice):
            return tuple(self._entries[: self._length][index])
        if index < 0:
            index += self._length
        if not 0 <= index < self._length:
            raise IndexError("history index out of range")
        return self._entries[index]

    def __iter__(self) -> Iterator[HistoryEntry]:
        return itertools.islice(self._entries, self._length)

    def __repr__(self) -> str:
        return f"HistoryView({list(self)!r})"


@attrs.frozen
class Session:
    """What an agent sees of its session.

    ``history`` is a snapshot of the earlier exchanges, oldest first; ``state``
    is a dict private to this agent within this session, kept between turns.
    """

    id: str
    history: Sequence[HistoryEntry]
    state: dict[str, Any]


@attrs.frozen
class Turn:
    """One message as one agent answers it.

    ``id`` is the message id echoed on every reply frame; ``number`` is its
    ``message_number`` within the session (from 1); ``agent`` is the name of the
    answering agent on the wire. ``streaming`` says whether the client gets the
    answer chunk by chunk (the connector's ``streaming``): when it is false the
    chunks are joined into one ``response``, so an agent may as well ask its
    provider for a whole answer, or yield its text in one piece.
    """

    id: str | int
    number: int
    message: str
    context: Mapping[str, Any]
    files: Sequence[File]
    session: Session
    agent: str
    streaming: bool = True


class Agent:
    """Base class of every agent plugin.

    Subclasses implement :meth:`respond`. They may declare ``Options`` as an attrs
    class: the keys configured for the agent are structured into it with cattrs
    and the instance is available as ``self.options``. ``__init__`` may raise
    :class:`connic.ConfigError` to refuse a configuration at start-up.
    """

    Options: ClassVar[type[Any] | None] = None

    def __init__(self, name: str, options: Any = None) -> None:
        self.name = name
        self.options = options

    async def start(self) -> None:
        """Acquire resources (HTTP clients and the like) when the server starts."""

    async def close(self) -> None:
        """Release what :meth:`start` acquired when the server stops."""

    def respond(self, turn: Turn) -> AsyncIterator[str | Usage | ProgressEvent]:
        """Answer one turn: yield text chunks, optionally a :class:`Usage`, and progress events.

        Progress events (:class:`ToolCall`, :class:`ToolResult`, :class:`Progress`) reach
        the client only on a connector with ``progress_events = true``.
        """
        raise NotImplementedError(f"{type(self).__name__} does not implement respond()")
