"""A client that stops reading while echo streams megabytes to it.

The server (``python -m connic run``, watched through /proc) must not buffer the
reply: backpressure reaches the agents, the client is closed as a slow consumer
(4010) after ``send_timeout``, the server's RSS stays within a bound, and another
client on the same connector keeps getting its replies meanwhile. The connector
cancels replies when a connection drops (``on_disconnect = "cancel"``), so the
agents stop once the slow consumer is gone.

One scenario runs once per module (it takes a few seconds); the tests check what it recorded.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import websockets

from conftest import StartServer, start_cli

from .conftest import Proc, RssSampler, eventually, kib, report, runtime, scrape, wait_metric
from .rawws import Closed, open_raw


def _kernel_send_buffer_max() -> int:
    """The most a loopback socket's kernel send buffer grows to (tcp_wmem max): invisible in RSS."""
    try:
        return int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])
    except (OSError, IndexError, ValueError):
        return 4 * 2**20


AGENTS = ("a1", "a2", "a3", "a4")  # every agent echoes the big message: the reply is 4x the message
WORD = "x" * 999 + " "
KERNEL_BUFFER = _kernel_send_buffer_max()
# The reply must be well over what the kernel buffers, or backpressure never reaches the agents.
REPLY_BYTES = max(8 * 2**20, 2 * KERNEL_BUFFER + 2 * 2**20)
WORDS = REPLY_BYTES // len(AGENTS) // len(WORD)  # 2048 words (a 2 MiB message) with a 4 MiB tcp_wmem
SEND_TIMEOUT = 1.0
RSS_BOUND_KIB = 48 * 1024  # peak RSS over the baseline while the slow client is served
LATENCY_BOUND = 2.0  # seconds, for the other client's ack and stream_end
RELEASE_WITHIN = SEND_TIMEOUT + 2.0 + 2.0  # send_timeout + aiohttp's close timeout + slack

CONNECTOR = f"""secrets = ["s"]
send_queue = 16
max_messages = 10000
max_frame_bytes = {2 * len(WORD) * WORDS}
on_disconnect = "cancel"
"""
# The control client reads everything, but on a busy machine it can fall more than SEND_TIMEOUT
# behind: it is served by a connector that differs only in a send_timeout out of its way.
CONTROL_SEND_TIMEOUT = 60.0
TOML = (
    "".join(f'[agents.{name}]\nuse = "echo"\n\n' for name in AGENTS)
    + f'[[connectors]]\npath = "/ws"\nsend_timeout = {SEND_TIMEOUT}\n{CONNECTOR}\n'
    + f'[[connectors]]\npath = "/control"\nsend_timeout = {CONTROL_SEND_TIMEOUT}\n{CONNECTOR}'
)


async def _control(server: Proc) -> tuple[int, int]:
    """The same big message to a client that reads everything: (RSS before, peak RSS)."""
    reader = await websockets.connect(f"ws://127.0.0.1:{server.port}/control", open_timeout=5, max_size=None)
    await reader.send('{"secret": "s"}')
    await reader.recv()
    await reader.send('{"message": "warm up"}')
    ends = 0
    while ends < len(AGENTS):
        ends += '"type":"stream_end"' in await asyncio.wait_for(reader.recv(), 10)
    before = server.rss_kib()
    with RssSampler(server) as sampler:
        await reader.send(json.dumps({"id": "control", "message": WORD * WORDS}))
        ends = 0
        while ends < len(AGENTS):
            ends += '"type":"stream_end"' in await asyncio.wait_for(reader.recv(), 30)
        await reader.close()
    return before, sampler.peak


