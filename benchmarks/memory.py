"""Memory per session: idle attached, detached with an empty replay log, detached with a long one.

    python benchmarks/memory.py --sessions 5000

Each figure on a fresh connic (benchmarks/connic_server.py, the echo agent, run.py's
connector with the default ``resume_window`` and ``replay_buffer``), as server RSS growth
divided by the sessions held:

- attached: N authenticated idle connections held open (S4's figure, of the session core);
- detached, empty log: N sessions that authenticated and dropped their TCP connection
  (a reset, so the session stays resumable) without sending a message;
- detached, with a log: the same after ``exchanges`` streamed echo exchanges each, which
  also gives the replay log's bytes per frame: as encoded (``ReplayLog.stats()``), as held
  in the memory store (each frame a ``str`` and a deque slot), and as RSS growth over the
  empty-log figure divided by the frames logged (which includes the history those
  exchanges add, so it is an upper bound).

Connections are opened and dropped 100 at a time: the memory a dropped connection frees is
reused by the next batch, so the detached figures do not carry N connections' worth of
freed memory that the allocator has not returned to the system.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import loadgen
import servers

BATCH = 100  # connections opened, used and dropped together
WARM = 20  # sessions detached before the baseline RSS is read, so the detach path is warm too
MESSAGE = json.dumps({"message": loadgen.MESSAGE_TEXT})


async def _detach(url: str, n: int, exchanges: int) -> int:
    """Open ``n`` sessions ``BATCH`` at a time, each with ``exchanges`` streamed turns, and reset their connections."""
    done = 0
    async with loadgen._session() as session:
        for i in range(0, n, BATCH):
            batch = await asyncio.gather(
                *(loadgen._open(session, url, servers.SECRET) for _ in range(min(BATCH, n - i)))
            )

            async def talk(ws: Any) -> None:
                for _ in range(exchanges):
                    await ws.send_str(MESSAGE)
                    while True:
                        msg = await ws.receive()
                        if '"stream_end"' in msg.data[:24]:
                            break

            await asyncio.gather(*(talk(ws) for ws in batch))
            for ws in batch:
                ws._conn.transport.abort()
            done += len(batch)
            await asyncio.sleep(0.2)  # let the server see the resets before the next batch
    return done


def _detach_worker(url: str, n: int, exchanges: int) -> int:
    servers.raise_fd_limit()
    return asyncio.run(_detach(url, n, exchanges))


def _wait_for(port: int, state: str, count: int, timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        stats = servers.stats(port)
        if stats["states"].get(state, 0) >= count or time.monotonic() > deadline:
            return stats
        time.sleep(0.2)


def attached(n: int, processes: int = 2) -> dict[str, float]:
    """KB of server RSS per idle attached session."""
    ctx = mp.get_context("spawn")
    with servers.connic_inprocess("echo") as (url, port, pid):
        loadgen.closed_loop(url, servers.SECRET, 4, 0.5, 1)  # warm up the server's code paths
        time.sleep(0.5)
        before = servers.rss_kib(pid)
        with ctx.Manager() as manager:
            ready, release = manager.Queue(), manager.Event()
            share = [n // processes + (1 if i < n % processes else 0) for i in range(processes)]
            holders = [
                ctx.Process(target=loadgen._worker, args=("idle", (url, servers.SECRET, k, ready, release)))
                for k in share
            ]
            for holder in holders:
                holder.start()
            held = sum(ready.get(timeout=300) for _ in holders)
            stats = _wait_for(port, "attached", held)
            time.sleep(1.0)
            after = servers.rss_kib(pid)
            release.set()
            for holder in holders:
                holder.join(60)
    return {"sessions": held, "attached": stats["states"].get("attached", 0), "kb": (after - before) / held}


def detached(n: int, exchanges: int = 0, processes: int = 2) -> dict[str, float]:
    """KB of server RSS per detached session, after ``exchanges`` streamed turns each; the log's figures."""
    ctx = mp.get_context("spawn")
    with servers.connic_inprocess("echo") as (url, port, pid):
        loadgen.closed_loop(url, servers.SECRET, 4, 0.5, 1)
        with ctx.Pool(1) as pool:
            pool.starmap(_detach_worker, [(url, WARM, exchanges)])
        _wait_for(port, "detached", WARM)
        time.sleep(0.5)
        before = servers.rss_kib(pid)
        share = [n // processes + (1 if i < n % processes else 0) for i in range(processes)]
        with ctx.Pool(processes) as pool:
            dropped = sum(pool.starmap(_detach_worker, [(url, k, exchanges) for k in share]))
        stats = _wait_for(port, "detached", WARM + dropped)
        time.sleep(1.0)
        after = servers.rss_kib(pid)
        stats = servers.stats(port)
    frames = stats["log_frames"]
    return {
        "sessions": dropped,
        "detached": stats["states"].get("detached", 0) - WARM,
        "attached": stats["states"].get("attached", 0),
        "kb": (after - before) / dropped,
        "log_frames": frames,
        "log_bytes_per_frame": stats["log_bytes"] / frames if frames else float("nan"),
        "log_memory_per_frame": stats["log_bytes_in_memory"] / frames if frames else float("nan"),
        "frames_per_session": frames / (dropped + WARM),
    }


def measure(n: int, exchanges: int = 10) -> dict[str, Any]:
    """Every memory figure at ``n`` sessions."""
    print(f"memory: {n} attached idle sessions", file=sys.stderr)
    result: dict[str, Any] = {"attached": attached(n)}
    print(f"memory: {n} detached sessions, empty log", file=sys.stderr)
    result["detached_empty"] = detached(n)
    print(f"memory: {n} detached sessions after {exchanges} exchanges", file=sys.stderr)
    full = result["detached_log"] = detached(n, exchanges)
    empty = result["detached_empty"]
    full["rss_per_frame"] = (full["kb"] - empty["kb"]) * 1024 / full["frames_per_session"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=5000)
    parser.add_argument("--exchanges", type=int, default=10)
    args = parser.parse_args()
    servers.raise_fd_limit()
    print(json.dumps(measure(args.sessions, args.exchanges), indent=1))


if __name__ == "__main__":
    main()
