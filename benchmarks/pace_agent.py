"""A test agent at an LLM's pace that reads the whole conversation each turn (benchmark S7).

Each turn it builds a prompt from every history entry and the new message, as an agent
calling a chat-completion API would, then streams ``chunks`` chunks ``delay`` seconds
apart. A message whose ``context`` has ``"fast": true`` is answered without the delay:
the benchmark fills each session's history with such messages before it measures.
``benchmarks/baseline_aiohttp.py --pace`` does the same work without connic.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable

import attrs

from connic.agent import Agent, HistoryEntry, Turn, Usage


def build_prompt(history: Iterable[HistoryEntry], message: str) -> str:
    """Every entry of the conversation (its role and text) and the new message, one line each."""
    lines = [f"{entry.role}: {entry.text}" for entry in history]
    lines.append(f"user: {message}")
    return "\n".join(lines)


def chunk(index: int, prompt: str) -> str:
    """The ``index``-th chunk of a reply: the first one depends on the whole prompt."""
    return f"{len(prompt)} " if index == 0 else f"tok{index} "


class HistoryPaceAgent(Agent):
    """Reads the whole history each turn, then streams chunks at an LLM's pace."""

    @attrs.frozen
    class Options:
        """Chunks per reply and the pause before each one (seconds)."""

        chunks: int = 20
        delay: float = 0.05

    options: Options

    async def respond(self, turn: Turn) -> AsyncIterator[str | Usage]:
        """Build the prompt from the history, then yield the chunks ``delay`` apart."""
        prompt = build_prompt(turn.session.history, turn.message)
        delay = 0.0 if turn.context.get("fast") else self.options.delay
        for index in range(self.options.chunks):
            if delay:
                await asyncio.sleep(delay)
            yield chunk(index, prompt)
        yield Usage(len(prompt) // 4, self.options.chunks)