async def _scenario(server: Proc) -> dict[str, Any]:
    got: dict[str, Any] = {"latencies": [], "sockets_idle": server.sockets()}
    fast = await websockets.connect(server.url, open_timeout=5, max_size=None)
    await fast.send('{"secret": "s"}')
    assert '"connected"' in await fast.recv()

    async def exchange(n: int) -> tuple[float, float]:
        started = time.monotonic()
        message = {"type": "message", "id": n, "payload": {"message": f"reply {n}", "agent": "a1"}}
        await fast.send(json.dumps(message))
        ack = end = 0.0
        while True:
            frame = json.loads(await asyncio.wait_for(fast.recv(), 10))
            assert frame["type"] != "error", frame
            if frame["type"] == "ack":
                ack = time.monotonic() - started
            elif frame["type"] == "stream_end":
                end = time.monotonic() - started
                assert frame["full_response"] == f"reply {n}", frame
                return ack, end

    await exchange(0)  # warm-up
    slow = await open_raw(server.port, rcvbuf=4096)
    await slow.send_json({"secret": "s"})
    assert (await slow.recv())["type"] == "connected"
    got["rss_before"] = server.rss_kib()
    with RssSampler(server) as sampler:
        started = time.monotonic()
        await slow.send_json({"id": "big", "message": WORD * WORDS})
        slow.pause_reading()  # from now on the client never reads
        n = 0
        closed_at = None
        metrics: dict[str, float] = {}
        # The other client keeps talking until a while after the slow one is closed (bounded).
        while time.monotonic() - started < 30:
            n += 1
            got["latencies"].append(await exchange(n))
            await asyncio.sleep(0.05)
            if closed_at is None:
                metrics = await scrape(server.http)
                if metrics.get('connic_slow_consumer_closes_total{connector="/ws"}'):
                    closed_at = time.monotonic() - started
                    got["replies_before_close"] = n
            elif time.monotonic() - started > closed_at + 1:
                break
        got["closed_after"] = closed_at
    got["rss_peak"] = sampler.peak
    got["rss_samples"] = sampler.samples
    got["replies"] = n
    # The client still does not read: does the server let go of its socket?
    await eventually(lambda: server.sockets() <= got["sockets_idle"] + 1, RELEASE_WITHIN, every=0.1)
    got["sockets_after"] = server.sockets()
    got["metrics"] = await wait_metric(server.http, 'connic_turns_total{agent="a4",reason="cancelled"}', 1)
    # Now read whatever the server had sent: its close frame, or a reset.
    slow.resume_reading()
    try:
        code, frames, got_close = await slow.closed(timeout=20)
    except Closed:
        code, frames, got_close = None, [], False
    got.update(close_code=code, got_close=got_close, frames=frames, received=slow.received)
    await slow.aclose()
    await fast.close()
    return got


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    path: Path = tmp_path_factory.mktemp("slow") / "slow.toml"
    path.write_text(TOML, encoding="utf-8")
    control = Proc(start_cli("--config", str(path)))
    try:
        control_before, control_peak = asyncio.run(_control(control))
    finally:
        control.kill()
    server = Proc(start_cli("--config", str(path)))
    try:
        got = asyncio.run(_scenario(server))
        stopping = time.monotonic()
        server.signal()
        got["exit"] = server.wait(timeout=30)
        got["stop_time"] = time.monotonic() - stopping
    finally:
        server.kill()
    got["output"] = server.output
    got["rss_control_before"], got["rss_control_peak"] = control_before, control_peak
    acks = sorted(a for a, _ in got["latencies"])
    ends = sorted(e for _, e in got["latencies"])
    report("slow client: SIGTERM to exit", f"{got['stop_time']:.2f} s")
    report("slow client: reply that would have been buffered", f"{REPLY_BYTES / 2**20:.0f} MiB")
    report(
        "slow client: server RSS serving the same reply to a client that reads",
        f"baseline {kib(got['rss_control_before'])}, peak {kib(got['rss_control_peak'])} "
        f"(+{(got['rss_control_peak'] - got['rss_control_before']) / 1024:.1f} MiB)",
    )
    report(
        "slow client: server RSS",
        f"baseline {kib(got['rss_before'])}, peak {kib(got['rss_peak'])} "
        f"(+{(got['rss_peak'] - got['rss_before']) / 1024:.1f} MiB; {got['rss_samples']} samples)",
    )
    report("slow client: closed as slow consumer after", f"{got['closed_after']:.2f} s (send_timeout {SEND_TIMEOUT} s)")
    report("slow client: bytes the slow client could still read afterwards", f"{got['received'] / 2**20:.2f} MiB")
    report(
        "slow client: other client's latency",
        f"{len(ends)} replies; ack max {acks[-1] * 1000:.1f} ms; stream_end median "
        f"{ends[len(ends) // 2] * 1000:.1f} ms, max {ends[-1] * 1000:.1f} ms",
    )
    yield got


