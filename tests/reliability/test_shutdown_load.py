"""SIGTERM with hundreds of connections open and dozens mid-stream.

Every in-flight reply completes (``stream_end`` with the full text), every socket gets
``server_shutting_down`` and close 1001 within ``shutdown_grace`` + 1 s of the signal,
and ``python -m connic run`` exits 0 without a traceback.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable
from typing import Any

from .conftest import Proc, report
from .rawws import RawWS, open_raw

CONNECTIONS = 500
STREAMING = 50
Frame = dict[str, Any]  # a JSON frame from the server
BATCH = 50  # handshakes in flight at once: two cores are shared with the server
GRACE = 5.0
DELAY = 0.05
TEXT = " ".join(f"w{i}" for i in range(20))  # 20 words at 50 ms: about 1 s of streaming, well within the grace period
TOML = f"""
[server]
shutdown_grace = {GRACE}

[agents.echo]
use = "echo"
delay = {DELAY}

[[connectors]]
secrets = ["s"]
"""


async def _open(port: int) -> RawWS:
    ws = await open_raw(port, timeout=20)
    await ws.send_json({"secret": "s"})
    assert (await ws.recv(timeout=20))["type"] == "connected"
    return ws


async def test_sigterm_with_hundreds_of_connections(run_cli: Callable[..., Proc]) -> None:
    server = run_cli(TOML)
    clients: list[RawWS] = []
    started = time.monotonic()
    for _ in range(0, CONNECTIONS, BATCH):
        clients += await asyncio.gather(*(_open(server.port) for _ in range(BATCH)))
    opened = time.monotonic() - started
    streaming = clients[:STREAMING]
    before: list[list[Frame]] = []
    for i, ws in enumerate(streaming):
        await ws.send_json({"id": f"m{i}", "message": TEXT})
    for ws in streaming:
        before.append(await ws.until("stream_chunk"))
    rss = server.rss_kib()

    signalled = time.monotonic()
    server.signal(signal.SIGTERM)

    async def watch(ws: RawWS) -> tuple[int | None, list[Frame], float]:
        code, frames, got_close = await ws.closed(timeout=GRACE + 10)
        assert got_close, "no close frame"
        return code, frames, time.monotonic() - signalled

    results = await asyncio.gather(*(watch(ws) for ws in clients))
    exit_code = await asyncio.to_thread(server.wait, GRACE + 15)
    exited = time.monotonic() - signalled
    slowest = max(t for _, _, t in results)
    idle_slowest = max(t for _, _, t in results[STREAMING:])
    report(
        "shutdown: load",
        f"{CONNECTIONS} connections opened in {opened:.2f} s, {STREAMING} mid-stream; server RSS {rss / 1024:.1f} MiB",
    )
    report(
        "shutdown: after SIGTERM",
        f"idle sockets closed 1001 within {idle_slowest:.2f} s, all within {slowest:.2f} s "
        f"(bound: grace {GRACE} s + 1 s); process exited {exit_code} after {exited:.2f} s",
    )

    for i, (code, frames, _) in enumerate(results):
        assert code == 1001, (i, code)
        assert frames[-1]["type"] == "error" and frames[-1]["code"] == "server_shutting_down", (i, frames[-1])
        if i < STREAMING:
            mine = [f for f in before[i] + frames if f.get("id") == f"m{i}"]
            chunks = "".join(f["chunk"] for f in mine if f["type"] == "stream_chunk")
            end = mine[-1]
            assert end["type"] == "stream_end" and end["finish_reason"] == "stop", end
            assert end["full_response"] == TEXT == chunks
        else:
            assert [f["code"] for f in frames] == ["server_shutting_down"]
    assert slowest <= GRACE + 1, slowest
    assert exit_code == 0
    assert "Traceback" not in server.output
    assert server.output.count(" close session=") == CONNECTIONS


LONG_GRACE = 1.0
LONG_TOML = f"""
[server]
shutdown_grace = {LONG_GRACE}

[agents.echo]
use = "echo"
delay = 0.25

[[connectors]]
secrets = ["s"]
"""


async def test_sigterm_with_replies_longer_than_the_grace_period(run_cli: Callable[..., Proc]) -> None:
    """Replies of 5 s, grace 1 s: they end ``cancelled`` with what they had, and still every socket
    gets 1001 within grace + 1 s."""
    server = run_cli(LONG_TOML)
    clients: list[RawWS] = []
    for _ in range(2):
        clients += await asyncio.gather(*(_open(server.port) for _ in range(BATCH)))
    streaming = clients[:10]
    before: list[list[Frame]] = []
    for i, ws in enumerate(streaming):
        await ws.send_json({"id": f"m{i}", "message": TEXT})
    for ws in streaming:
        before.append(await ws.until("stream_chunk"))
    signalled = time.monotonic()
    server.signal(signal.SIGTERM)

    async def watch(ws: RawWS) -> tuple[int | None, list[Frame], float]:
        code, frames, got_close = await ws.closed(timeout=LONG_GRACE + 10)
        assert got_close, "no close frame"
        return code, frames, time.monotonic() - signalled

    results = await asyncio.gather(*(watch(ws) for ws in clients))
    exit_code = await asyncio.to_thread(server.wait, LONG_GRACE + 15)
    slowest = max(t for _, _, t in results)
    report(
        "shutdown: replies past the grace period",
        f"{len(clients)} sockets closed 1001 within {slowest:.2f} s (bound: grace {LONG_GRACE} s + 1 s)",
    )
    for i, (code, frames, _) in enumerate(results):
        assert code == 1001
        assert frames[-1]["code"] == "server_shutting_down"
        if i < len(streaming):
            mine = [f for f in before[i] + frames if f.get("id") == f"m{i}"]
            chunks = "".join(f["chunk"] for f in mine if f["type"] == "stream_chunk")
            end = mine[-1]
            assert end["type"] == "stream_end" and end["finish_reason"] == "cancelled", end
            assert end["full_response"] == chunks and TEXT.startswith(chunks) and chunks != TEXT
    assert slowest <= LONG_GRACE + 1, slowest
    assert exit_code == 0
    assert "Traceback" not in server.output
