"""A load client for any server speaking the connic protocol, spread over several processes.

Modes (each run in every worker process, results summed or merged by the caller):
- closed loop: each connection sends its next message when the previous reply has ended;
  measures the maximum throughput (turns/s);
- open loop: messages are scheduled at a fixed offered rate whatever the server does, and every
  latency is timed from the *scheduled* send time, so a stalled server cannot hide its stalls
  (no coordinated omission);
- idle: open N authenticated connections and hold them (memory per connection);
- setup: connect + authenticate + `connected` + close, as fast as possible (connections/s).
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing as mp
import resource
import time
from collections.abc import Callable
from typing import Any

import aiohttp

MESSAGE_TEXT = " ".join(f"word{i}" for i in range(20))
END_TYPES = ("stream_end", "response")


def raise_fd_limit() -> None:
    """Allow as many sockets as the hard limit permits."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def _open(session: aiohttp.ClientSession, url: str, secret: str) -> aiohttp.ClientWebSocketResponse:
    ws = await session.ws_connect(url, autoping=True, max_msg_size=0)
    await ws.send_str(json.dumps({"secret": secret}))
    msg = await ws.receive()
    if json.loads(msg.data).get("type") != "connected":
        raise RuntimeError(f"not connected: {msg.data}")
    return ws


def _session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=True))


async def _closed_loop(url: str, secret: str, conns: int, duration: float) -> dict[str, Any]:
    message = json.dumps({"message": MESSAGE_TEXT})
    turns = 0

    async def one(ws: aiohttp.ClientWebSocketResponse, deadline: float) -> None:
        nonlocal turns
        while time.monotonic() < deadline:
            await ws.send_str(message)
            while True:
                msg = await ws.receive()
                if msg.type is not aiohttp.WSMsgType.TEXT:
                    raise RuntimeError(f"connection ended: {msg.type}")
                if json.loads(msg.data)["type"] in END_TYPES:
                    break
            turns += 1

    async with _session() as session:
        sockets = await asyncio.gather(*(_open(session, url, secret) for _ in range(conns)))
        started = time.monotonic()
        await asyncio.gather(*(one(ws, started + duration) for ws in sockets))
        elapsed = time.monotonic() - started
        for ws in sockets:
            await ws.close()
    return {"turns": turns, "seconds": elapsed}


async def _open_loop(url: str, secret: str, rate: float, duration: float, conns: int, tag: str) -> dict[str, Any]:
    records: dict[str, dict[str, float]] = {}
    async with _session() as session:
        sockets = await asyncio.gather(*(_open(session, url, secret) for _ in range(conns)))

        async def read(ws: aiohttp.ClientWebSocketResponse) -> None:
            async for msg in ws:
                frame = json.loads(msg.data)
                record = records.get(frame.get("id"))
                if record is None:
                    continue
                now = time.monotonic()
                kind = frame["type"]
                if kind == "ack":
                    record["ack"] = now
                elif kind in ("stream_chunk", "response") and "first" not in record:
                    record["first"] = now
                if kind in END_TYPES:
                    record["end"] = now

        readers = [asyncio.create_task(read(ws)) for ws in sockets]
        count = int(rate * duration)
        start = time.monotonic() + 0.1
        for i in range(count):
            scheduled = start + i / rate
            delay = scheduled - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            mid = f"{tag}-{i}"
            records[mid] = {"scheduled": scheduled}
            await sockets[i % conns].send_str(json.dumps({"id": mid, "message": MESSAGE_TEXT}))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any("end" not in r for r in records.values()):  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        for task in readers:
            task.cancel()
        for ws in sockets:
            await ws.close()
    latencies: dict[str, list[float]] = {"ack": [], "first": [], "end": []}
    lost = 0
    for record in records.values():
        if "end" not in record:
            lost += 1
            continue
        for key in latencies:
            latencies[key].append(record[key] - record["scheduled"])
    return {"latencies": latencies, "sent": len(records), "lost": lost}


async def _hold_idle(url: str, secret: str, n: int, ready: Any, release: Any) -> dict[str, Any]:
    async with _session() as session:
        sockets = []
        for i in range(0, n, 250):
            batch = min(250, n - i)
            sockets += await asyncio.gather(*(_open(session, url, secret) for _ in range(batch)))
        ready.put(len(sockets))
        while not release.is_set():  # noqa: ASYNC110 - a multiprocessing event, not an asyncio one
            await asyncio.sleep(0.1)
        await asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)
    return {"held": len(sockets)}


async def _setup(url: str, secret: str, concurrency: int, duration: float) -> dict[str, Any]:
    done = 0

    async def loop(session: aiohttp.ClientSession, deadline: float) -> None:
        nonlocal done
        while time.monotonic() < deadline:
            ws = await _open(session, url, secret)
            await ws.close()
            done += 1

    async with _session() as session:
        started = time.monotonic()
        await asyncio.gather(*(loop(session, started + duration) for _ in range(concurrency)))
        elapsed = time.monotonic() - started
    return {"connections": done, "seconds": elapsed}


def _worker(mode: str, args: tuple[Any, ...]) -> dict[str, Any]:
    raise_fd_limit()
    runners: dict[str, Callable[..., Any]] = {
        "closed": _closed_loop,
        "open": _open_loop,
        "idle": _hold_idle,
        "setup": _setup,
    }
    result: dict[str, Any] = asyncio.run(runners[mode](*args))
    return result


def run(mode: str, per_process_args: list[tuple[Any, ...]]) -> list[dict[str, Any]]:
    """Run ``mode`` in one process per argument tuple; return their results."""
    ctx = mp.get_context("spawn")
    with ctx.Pool(len(per_process_args)) as pool:
        return pool.starmap(_worker, [(mode, args) for args in per_process_args])


def closed_loop(url: str, secret: str, conns: int, duration: float, processes: int) -> float:
    """Turns per second with ``conns`` connections in closed loop."""
    split = [conns // processes + (1 if i < conns % processes else 0) for i in range(processes)]
    results = run("closed", [(url, secret, c, duration) for c in split if c])
    return sum(r["turns"] for r in results) / max(r["seconds"] for r in results)


def open_loop(url: str, secret: str, rate: float, duration: float, conns: int, processes: int) -> dict[str, Any]:
    """p50/p99 latencies (seconds, from the scheduled send) at a fixed offered ``rate``."""
    results = run(
        "open", [(url, secret, rate / processes, duration, conns // processes, f"p{i}") for i in range(processes)]
    )
    merged: dict[str, list[float]] = {"ack": [], "first": [], "end": []}
    for result in results:
        for key in merged:
            merged[key] += result["latencies"][key]
    summary: dict[str, Any] = {"lost": sum(r["lost"] for r in results), "sent": sum(r["sent"] for r in results)}
    for key, values in merged.items():
        values.sort()
        if values:
            summary[f"{key}_p50"] = values[len(values) // 2]
            summary[f"{key}_p99"] = values[min(len(values) - 1, int(len(values) * 0.99))]
    return summary


def setup_rate(url: str, secret: str, concurrency: int, duration: float, processes: int) -> float:
    """Connections per second (connect, authenticate, connected, close)."""
    results = run("setup", [(url, secret, concurrency // processes, duration) for _ in range(processes)])
    return sum(r["connections"] for r in results) / max(r["seconds"] for r in results)
