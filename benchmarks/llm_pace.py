"""S7 "LLM pace": many concurrent sessions at an LLM's pace, the agent reading the whole history each turn.

    python benchmarks/llm_pace.py --sessions 1000 --turns 5     # connic and the aiohttp baseline

Each session's history is first filled with 25 fast exchanges (50 entries). Then every
session sends ``turns`` messages one after another, each answered with 20 chunks 50 ms apart
(ideal turn: 1.0 s) by an agent that builds a prompt from the whole history
(benchmarks/pace_agent.py in connic, ``baseline_aiohttp.py --pace``). Sessions start at
random offsets within the first second, so the load is steady. Reported: the server's CPU
time (user + system, /proc/PID/stat) per measured turn, and p50/p99 turn latency (message
sent to ``stream_end``) as seen by the client.

The client side is kept cheap for a 2-core machine: a few processes with many connections
each, and a frame is recognised by its first bytes, not parsed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
import loadgen
import servers

PREFILL = 25  # exchanges before measuring: 50 history entries
MESSAGE = " ".join(f"word{i}" for i in range(20))


async def _turn(ws: aiohttp.ClientWebSocketResponse, frame: str) -> float:
    """Send one message; seconds until its ``stream_end``."""
    started = time.perf_counter()
    await ws.send_str(frame)
    while True:
        msg = await ws.receive()
        if msg.type is not aiohttp.WSMsgType.TEXT:
            raise RuntimeError(f"connection ended: {msg.type} {msg.data!r}")
        head = msg.data[:24]  # {"type":"stream_end" (connic) or {"type": "stream_end" (json.dumps)
        if '"stream_end"' in head:
            return time.perf_counter() - started
        if '"error"' in head:
            raise RuntimeError(f"error frame: {msg.data}")


async def _client(
    url: str, conns: int, prefill: int, turns: int, stagger: float, ready: Any, go: Any, done: Any, release: Any
) -> dict[str, Any]:
    fast = json.dumps({"message": MESSAGE, "context": {"fast": True}})
    paced = json.dumps({"message": MESSAGE})
    async with loadgen._session() as session:
        sockets: list[aiohttp.ClientWebSocketResponse] = []
        for i in range(0, conns, 250):
            batch = min(250, conns - i)
            sockets += await asyncio.gather(*(loadgen._open(session, url, servers.SECRET) for _ in range(batch)))

        async def fill(ws: aiohttp.ClientWebSocketResponse) -> None:
            for _ in range(prefill):
                await _turn(ws, fast)

        await asyncio.gather(*(fill(ws) for ws in sockets))
        ready.put(len(sockets))
        while not go.is_set():  # noqa: ASYNC110 - a multiprocessing event, not an asyncio one
            await asyncio.sleep(0.02)

        async def converse(ws: aiohttp.ClientWebSocketResponse) -> list[float]:
            await asyncio.sleep(random.uniform(0, stagger))
            return [await _turn(ws, paced) for _ in range(turns)]

        cpu, wall = time.process_time(), time.monotonic()
        results = await asyncio.gather(*(converse(ws) for ws in sockets))
        latencies = [t for per in results for t in per]
        client_share = (time.process_time() - cpu) / (time.monotonic() - wall)
        done.put({"latencies": latencies, "turns": len(latencies), "client_cpu_share": client_share})
        while not release.is_set():  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        await asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)
    return {}


def _worker(*args: Any) -> None:
    servers.raise_fd_limit()
    asyncio.run(_client(*args))


def measure(
    url: str,
    pid: int,
    sessions: int,
    turns: int,
    processes: int = 2,
    prefill: int = PREFILL,
    stats_port: int | None = None,
    cpu: Callable[[], float] | None = None,
) -> dict[str, float]:
    """S7 against the server at ``url`` (process ``pid``): CPU per turn and turn latencies.

    With ``stats_port`` (the in-process connic), also the replay logs' encoded bytes per frame.
    ``cpu`` reads the CPU seconds to count (default: process ``pid``'s own; e.g. a whole
    ``--workers`` tree, or connic plus its Redis).
    """
    read_cpu = cpu if cpu is not None else (lambda: servers.cpu_seconds(pid))
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        ready, done, go, release = manager.Queue(), manager.Queue(), manager.Event(), manager.Event()
        share = [sessions // processes + (1 if i < sessions % processes else 0) for i in range(processes)]
        workers = [
            ctx.Process(target=_worker, args=(url, n, prefill, turns, 1.0, ready, go, done, release))
            for n in share
            if n
        ]
        for worker in workers:
            worker.start()
        try:
            held = sum(ready.get(timeout=600) for _ in workers)
            cpu0, wall0 = read_cpu(), time.monotonic()
            go.set()
            results = [done.get(timeout=600) for _ in workers]
            cpu1, wall1 = read_cpu(), time.monotonic()
            log = servers.stats(stats_port) if stats_port is not None else None
        finally:
            release.set()
            for worker in workers:
                worker.join(60)
                if worker.exitcode is None:
                    worker.kill()
    latencies = [t for r in results for t in r["latencies"]]
    done_turns = sum(r["turns"] for r in results)
    extra = {}
    if log is not None and log["log_frames"]:
        extra = {
            "log_frames": log["log_frames"],
            "log_bytes_per_frame": log["log_bytes"] / log["log_frames"],
            "log_memory_per_frame": log["log_bytes_in_memory"] / log["log_frames"],
            "log_frames_per_session": log["log_frames"] / max(1, log["sessions"]),
            # 2 * (PREFILL + turns) when every turn went into the history: 50 entries read at the first measured one
            "history_per_session": log["history_entries"] / max(1, log["sessions"]),
        }
    return {
        **extra,
        "sessions": held,
        "turns": done_turns,
        "cpu_us_per_turn": (cpu1 - cpu0) / done_turns * 1e6,
        "cpu_share": (cpu1 - cpu0) / (wall1 - wall0),
        "client_cpu_share": max(r["client_cpu_share"] for r in results),  # the busiest client process
        "p50_s": servers.percentile(latencies, 0.5),
        "p99_s": servers.percentile(latencies, 0.99),
        "max_s": max(latencies),
    }


def run_both(sessions: int, turns: int, rounds: int = 1) -> dict[str, list[dict[str, float]]]:
    """S7 on connic and the aiohttp baseline, interleaved, ``rounds`` times; a fresh server each."""
    results: dict[str, list[dict[str, float]]] = {"connic": [], "aiohttp": []}
    for round_ in range(rounds):
        for server in ("connic", "aiohttp"):
            print(f"S7 round {round_ + 1}/{rounds}: {server}, {sessions} sessions", file=sys.stderr)
            start = servers.connic_inprocess("pace") if server == "connic" else servers.baseline_pace()
            with start as (url, port, pid):
                stats_port = port if server == "connic" else None
                results[server].append(measure(url, pid, sessions, turns, stats_port=stats_port))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=1000)
    parser.add_argument("--turns", type=int, default=5, help="measured turns per session")
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    servers.raise_fd_limit()
    print(json.dumps(run_both(args.sessions, args.turns, args.rounds), indent=1))


if __name__ == "__main__":
    main()
