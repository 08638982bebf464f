"""S8 resume: many sessions dropped mid-stream, all resumed at once.

    python benchmarks/resume.py --sessions 1000

Every session sends one message to the echo agent with 50 ms before each word (a 40-word
message: 40 chunks over 2 s). Once every session has received ``min_chunks`` chunks, the
client processes abort every TCP connection at once (no close frame: the server sees a
reset), wait ``gap`` seconds (the reply goes on into the replay log), then send every
resume frame at once. Two ways to reconnect:

- ``preconnected``: the new connections' WebSocket handshakes were done beforehand, so
  the resume frames go out together and only resuming is timed;
- ``reconnect``: the new connections are opened after the drop, all at once, each sending
  its resume frame as soon as its handshake is done (a mass reconnect).

Timed per session, from sending the resume frame: ``connected`` and the first replayed
frame (the first frame numbered above the client's ``last_seq``). Checked per session:
``resumed`` and ``recovered`` are true, the frames' ``seq`` over both connections run
1, 2, 3 ... with none missing or repeated, and the chunks joined equal ``full_response``
and the message.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
import loadgen
import servers

HERE = Path(__file__).resolve().parent
MESSAGE = " ".join(f"word{i}" for i in range(40))


class _Session:
    __slots__ = (
        "chunks",
        "connected",
        "done",
        "first_at",
        "full",
        "id",
        "problem",
        "resumed_from",
        "sent_at",
        "seqs",
        "token",
    )

    def __init__(self, connected: dict[str, Any]) -> None:
        self.id: str = connected["session_id"]
        self.token: str = connected["resume_token"]
        self.seqs: list[int] = []
        self.chunks: list[str] = []
        self.full: str | None = None
        self.done = asyncio.Event()
        self.problem: str | None = None
        self.connected: dict[str, Any] | None = None  # the resumed connection's `connected`
        self.sent_at = self.first_at = 0.0
        self.resumed_from = 0  # the last_seq of the resume frame

    def take(self, frame: dict[str, Any]) -> None:
        seq = frame.get("seq")
        if not isinstance(seq, int):
            self.problem = f"frame without seq: {frame}"
            self.done.set()
            return
        self.seqs.append(seq)
        kind = frame["type"]
        if kind == "stream_chunk":
            self.chunks.append(frame["chunk"])
        elif kind == "stream_end":
            self.full = frame["full_response"]
            self.done.set()
        elif kind == "error":
            self.problem = f"error frame: {frame}"
            self.done.set()

    def check(self) -> str | None:
        if self.problem:
            return self.problem
        c = self.connected or {}
        if not (c.get("resumed") and c.get("recovered")):
            return f"not resumed/recovered: {c}"
        if self.seqs != list(range(1, len(self.seqs) + 1)):
            return f"seqs not contiguous from 1: {self.seqs}"
        if self.full is None:
            return "no stream_end"
        if "".join(self.chunks) != self.full or self.full != MESSAGE:
            return "chunks joined differ from full_response"
        return None


async def _open_raw(http: aiohttp.ClientSession, url: str) -> aiohttp.ClientWebSocketResponse:
    return await http.ws_connect(url, autoping=True, max_msg_size=0)


async def _open_authenticated(
    http: aiohttp.ClientSession, url: str, n: int
) -> list[tuple[aiohttp.ClientWebSocketResponse, dict[str, Any]]]:
    """``n`` connections, 250 at a time, each authenticated: with its ``connected`` frame."""
    opened = []
    for i in range(0, n, 250):
        batch = await asyncio.gather(*(_open_raw(http, url) for _ in range(min(250, n - i))))
        await asyncio.gather(*(ws.send_str(json.dumps({"secret": servers.SECRET})) for ws in batch))
        for ws in batch:
            opened.append((ws, json.loads((await ws.receive()).data)))
    return opened


async def _client(
    url: str, n: int, min_chunks: int, gap: float, preconnect: bool, barrier: Any, resume_url: str | None = None
) -> dict[str, Any]:
    resume_url = resume_url or url  # where the sessions resume: the same process, or another one
    async with loadgen._session() as http:
        old: list[aiohttp.ClientWebSocketResponse] = []
        sessions: list[_Session] = []
        for ws, connected in await _open_authenticated(http, url, n):
            sessions.append(_Session(connected))
            old.append(ws)
        spare: list[aiohttp.ClientWebSocketResponse] = []
        if preconnect:  # handshakes done now; the server waits auth_timeout (10 s) for their first frame
            for i in range(0, n, 250):
                spare += await asyncio.gather(*(_open_raw(http, resume_url) for _ in range(min(250, n - i))))
        await asyncio.to_thread(barrier.wait, 120)

        async def read_old(ws: aiohttp.ClientWebSocketResponse, s: _Session) -> None:
            async for msg in ws:
                if msg.type is aiohttp.WSMsgType.TEXT:
                    s.take(json.loads(msg.data))

        readers = [asyncio.create_task(read_old(ws, s)) for ws, s in zip(old, sessions, strict=True)]
        await asyncio.gather(*(ws.send_str(json.dumps({"message": MESSAGE})) for ws in old))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(len(s.chunks) < min_chunks and not s.done.is_set() for s in sessions):  # noqa: ASYNC110
            await asyncio.sleep(0.005)
        await asyncio.to_thread(barrier.wait, 120)  # every client process drops at once
        for ws in old:
            transport = ws._conn.transport if ws._conn is not None else None
            if transport is not None:
                transport.abort()  # a reset, no close frame: the session detaches
        for task in readers:
            task.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
        ended_before_drop = sum(s.full is not None for s in sessions)
        await asyncio.sleep(gap)

        async def resume(s: _Session, ws: aiohttp.ClientWebSocketResponse | None, frame: str) -> None:
            if ws is None:
                ws = await _open_raw(http, resume_url)
            s.sent_at = time.perf_counter()
            await ws.send_str(frame)
            msg = await ws.receive()
            connected_at = time.perf_counter()
            s.connected = json.loads(msg.data)
            s.connected["_at"] = connected_at - s.sent_at
            if s.full is None:
                async for msg in ws:
                    if msg.type is not aiohttp.WSMsgType.TEXT:
                        break
                    if not s.first_at:
                        s.first_at = time.perf_counter()
                    s.take(json.loads(msg.data))
                    if s.done.is_set():
                        break
            await ws.close()  # 1000: the session ends for good

        # Encoded beforehand, so that the client's own work between resume frames is only the send.
        frames = []
        for s in sessions:
            s.resumed_from = s.seqs[-1] if s.seqs else 0
            resume_frame = {
                "type": "resume",
                "session_id": s.id,
                "resume_token": s.token,
                "last_seq": s.resumed_from,
                "secret": servers.SECRET,
            }
            frames.append(json.dumps(resume_frame))
        tasks = [
            asyncio.create_task(resume(s, spare[i] if preconnect else None, frames[i])) for i, s in enumerate(sessions)
        ]
        _, stuck = await asyncio.wait(tasks, timeout=60)
        for task in stuck:  # reported below as problems, each with what its session got
            task.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for old_ws in old:
            await old_ws.close()
    connected = [s.connected["_at"] for s in sessions if s.connected]
    # The first frame after `connected` was replayed from the log when the server had numbered
    # frames past the client's last_seq; otherwise it is the next live frame, up to 50 ms later.
    replayed, live = [], []
    for s in sessions:
        if s.first_at and s.connected:
            elapsed = s.first_at - s.sent_at
            (replayed if s.connected.get("last_seq", 0) > s.resumed_from else live).append(elapsed)
    problems = [p for p in (s.check() for s in sessions) if p]
    complete = len(sessions) - len(problems)
    problems[:0] = [
        f"{r!r} after 60 s: connected {s.connected}, resumed from {s.resumed_from}, seqs {s.seqs[-3:]}"
        for s, r in zip(sessions, results, strict=True)
        if isinstance(r, BaseException)
    ]
    return {
        "sessions": len(sessions),
        "complete": complete,
        "connected": connected,
        "first_replayed": replayed,
        "first_live": live,
        "ended_before_drop": ended_before_drop,
        "problems": problems,
    }


def _worker(*args: Any) -> dict[str, Any]:
    servers.raise_fd_limit()
    result: dict[str, Any] = asyncio.run(_client(*args))
    return result


def measure(
    sessions: int,
    preconnect: bool,
    processes: int = 2,
    min_chunks: int = 5,
    gap: float = 0.2,
    store: dict[str, Any] | None = None,
    other: bool = False,
) -> dict[str, Any]:
    """S8 on a fresh connic (echo agent, 50 ms per word); latencies in ms, problems listed.

    ``store``: the ``[store]`` table (default memory). ``other``: two connic processes on that
    store (it must be shared, e.g. redis); the sessions start on the first and resume on the second.
    """
    ctx = mp.get_context("spawn")
    share = [sessions // processes + (1 if i < sessions % processes else 0) for i in range(processes)]
    share = [n for n in share if n]
    with contextlib.ExitStack() as stack:
        url, _, _ = stack.enter_context(servers.connic_inprocess("echo-slow", store=store))
        resume_url = stack.enter_context(servers.connic_inprocess("echo-slow", store=store))[0] if other else url
        manager = stack.enter_context(ctx.Manager())
        barrier = manager.Barrier(len(share))
        with ctx.Pool(len(share)) as pool:
            args = [(url, n, min_chunks, gap, preconnect, barrier, resume_url) for n in share]
            results = pool.starmap(_worker, args)
    connected = [t * 1000 for r in results for t in r["connected"]]
    replayed = [t * 1000 for r in results for t in r["first_replayed"]]
    live = [t * 1000 for r in results for t in r["first_live"]]
    problems = [p for r in results for p in r["problems"]]
    return {
        "mode": ("preconnected" if preconnect else "reconnect") + (", other process" if other else ""),
        "sessions": sum(r["sessions"] for r in results),
        "complete": sum(r["complete"] for r in results),
        "problems": problems[:5],
        "problem_count": len(problems),
        "ended_before_drop": sum(r["ended_before_drop"] for r in results),
        "connected_p50_ms": servers.percentile(connected, 0.5),
        "connected_p99_ms": servers.percentile(connected, 0.99),
        "replayed_n": len(replayed),
        "replayed_p50_ms": servers.percentile(replayed, 0.5),
        "replayed_p99_ms": servers.percentile(replayed, 0.99),
        "replayed_max_ms": max(replayed, default=float("nan")),
        "live_first_n": len(live),
        "live_first_p99_ms": servers.percentile(live, 0.99),
    }


async def _floor_client(url: str, n: int, barrier: Any) -> list[float]:
    """The baseline's burst: ``n`` connections each send one message at once; seconds to each first reply."""
    async with loadgen._session() as http:
        conns: list[aiohttp.ClientWebSocketResponse] = []
        conns += [ws for ws, _ in await _open_authenticated(http, url, n)]
        frame = json.dumps({"message": "x"})
        await asyncio.to_thread(barrier.wait, 120)

        async def one(ws: aiohttp.ClientWebSocketResponse) -> float:
            sent_at = time.perf_counter()
            await ws.send_str(frame)
            await ws.receive()
            return time.perf_counter() - sent_at

        times = await asyncio.wait_for(asyncio.gather(*(one(ws) for ws in conns)), 60)
        for ws in conns:
            await ws.close()
    return times


