"""/metrics after a scripted exchange: every counter equals what the clients saw.

The clients tally what they received (acks, tokens per agent from ``stream_end``, error
frames by code, close codes); the scrape must say the same. Slow-consumer closes are
checked the same way in test_slow_client.py, where a real slow consumer exists.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

from conftest import SECRET, StartServer

from .conftest import scrape
from .rawws import BINARY, RawWS, close_frame, frame, open_raw, text

CONFIG: dict[str, Any] = {
    "agents": {"a": {"use": "echo"}, "b": {"use": "echo"}, "slow": {"use": "echo", "delay": 0.05}},
    "connectors": [
        {"path": "/ws", "agents": ["a", "b"], "secrets": [SECRET], "max_frame_bytes": 1024},
        {
            "path": "/limited",
            "agents": ["slow"],
            "secrets": [SECRET],
            "max_queued": 1,
            "rate_limit": {"messages": 3, "per": 60},
        },
    ],
}


class Tally:
    """What the clients saw, per connector."""

    def __init__(self) -> None:
        self.acks: Counter[str] = Counter()
        self.errors: Counter[tuple[str, str]] = Counter()
        self.tokens: Counter[tuple[str, str]] = Counter()
        self.turns: Counter[tuple[str, str]] = Counter()
        self.closes: Counter[tuple[str, str]] = Counter()
        self.connections: Counter[str] = Counter()
        self.sessions: Counter[str] = Counter()

    def see(self, path: str, f: dict[str, Any]) -> None:
        kind = f["type"]
        if kind == "ack":
            self.acks[path] += 1
        elif kind == "error":
            self.errors[path, f["code"]] += 1
        elif kind == "connected":
            self.sessions[path] += 1
        elif kind == "stream_end":
            self.turns[f["agent"], f["finish_reason"]] += 1
            for name, kind_ in (("prompt_tokens", "prompt"), ("candidates_tokens", "candidates")):
                self.tokens[f["agent"], kind_] += f["token_usage"][name]


async def _open(port: int, path: str, tally: Tally, secret: str | None = SECRET) -> RawWS:
    ws = await open_raw(port, path)
    tally.connections[path] += 1
    if secret is not None:
        await ws.send_json({"secret": secret})
    return ws


async def _read(ws: RawWS, path: str, tally: Tally, until: int, kinds: tuple[str, ...]) -> None:
    """Read and tally frames until ``until`` frames of ``kinds`` have come."""
    seen = 0
    while seen < until:
        f = await ws.recv()
        tally.see(path, f)
        seen += f["type"] in kinds or f.get("code") in kinds


async def _finish(ws: RawWS, path: str, tally: Tally, code: int | None = 1000) -> None:
    """Close (or wait for the server's close) and tally what came before it and the close code."""
    if code is not None:
        await ws.send_raw(close_frame(code))
    got, frames, got_close = await ws.closed()
    for f in frames:
        tally.see(path, f)
    assert got_close
    tally.closes[path, str(got)] += 1


async def _script(port: int) -> Tally:
    tally = Tally()
    # /ws: three messages, two agents (the third only to b), then every kind of bad input.
    ws = await _open(port, "/ws", tally)
    await _read(ws, "/ws", tally, 1, ("connected",))
    await ws.send_json({"message": "one two"})
    await ws.send_json({"message": "three four five"})
    await ws.send_json({"type": "message", "payload": {"message": "six", "agent": "b"}})
    await _read(ws, "/ws", tally, 5, ("stream_end",))
    await ws.send_raw(text("not json"))
    await ws.send_raw(text({"type": "nonsense"}))
    await ws.send_raw(text({"type": "message", "payload": {"message": "x", "agent": "nobody"}}))
    await ws.send_raw(frame(BINARY, b"\x00"))
    await ws.send_raw(text({"type": "cancel", "id": "never-sent"}))
    await ws.send_raw(text({"id": "bad", "message": 42}))
    await _read(ws, "/ws", tally, 6, ("error",))
    await _finish(ws, "/ws", tally)
    # A wrong secret (4001), an unauthenticated client that leaves (1000).
    ws = await _open(port, "/ws", tally, secret="wrong")
    await _finish(ws, "/ws", tally, code=None)
    ws = await _open(port, "/ws", tally, secret=None)
    await _finish(ws, "/ws", tally)
    # /limited: one answered, one queued, one queue_full, one rate_limited.
    ws = await _open(port, "/limited", tally)
    await _read(ws, "/limited", tally, 1, ("connected",))
    await ws.send_json({"id": 0, "message": "x y"})
    await _read(ws, "/limited", tally, 1, ("stream_start",))
    await ws.send_raw(b"".join(text({"id": i, "message": "x y"}) for i in range(1, 4)))
    await _read(ws, "/limited", tally, 2, ("stream_end",))
    await _finish(ws, "/limited", tally)
    return tally


async def test_metrics_match_what_the_clients_saw(start_server: StartServer) -> None:
    server = await start_server(CONFIG)
    port = int(server.server.port)
    tally = await _script(port)
    # Sanity of the script itself.
    assert tally.acks == {"/ws": 3, "/limited": 2}
    assert tally.errors["/limited", "queue_full"] == 1 and tally.errors["/limited", "rate_limited"] == 1
    assert tally.turns == {("a", "stop"): 2, ("b", "stop"): 3, ("slow", "stop"): 2}

    closes = sum(tally.closes.values())
    metrics: dict[str, float] = {}

    async def settled() -> bool:
        metrics.update(await scrape(server.http))
        return sum(v for k, v in metrics.items() if k.startswith("connic_closes_total{")) >= closes

    for _ in range(100):
        if await settled():
            break
    for path in ("/ws", "/limited"):
        label = f'connector="{path}"'
        assert metrics.get(f"connic_messages_total{{{label}}}", 0) == tally.acks[path], path
        assert metrics[f"connic_connections_total{{{label}}}"] == tally.connections[path], path
        assert metrics[f"connic_sessions_total{{{label}}}"] == tally.sessions[path], path
        assert metrics[f"connic_connections_open{{{label}}}"] == 0
        assert metrics[f"connic_sessions_open{{{label}}}"] == 0
        assert metrics.get(f"connic_rate_limited_total{{{label}}}", 0) == tally.errors[path, "rate_limited"]
    errors = {
        (k.split('connector="')[1].split('"')[0], k.split('code="')[1].split('"')[0]): v
        for k, v in metrics.items()
        if k.startswith("connic_errors_total{")
    }
    assert errors == dict(tally.errors)
    tokens = {
        (k.split('agent="')[1].split('"')[0], k.split('kind="')[1].split('"')[0]): v
        for k, v in metrics.items()
        if k.startswith("connic_tokens_total{")
    }
    assert tokens == dict(tally.tokens)
    assert tokens["a", "prompt"] == 5 and tokens["b", "prompt"] == 6
    turns = {
        (k.split('agent="')[1].split('"')[0], k.split('reason="')[1].split('"')[0]): v
        for k, v in metrics.items()
        if k.startswith("connic_turns_total{")
    }
    assert turns == dict(tally.turns)
    for agent, count in (("a", 2), ("b", 3), ("slow", 2)):
        assert metrics[f'connic_turn_duration_seconds_count{{agent="{agent}"}}'] == count
        assert metrics[f'connic_time_to_first_chunk_seconds_count{{agent="{agent}"}}'] == count
        assert metrics[f'connic_turn_duration_seconds_bucket{{agent="{agent}",le="+Inf"}}'] == count
    seen_closes = {
        (k.split('connector="')[1].split('"')[0], k.split('code="')[1].split('"')[0]): v
        for k, v in metrics.items()
        if k.startswith("connic_closes_total{")
    }
    assert seen_closes == dict(tally.closes)
    assert not any(k.startswith("connic_slow_consumer_closes_total{") and v for k, v in metrics.items())


@pytest.mark.parametrize(
    ("data", "code"),
    [
        pytest.param(frame(0x1, b"x" * 2000), 1009, id="1009-too-big"),
        pytest.param(frame(0x1, b"\xff"), 1007, id="1007-invalid-utf8"),
        pytest.param(frame(0x1, b"{}", rsv=2), 1002, id="1002-protocol-error"),
    ],
)
async def test_protocol_error_closes_are_counted_by_the_code_sent(
    start_server: StartServer, data: bytes, code: int
) -> None:
    server = await start_server(CONFIG)
    ws = await open_raw(int(server.server.port))
    await ws.send_json({"secret": SECRET})
    await ws.recv()
    await ws.send_raw(data)
    got, _, got_close = await ws.closed()
    assert got_close and got == code
    metrics: dict[str, float] = {}

    async def counted() -> bool:
        metrics.update(await scrape(server.http))
        return any(k.startswith("connic_closes_total{") for k in metrics)

    for _ in range(100):
        if await counted():
            break
    assert metrics.get(f'connic_closes_total{{code="{code}",connector="/ws"}}') == 1, {
        k: v for k, v in metrics.items() if "closes" in k
    }
    # connic_errors_total counts the error frames sent: message_too_large before a 1009 is one.
    errors = {k: v for k, v in metrics.items() if k.startswith("connic_errors_total{")}
    assert errors == ({'connic_errors_total{code="message_too_large",connector="/ws"}': 1.0} if code == 1009 else {})


async def test_back_to_back_messages_count_the_same_as_spaced_ones(start_server: StartServer) -> None:
    server = await start_server(CONFIG)
    ws = await open_raw(int(server.server.port), "/limited")
    await ws.send_json({"secret": SECRET})
    await ws.recv()
    await ws.send_raw(text({"id": 0, "message": "x"}) + text({"id": 1, "message": "y"}))
    frames = [await ws.recv() for _ in range(2)]
    assert [(f["type"], f["id"]) for f in frames] == [("ack", 0), ("ack", 1)], frames
