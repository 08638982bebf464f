"""AG-UI over WebSocket: a client that stops reading while its resume follows a run another process answers.

As tests/test_redis_follow_slow.py for the Connic protocol: on one process a client that takes
nothing for ``send_timeout`` is closed as a slow consumer (4010) and the server holds a bounded
outbox meanwhile; a resume on process B following process A's run must do the same, not queue
every event it follows. Each case runs on one process (``memory`` store, the client resuming on
it) and on two ``python -m connic run`` processes sharing a real ``redis-server`` (resuming on B);
B's resident memory is sampled until the close.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest
import websockets
from redis_server import redis_server_fixture  # noqa: F401  (a fixture)
from reliability.conftest import report, scrape
from reliability.rawws import open_raw
from test_redis_follow_slow import MESSAGE
from test_redis_held import launch  # noqa: F401  (a fixture)

from conftest import SECRET, CliServer

CONNECTOR = (
    'transport = "agui"',
    "send_queue = 16",
    "send_timeout = 1",
    'on_disconnect = "continue"',
    f"max_body_bytes = {2 * len(MESSAGE) + 4096}",
)
AGENT = 'use = "echo"\ndelay = 0.005'
AUTH = {"Authorization": f"Bearer {SECRET}"}
SLOW = 'connic_slow_consumer_closes_total{connector="/ws"}'


def _rss(server: CliServer) -> int:
    for line in Path(f"/proc/{server.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _run_input(thread_id: str, text: str) -> dict[str, Any]:
    return {
        "threadId": thread_id,
        "runId": "r1",
        "state": {},
        "messages": [{"id": "u1", "role": "user", "content": text}],
        "tools": [],
        "context": [],
        "forwardedProps": {},
    }


@pytest.mark.parametrize("shared", [False, True], ids=["one_process", "follower"])
async def test_a_client_that_stops_reading_while_following_a_run_is_closed_and_bounded(
    launch: Any,  # noqa: F811  (the fixture imported above)
    shared: bool,
) -> None:
    a = await launch(*CONNECTOR, shared=shared, agent=AGENT)
    b = await launch(*CONNECTOR, agent=AGENT) if shared else a
    ws = await websockets.connect(f"ws://127.0.0.1:{a.port}/ws/ws", additional_headers=AUTH, max_size=None)
    await ws.send(json.dumps(_run_input("t-slow", MESSAGE)))
    seen = []
    while sum(e["type"] == "TEXT_MESSAGE_CONTENT" for e in seen) < 5:
        seen.append(json.loads(await asyncio.wait_for(ws.recv(), 30)))
    ws.transport.abort()

    base = _rss(b)
    raw = await open_raw(b.port, "/ws/ws", headers=AUTH, rcvbuf=4096)
    await raw.send_json({"type": "resume", "threadId": "t-slow", "lastSeq": seen[-1]["seq"]})
    raw.pause_reading()
    started = time.monotonic()
    peak = base
    closed = None
    while time.monotonic() - started < 90:
        peak = max(peak, _rss(b))
        if (await scrape(f"http://127.0.0.1:{b.port}")).get(SLOW, 0) >= 1:
            closed = time.monotonic() - started
            break
        await asyncio.sleep(0.1)
    report(
        f"agui ws {'follower' if shared else 'one process'}: stopped reading",
        f"closed 4010 after {closed} s; RSS {base / 2**20:.0f} -> peak {peak / 2**20:.0f} MiB",
    )
    raw.reset()
    assert closed is not None, f"never closed as a slow consumer; RSS grew {(peak - base) / 2**20:.0f} MiB"
    assert peak - base < 64 * 2**20, f"RSS grew {(peak - base) / 2**20:.0f} MiB before the close"
