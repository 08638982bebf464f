"""A session's history is bounded in bytes (``max_history_bytes``): the oldest entries go first.

An agent always sees the newest exchanges, whole, and the newest one even when it
alone is over the bound.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import connic
from conftest import Client, Connect, Server, StartServer, make_config
from helpers import test_registry

AGENTS = {"echo": {"use": "echo"}, "inspect": {"use": "inspect"}}


async def _server(start_server: StartServer, bound: int) -> Server:
    config = make_config({"max_history_bytes": bound, "streaming": False}, AGENTS)
    return await start_server(config, registry=test_registry())


async def _echo(client: Client, text: str) -> None:
    frames = await client.reply({"message": text, "agent": "echo"})
    assert frames[-1]["response"] == text


async def _seen(client: Client) -> list[dict[str, Any]]:
    """The history the inspect agent sees now (its own exchange is not in the history yet)."""
    frames = await client.reply({"message": "?", "agent": "inspect"})
    history: list[dict[str, Any]] = json.loads(frames[-1]["response"])["history"]
    return [{key: entry[key] for key in ("role", "text", "agent")} for entry in history]


def _size(entries: list[dict[str, Any]]) -> int:
    return sum(len(e["text"].encode()) for e in entries)


async def test_the_agent_sees_the_newest_entries_that_fit(start_server: StartServer, connect: Connect) -> None:
    bound = 1000
    server = await _server(start_server, bound)
    client = await connect(server.url())
    said = [f"{i:03d} " + ("é" if i % 2 else "e") * 96 for i in range(12)]  # 100 or 196 bytes each
    for text in said:
        await _echo(client, text)
    seen = await _seen(client)
    whole = [{"role": r, "text": t, "agent": a} for t in said for r, a in (("user", None), ("agent", "echo"))]
    # A suffix of the conversation: the newest entries, the newest exchange last...
    assert seen == whole[len(whole) - len(seen) :]
    assert seen[-2:] == [{"role": "user", "text": said[-1], "agent": None}, whole[-1]]
    # ...as many as fit in the bound (UTF-8 bytes of the texts), not one fewer.
    assert _size(seen) <= bound
    assert _size(whole[len(whole) - len(seen) - 1 :]) > bound
    # The inspect exchange is history too: its answer (a dump of the history) is over the
    # bound alone, so the next agent sees that exchange only.
    again = await _seen(client)
    assert [(e["role"], e["text"][:1], e["agent"]) for e in again] == [("user", "?", None), ("agent", "{", "inspect")]
    assert _size(again) > bound


async def test_an_exchange_over_the_bound_alone_is_kept_until_the_next(
    start_server: StartServer, connect: Connect
) -> None:
    server = await _server(start_server, 1000)
    client = await connect(server.url())
    await _echo(client, "small")
    big = "b" * 3000
    await _echo(client, big)
    # Only the newest exchange is left, whole, though it is six times the bound.
    assert await _seen(client) == [
        {"role": "user", "text": big, "agent": None},
        {"role": "agent", "text": big, "agent": "echo"},
    ]
    # The next exchange pushes it out.
    seen = await _seen(client)
    assert [e["text"] for e in seen][:1] == ["?"] and big not in [e["text"] for e in seen]


class HistorySize(connic.Agent):
    """Answers with how much history it sees (not the history: that may be megabytes)."""

    async def respond(self, turn: connic.Turn) -> AsyncIterator[str | connic.Usage]:
        history = turn.session.history
        texts = [entry.text for entry in history]
        first = texts[0][:10] if texts else ""
        yield json.dumps({"entries": len(texts), "bytes": sum(map(len, texts)), "first": first})


async def test_the_default_bound_is_4_mib(start_server: StartServer, connect: Connect) -> None:
    registry = test_registry()
    registry.register("agents", "historysize", HistorySize)
    agents = {"echo": {"use": "echo"}, "size": {"use": "historysize"}}
    server = await start_server(make_config({"streaming": False}, agents), registry=registry)
    client = await connect(server.url(), max_size=None)

    async def seen() -> dict[str, Any]:
        frames = await client.reply({"message": "?", "agent": "size"})
        answer: dict[str, Any] = json.loads(frames[-1]["response"])
        return answer

    for i in range(20):  # a long conversation of small turns is kept whole
        await _echo(client, f"turn {i}")
    assert await seen() == {"entries": 40, "bytes": sum(2 * len(f"turn {i}") for i in range(20)), "first": "turn 0"}
    for i in range(6):  # six exchanges of 1.8 MB: the newest two fit in 4 MiB
        await _echo(client, f"{i} " + "x" * 900_000)
    assert await seen() == {"entries": 4, "bytes": 4 * 900_002, "first": "4 xxxxxxxx"}
