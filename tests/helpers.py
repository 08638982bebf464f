"""Agents used by the tests, registered into a test-local registry."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import attrs

import connic
from connic.registry import Registry, load_registry


class Inspect(connic.Agent):
    """Answers with a JSON dump of what it saw of the turn."""

    async def respond(self, turn: connic.Turn) -> AsyncIterator[str | connic.Usage]:
        turn.session.state["turns"] = turn.session.state.get("turns", 0) + 1
        seen = {
            "id": turn.id,
            "number": turn.number,
            "message": turn.message,
            "context": dict(turn.context),
            "files": [{"name": f.name, "mime_type": f.mime_type, "data": f.data.decode("latin-1")} for f in turn.files],
            "session_id": turn.session.id,
            "history": [attrs.asdict(h) for h in turn.session.history],
            "state": dict(turn.session.state),
            "agent": turn.agent,
            "streaming": turn.streaming,
        }
        yield json.dumps(seen)


class Fail(connic.Agent):
    """Streams a little, then raises."""

    async def respond(self, turn: connic.Turn) -> AsyncIterator[str | connic.Usage]:
        yield "partial "
        raise RuntimeError("boom")


class Slow(connic.Agent):
    """Yields one chunk, then waits (for timeouts and cancels)."""

    @attrs.frozen
    class Options:
        seconds: float = 30.0

    options: Options

    async def respond(self, turn: connic.Turn) -> AsyncIterator[str | connic.Usage]:
        yield "started "
        await asyncio.sleep(self.options.seconds)
        yield "finished"


class NoUsage(connic.Agent):
    """Yields text and no usage."""

    async def respond(self, turn: connic.Turn) -> AsyncIterator[str | connic.Usage]:
        yield "a"
        yield "b"


class BadYield(connic.Agent):
    """Yields something that is neither text nor Usage."""

    async def respond(self, turn: connic.Turn) -> AsyncIterator[Any]:
        yield 42


class NotAGenerator(connic.Agent):
    """A plain ``respond`` that returns nothing, counting its calls."""

    calls = 0

    def respond(self, turn: connic.Turn) -> Any:
        NotAGenerator.calls += 1
        return None


def test_registry() -> Registry:
    """The installed plugins plus the agents above."""
    registry = load_registry()
    agents = {
        "inspect": Inspect,
        "fail": Fail,
        "slow": Slow,
        "nousage": NoUsage,
        "badyield": BadYield,
        "notagenerator": NotAGenerator,
    }
    for name, cls in agents.items():
        registry.register("agents", name, cls)
    return registry


test_registry.__test__ = False  # type: ignore[attr-defined]
