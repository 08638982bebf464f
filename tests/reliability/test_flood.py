"""Flood: one client sends messages as fast as it can; another client barely notices.

The flooder gets ``rate_limited`` (with ``retry_after``) and ``queue_full`` for what is
over the limits, an ack for the rest, and keeps its connection; the server never
crashes; the other client's latency (ack and stream_end of a short message, repeated)
stays within a stated bound.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Callable

import websockets

from conftest import SECRET, StartServer, make_config

from .conftest import Proc, kib, report, scrape
from .rawws import CLOSE, TEXT, Closed, RawWS, open_raw, text

FLOOD_MESSAGES = 100_000
BATCH = 50
WINDOW = 100  # unanswered messages the flooder allows itself (the test below has none)
LATENCY_BOUND = 1.0  # seconds, each of ack and stream_end, for the other client during the flood
TOML = """
[agents.echo]
use = "echo"
delay = 0.01

[[connectors]]
secrets = ["s"]
max_queued = 5
max_messages = 10000
rate_limit = { messages = 50, per = 1 }
"""


async def _victim(url: str, stop: asyncio.Event, latencies: list[tuple[float, float]]) -> None:
    async with websockets.connect(url, open_timeout=5) as ws:
        await ws.send('{"secret": "s"}')
        assert json.loads(await ws.recv())["type"] == "connected"
        n = 0
        while not stop.is_set():
            n += 1
            started = time.monotonic()
            await ws.send(json.dumps({"id": n, "message": "short"}))
            ack = 0.0
            while True:
                frame = json.loads(await asyncio.wait_for(ws.recv(), 10))
                assert frame["type"] != "error", frame
                if frame["type"] == "ack":
                    ack = time.monotonic() - started
                elif frame["type"] == "stream_end":
                    assert frame["full_response"] == "short"
                    latencies.append((ack, time.monotonic() - started))
                    break
            await asyncio.sleep(0.02)


class Flooder:
    """A raw client that writes messages as fast as it can while a task reads every answer."""

    def __init__(self, ws: RawWS) -> None:
        self.ws = ws
        self.outcome: dict[int, str] = {}  # message id -> "ack" / error code
        self.ended: set[int] = set()
        self.closed_with: int | None = None
        self.progress = asyncio.Event()
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        while True:
            try:
                got = await self.ws.read_frame(timeout=30)
            except (Closed, ConnectionError):
                self.progress.set()
                return
            if got.opcode == CLOSE:
                self.closed_with = got.close_code
                self.progress.set()
                return
            if got.opcode != TEXT:
                continue
            frame = got.json()
            kind, message_id = frame["type"], frame.get("id")
            if kind == "ack":
                self.outcome[message_id] = "ack"
            elif kind == "error":
                assert message_id is not None, frame
                assert frame["code"] in ("rate_limited", "queue_full"), frame
                if frame["code"] == "rate_limited":
                    assert 0 <= frame["retry_after"] <= 1, frame  # > 0: see test_retry_after_is_positive
                self.outcome[message_id] = frame["code"]
            elif kind == "stream_end":
                self.ended.add(message_id)
            elif kind == "pong":
                return
            self.progress.set()

    async def flood(self, count: int, window: int | None) -> float:
        """Write ``count`` messages; with a ``window``, never more than that many unanswered."""
        started = time.monotonic()
        step = min(window or BATCH, BATCH)
        for i in range(0, count, step):
            while window is not None and i - len(self.outcome) >= window and not self.reader.done():
                self.progress.clear()
                await asyncio.wait_for(self.progress.wait(), 30)
            if self.reader.done():
                break
            end = min(i + step, count)
            try:
                await self.ws.send_raw(b"".join(text({"id": n, "message": "flood flood"}) for n in range(i, end)))
            except ConnectionError:
                break
            await asyncio.sleep(0)  # let the reader run: this client reads as fast as it writes
        return time.monotonic() - started

    async def aclose(self) -> None:
        self.reader.cancel()
        await asyncio.gather(self.reader, return_exceptions=True)
        self.ws.writer.transport.abort()

    def accepted(self) -> set[int]:
        return {i for i, o in self.outcome.items() if o == "ack"}

    async def answered(self, count: int, timeout: float = 30) -> None:
        """Wait (bounded) until every message has its answer, and every accepted one its stream_end."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self.reader.done():
            if len(self.outcome) >= count and self.ended >= self.accepted():
                return
            await asyncio.sleep(0.05)


async def _flooder(server: Proc) -> Flooder:
    ws = await open_raw(server.port)
    await ws.send_json({"secret": "s"})
    assert (await ws.recv())["type"] == "connected"
    return Flooder(ws)