def _floor_worker(*args: Any) -> list[float]:
    servers.raise_fd_limit()
    result: list[float] = asyncio.run(_floor_client(*args))
    return result


def floor(sessions: int, processes: int = 2) -> dict[str, float]:
    """S8's baseline: the bare aiohttp server (benchmarks/baseline_aiohttp.py) answering one frame on
    each of ``sessions`` connections, all sent at once by the same client processes as S8's resumes.

    The nearest thing the baseline does to a burst of resumes: every resume is one frame in and
    (at least) one frame out, so this is the time this stack and machine take for the burst itself.
    """
    ctx = mp.get_context("spawn")
    share = [n for n in (sessions // processes + (1 if i < sessions % processes else 0) for i in range(processes)) if n]
    port = servers.free_port()
    cmd = [sys.executable, str(HERE / "baseline_aiohttp.py"), "--port", str(port), "--secret", servers.SECRET]
    with contextlib.ExitStack() as stack:
        stack.enter_context(servers.serve([*cmd, "--no-streaming"], port))
        manager = stack.enter_context(ctx.Manager())
        barrier = manager.Barrier(len(share))
        with ctx.Pool(len(share)) as pool:
            results = pool.starmap(_floor_worker, [(f"ws://127.0.0.1:{port}/ws", n, barrier) for n in share])
    times = [t * 1000 for r in results for t in r]
    return {"sessions": len(times), "p50_ms": servers.percentile(times, 0.5), "p99_ms": servers.percentile(times, 0.99)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=1000)
    parser.add_argument("--mode", choices=("preconnected", "reconnect", "both"), default="both")
    args = parser.parse_args()
    servers.raise_fd_limit()
    modes = (True, False) if args.mode == "both" else (args.mode == "preconnected",)
    for preconnect in modes:
        print(json.dumps(measure(args.sessions, preconnect), indent=1))
    print(json.dumps({"baseline (bare aiohttp, one frame each at once)": floor(args.sessions)}, indent=1))


if __name__ == "__main__":
    main()
