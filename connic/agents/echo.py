"""The built-in ``echo`` agent: the offline default."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator

import attrs

from connic.agent import Agent, Progress, ProgressEvent, ToolCall, ToolResult, Turn, Usage
from connic.config import non_negative

_WORD = re.compile(r"\s*\S+\s*|\s+")


class EchoAgent(Agent):
    """Streams the message back word by word."""

    @attrs.frozen
    class Options:
        """Options of the echo agent."""

        delay: float = attrs.field(default=0.0, validator=non_negative)
        demo_tools: bool = False

    options: Options

    async def respond(self, turn: Turn) -> AsyncIterator[str | Usage | ProgressEvent]:
        """Yield each word with the whitespace after it; usage counts the words.

        Unstreamed and without a delay, the words would only be joined again: the
        message comes back in one piece. With ``demo_tools``, a ``Progress("thinking")``
        and a demo ``word_count`` tool call and its result come first, so progress
        events can be tried without a model.
        """
        delay = self.options.delay
        words = len(turn.message.split())
        if self.options.demo_tools:
            yield Progress("thinking")
            call_id = f"call-{turn.number}"
            yield ToolCall(call_id, "word_count", {"text": turn.message})
            if delay:
                await asyncio.sleep(delay)
            yield ToolResult(call_id, "word_count", {"words": words})
        if not turn.streaming and not delay:
            if turn.message:
                yield turn.message
        else:
            for chunk in _WORD.findall(turn.message):
                if delay:
                    await asyncio.sleep(delay)
                yield chunk
        yield Usage(words, words)