def test_slow_client_is_closed_and_memory_stays_bounded(scenario: dict[str, Any]) -> None:
    metrics = scenario["metrics"]
    assert scenario["closed_after"] is not None, "the slow client was never closed"
    assert metrics['connic_slow_consumer_closes_total{connector="/ws"}'] == 1
    # Backpressure reached the agents: some had not finished the big reply, and were cancelled.
    cancelled = sum(metrics.get(f'connic_turns_total{{agent="{a}",reason="cancelled"}}', 0) for a in AGENTS)
    assert cancelled >= 1, metrics
    # The server dropped the rest instead of keeping it: the client can read at most what was in the
    # kernel's buffers and the transport's 64 KiB, not the whole reply.
    assert scenario["received"] < min(REPLY_BYTES - 2 * 2**20, 1.5 * KERNEL_BUFFER + 2**20), scenario["received"]
    # What the client eventually reads ends with a 4010 close frame, or a reset (no close frame).
    assert scenario["close_code"] in (4010, None), scenario["close_code"]
    if scenario["got_close"]:
        assert scenario["close_code"] == 4010
    # The bound covers handling the big message itself (its copies: frame, text, JSON, each agent's
    # words), which a client that reads costs just as much (the control, in the report); the
    # 10 MiB reply must not come on top of it.
    assert scenario["rss_peak"] - scenario["rss_before"] < RSS_BOUND_KIB
    assert scenario["exit"] == 0
    assert "Traceback" not in scenario["output"]
    assert "stopped reading; closing 4010" in scenario["output"]


def test_other_client_keeps_getting_replies(scenario: dict[str, Any]) -> None:
    assert scenario["replies_before_close"] >= 3, scenario["replies_before_close"]
    for ack, end in scenario["latencies"]:
        assert ack < LATENCY_BOUND and end < LATENCY_BOUND, (ack, end)


def test_slow_consumer_close_is_accounted_as_4010(scenario: dict[str, Any]) -> None:
    assert scenario["metrics"].get('connic_closes_total{code="4010",connector="/ws"}') == 1
    close_lines = [line for line in scenario["output"].splitlines() if " close session=" in line]
    assert any("code=4010" in line for line in close_lines), close_lines


def test_slow_consumer_socket_is_released(scenario: dict[str, Any]) -> None:
    assert scenario["sockets_after"] <= scenario["sockets_idle"] + 1, (
        scenario["sockets_after"],
        scenario["sockets_idle"],
    )


def test_close_line_is_logged_once_per_connection(scenario: dict[str, Any]) -> None:
    lines = scenario["output"].splitlines()
    opens = [m.group(1) for line in lines if (m := re.search(r" open session=(\S+)", line))]
    closes = [m.group(1) for line in lines if (m := re.search(r" close session=(\S+)", line))]
    assert len(opens) == 2 and sorted(opens) == sorted(closes)
    assert not any("xxxxxxxx" in line for line in lines), "message text in the log"


async def test_outgoing_buffers_stay_bounded(start_server: StartServer) -> None:
    """White-box, in-process: while the client does not read, the connection's outbox never holds more
    than 2 x send_queue frames and the transport's write buffer stays at its 64 KiB high-water mark plus
    one batch (whose stream_end frames carry each agent's full response)."""
    config = {
        "agents": {name: {"use": "echo"} for name in AGENTS},
        "connectors": [
            {
                "path": "/ws",
                "secrets": ["s"],
                "send_queue": 16,
                "send_timeout": SEND_TIMEOUT,
                "max_frame_bytes": 2 * len(WORD) * WORDS,
                "on_disconnect": "cancel",
            }
        ],
    }
    server = await start_server(config)
    app = server.server.app
    transport = runtime(app).transports[0]
    slow = await open_raw(int(server.server.port), rcvbuf=4096)
    await slow.send_json({"secret": "s"})
    assert (await slow.recv())["type"] == "connected"
    (conn,) = transport.connections
    await slow.send_json({"id": "big", "message": WORD * WORDS})
    slow.pause_reading()
    most_frames = most_bytes = samples = 0
    for _ in range(int((SEND_TIMEOUT + 10) / 0.005)):
        if conn not in transport.connections:
            break
        most_frames = max(most_frames, len(conn.writer.items))
        io = conn.writer.transport
        if io is not None and not io.is_closing():
            most_bytes = max(most_bytes, io.get_write_buffer_size())
        samples += 1
        await asyncio.sleep(0.005)
    report(
        "slow client (in-process): most queued while not reading",
        f"{most_frames} frames in the outbox (send_queue 16), {most_bytes / 1024:.0f} KiB in the transport's "
        f"write buffer ({samples} samples)",
    )
    assert conn not in transport.connections, "the slow client was never closed"
    assert runtime(app).metrics.slow_consumers.get("/ws") == 1
    assert most_frames <= 2 * 16 + 1
    # The write buffer holds at most the 64 KiB high-water mark plus one batch: up to 2 x send_queue
    # chunk frames, and a stream_end per agent, which repeats that agent's whole reply (full_response).
    chunk_frame = len(WORD) + 100
    stream_ends = len(AGENTS) * (len(WORD) * WORDS + 300)
    assert most_bytes <= 64 * 1024 + (2 * 16 + 1) * chunk_frame + stream_ends, most_bytes
    slow.writer.transport.abort()
