"""connic-moderation: an example message middleware for connic.

``block`` patterns refuse a matching message before any agent sees it (the
client gets an ``error`` frame with code ``message_rejected``); ``redact``
patterns replace matches in what agents answer, including matches that a
stream splits across chunks.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import attrs

import connic

__all__ = ["MessageRejected", "Moderation", "Redactor"]


class MessageRejected(connic.InvalidMessage):
    """The message matches a blocked pattern."""

    code = "message_rejected"


def _patterns(_: object, attribute: attrs.Attribute[Any], value: Sequence[str]) -> None:
    for pattern in value:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"{attribute.name}: invalid regular expression {pattern!r}: {exc}") from None


def _at_least_one(_: object, attribute: attrs.Attribute[int], value: int) -> None:
    if value < 1:
        raise ValueError(f"{attribute.name} must be at least 1, got {value}")


class Redactor:
    """Replaces matches of ``pattern`` in a stream of text pieces.

    A match may be split across pieces, so the last ``max_match - 1`` characters
    are held back until more text (or the end) shows whether they start a match.
    A match longer than ``max_match`` characters may be missed at a piece boundary.
    """

    def __init__(self, pattern: re.Pattern[str], replacement: str, max_match: int) -> None:
        self.pattern = pattern
        self.replacement = replacement
        self.hold = max_match - 1
        self.buffer = ""

    def feed(self, piece: str) -> str:
        """Add a piece; return the text that is now certain, redacted."""
        self.buffer += piece
        cut = max(0, len(self.buffer) - self.hold)
        for match in self.pattern.finditer(self.buffer):
            if match.start() >= cut:
                break
            cut = max(cut, match.end())
        return self._take(cut)

    def flush(self) -> str:
        """The rest of the text, redacted."""
        return self._take(len(self.buffer))

    def _take(self, cut: int) -> str:
        ready, self.buffer = self.buffer[:cut], self.buffer[cut:]
        return self.pattern.sub(self.replacement, ready)


class Moderation(connic.Middleware):
    """Rejects messages matching block patterns; redacts matches of redact patterns in answers."""

    @attrs.frozen
    class Options:
        """See the plugin's README."""

        block: tuple[str, ...] = attrs.field(default=(), validator=_patterns)
        redact: tuple[str, ...] = attrs.field(default=(), validator=_patterns)
        replacement: str = "[redacted]"
        max_match: int = attrs.field(default=64, validator=_at_least_one)
        ignore_case: bool = True

    options: Options

    def __init__(self, options: Options) -> None:
        super().__init__(options)
        flags = re.IGNORECASE if options.ignore_case else 0
        self.block = [re.compile(p, flags) for p in options.block]
        self.redact = re.compile("|".join(f"(?:{p})" for p in options.redact), flags) if options.redact else None

    async def __call__(self, turn: connic.Turn, emit: connic.Emit, call_next: connic.CallNext) -> None:
        """Refuse a blocked message; otherwise pass it on with the answer redacted."""
        for pattern in self.block:
            if pattern.search(turn.message):
                raise MessageRejected("the message was rejected by the moderation policy")
        if self.redact is None:
            await call_next(turn, emit)
            return
        redactor = Redactor(self.redact, self.options.replacement, self.options.max_match)

        async def redacted(item: Any) -> None:
            if isinstance(item, str):
                text = redactor.feed(item)
                if text:
                    await emit(text)
            else:
                await emit(item)

        await call_next(turn, redacted)
        rest = redactor.flush()
        if rest:
            await emit(rest)