async def test_flood_is_refused_politely_and_others_are_unaffected(run_cli: Callable[..., Proc]) -> None:
    """The flooder keeps at most WINDOW messages unanswered (HTTP/2-style flow control) and otherwise
    writes as fast as it can."""
    server = run_cli(TOML)
    # The other client's latency with no flood, for comparison.
    quiet: list[tuple[float, float]] = []
    stop = asyncio.Event()
    victim = asyncio.create_task(_victim(server.url, stop, quiet))
    await asyncio.sleep(1.0)
    stop.set()
    await victim

    flooder = await _flooder(server)
    loud: list[tuple[float, float]] = []
    stop = asyncio.Event()
    victim = asyncio.create_task(_victim(server.url, stop, loud))
    rss_before = server.rss_kib()
    flood_time = await flooder.flood(FLOOD_MESSAGES, WINDOW)
    await flooder.answered(FLOOD_MESSAGES)
    rss_flood = server.rss_kib()
    stop.set()
    await victim
    await flooder.ws.send_json({"type": "ping"})
    await asyncio.wait_for(flooder.reader, 30)
    metrics = await scrape(server.http)

    counts = Counter(flooder.outcome.values())
    quiet_end = max(e for _, e in quiet)
    loud_acks = sorted(a for a, _ in loud)
    loud_ends = sorted(e for _, e in loud)
    report(
        "flood: flooder",
        f"{FLOOD_MESSAGES} messages (window {WINDOW}) in {flood_time:.2f} s "
        f"({FLOOD_MESSAGES / flood_time:.0f}/s): {dict(counts)}",
    )
    report(
        "flood: other client's latency",
        f"quiet: {len(quiet)} replies, stream_end max {quiet_end * 1000:.1f} ms; during the flood: "
        f"{len(loud)} replies, ack median {loud_acks[len(loud_acks) // 2] * 1000:.1f} ms / max "
        f"{loud_acks[-1] * 1000:.1f} ms, stream_end median {loud_ends[len(loud_ends) // 2] * 1000:.1f} ms / max "
        f"{loud_ends[-1] * 1000:.1f} ms",
    )
    report("flood: server RSS", f"{kib(rss_before)} before, {kib(rss_flood)} after the flood")

    assert flooder.closed_with is None, flooder.closed_with
    assert len(flooder.outcome) == FLOOD_MESSAGES, (len(flooder.outcome), counts)
    assert counts["rate_limited"] > 0 and counts["queue_full"] > 0, counts
    assert counts["ack"] + counts["rate_limited"] + counts["queue_full"] == FLOOD_MESSAGES
    assert flooder.ended == flooder.accepted()  # every accepted message was answered in full
    assert metrics['connic_rate_limited_total{connector="/ws"}'] == counts["rate_limited"]
    assert metrics['connic_errors_total{code="queue_full",connector="/ws"}'] == counts["queue_full"]
    assert metrics.get('connic_slow_consumer_closes_total{connector="/ws"}', 0) == 0
    assert len(loud) >= 5
    for ack, end in loud:
        assert ack < LATENCY_BOUND and end < LATENCY_BOUND, (ack, end)
    assert server.proc.poll() is None, "the server died"
    assert "Traceback" not in server.output


async def test_pipelining_client_that_reads_is_not_a_slow_consumer(run_cli: Callable[..., Proc]) -> None:
    server = run_cli(TOML)
    flooder = await _flooder(server)
    await flooder.flood(FLOOD_MESSAGES // 4, window=None)
    await flooder.answered(FLOOD_MESSAGES // 4)
    await flooder.aclose()
    assert flooder.closed_with is None, f"closed with {flooder.closed_with}"
    assert len(flooder.outcome) == FLOOD_MESSAGES // 4


async def test_retry_after_is_positive(start_server: StartServer) -> None:
    # A bucket that refills in 0.4 ms: every refusal waits less than 0.5 ms.
    server = await start_server(make_config({"rate_limit": {"messages": 1, "per": 0.0004}}))
    ws = await open_raw(int(server.server.port))
    await ws.send_json({"secret": SECRET})
    await ws.recv()
    await ws.send_raw(b"".join(text({"id": i, "message": "m"}) for i in range(8)))
    limited, answered, ended = [], 0, False
    while answered < 8 or not ended:
        frame = await ws.recv()
        answered += frame["type"] == "ack" or frame.get("code") == "rate_limited"
        ended = ended or frame["type"] == "stream_end"
        if frame.get("code") == "rate_limited":
            limited.append(frame["retry_after"])
    assert limited, "nothing was rate limited"
    assert all(0 < retry <= 0.0004 + 0.001 for retry in limited), limited
