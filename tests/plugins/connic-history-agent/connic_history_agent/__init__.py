"""A third-party connic plugin distribution used by connic's tests.

It declares its plugins exactly as any other distribution would, with entry
points in setup.cfg: the ``history`` agent, the ``shout`` middleware, and a
``broken`` agent whose module cannot be imported.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import attrs

import connic

__all__ = ["HistoryAgent", "Shout"]


class HistoryAgent(connic.Agent):
    """Answers with what it remembers of the conversation.

    The reply reads ``You said N things before; last: X. I answered: Y. Turn T: MESSAGE``
    where N, X and Y come from ``turn.session.history`` and T from ``turn.session.state``.
    """

    async def respond(self, turn: connic.Turn) -> AsyncIterator[str | connic.Usage]:
        """Yield a reply built from the session's history and this agent's state."""
        said = [entry.text for entry in turn.session.history if entry.role == "user"]
        answered = [entry.text for entry in turn.session.history if entry.role == "agent"]
        turns = turn.session.state["turns"] = turn.session.state.get("turns", 0) + 1
        if said:
            yield f"You said {len(said)} things before; last: {said[-1]}. "
        else:
            yield "You said nothing before. "
        if answered:
            yield f"I answered: {answered[-1]} "
        yield f"Turn {turns}: {turn.message}"
        yield connic.Usage(prompt_tokens=len(said) + 1, candidates_tokens=turns)


class Shout(connic.Middleware):
    """Upper-cases every text chunk and appends ``suffix`` to the answer's last chunk."""

    @attrs.frozen
    class Options:
        """Options of the shout middleware."""

        suffix: str = "!"

    options: Options

    async def __call__(self, turn: connic.Turn, emit: connic.Emit, call_next: connic.CallNext) -> None:
        """Hold each chunk back until the next one arrives, so the last one can get the suffix."""
        held: list[str] = []

        async def shout(item: object) -> None:
            if isinstance(item, str):
                if held:
                    await emit(held.pop().upper())
                held.append(item)
            else:
                await emit(item)

        await call_next(turn, shout)
        await emit((held.pop().upper() if held else "") + self.options.suffix)
