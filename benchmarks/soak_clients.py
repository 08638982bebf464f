"""The clients of benchmarks/soak.py: each behaviour one thing a real fleet's client does, against
a process (and the other one sharing its store, for resumes elsewhere)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import uuid
from typing import Any, Protocol

import aiohttp
import websockets

SECRET = "soak-secret"
MAX_MESSAGES = 6
"""The connectors' ``max_messages`` (benchmarks/soak.py's configuration)."""


class Proc(Protocol):
    """A connic process: its WebSocket and HTTP base URLs."""

    @property
    def ws(self) -> str: ...

    @property
    def http(self) -> str: ...


async def recv(ws: Any, within: float = 15) -> dict[str, Any]:
    frame: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), within))
    return frame


async def until(ws: Any, kinds: tuple[str, ...], within: float = 15) -> list[dict[str, Any]]:
    frames = []
    while True:
        frames.append(await recv(ws, within))
        if frames[-1]["type"] in kinds:
            return frames


async def login(url: str) -> tuple[Any, dict[str, Any]]:
    ws = await websockets.connect(url, open_timeout=15, max_size=None)
    await ws.send(json.dumps({"secret": SECRET}))
    return ws, await recv(ws)


def words(n: int) -> str:
    return " ".join(f"w{i}" for i in range(n))


async def chat_and_close(proc: Proc, other: Proc) -> None:
    ws, _ = await login(proc.ws + "/ws")
    for _ in range(random.randint(1, 3)):
        await ws.send(json.dumps({"message": words(8), "agent": "assistant"}))
        await until(ws, ("stream_end", "error"))
    await ws.send(json.dumps({"type": "history"}))
    await until(ws, ("history",))
    await ws.close(1000)


async def drop_mid_stream(proc: Proc, other: Proc) -> None:
    ws, _ = await login(proc.ws + "/ws")
    await ws.send(json.dumps({"message": words(20), "agent": "slow"}))
    await until(ws, ("stream_chunk",))
    ws.transport.abort()


async def resume_elsewhere(proc: Proc, other: Proc) -> None:
    ws, hello = await login(proc.ws + "/ws")
    await ws.send(json.dumps({"message": words(20), "agent": "slow", "id": "m1"}))
    seen = await until(ws, ("stream_chunk",))
    ws.transport.abort()
    await asyncio.sleep(random.uniform(0, 1))
    again = await websockets.connect(other.ws + "/ws", open_timeout=15)
    last = max(f.get("seq", 0) for f in seen)
    await again.send(
        json.dumps(
            {
                "type": "resume",
                "session_id": hello["session_id"],
                "resume_token": hello["resume_token"],
                "last_seq": last,
                "secret": SECRET,
            }
        )
    )
    await until(again, ("stream_end", "error"))
    if random.random() < 0.5:
        await again.close(1000)
    else:
        again.transport.abort()  # left to expire


async def cancel_one(proc: Proc, other: Proc) -> None:
    ws, _ = await login(proc.ws + "/ws")
    await ws.send(json.dumps({"message": words(30), "agent": "slow", "id": "c1"}))
    await until(ws, ("stream_chunk",))
    await ws.send(json.dumps({"type": "cancel", "id": "c1"}))
    await until(ws, ("stream_end", "error"))
    await ws.close(random.choice((1000, 1001)))


async def over_limit(proc: Proc, other: Proc) -> None:
    ws, _ = await login(proc.ws + "/ws")
    for n in range(MAX_MESSAGES + 1):
        await ws.send(json.dumps({"message": "x", "agent": "assistant", "id": n}))
    try:
        while True:
            await recv(ws)
    except websockets.ConnectionClosed:
        pass


async def rate_limited(proc: Proc, other: Proc) -> None:
    ws, _ = await login(proc.ws + "/wsr")
    for n in range(5):
        await ws.send(json.dumps({"message": "x", "agent": "assistant", "id": n}))
    await asyncio.sleep(1)
    await ws.close(1000)


async def invalid_frames(proc: Proc, other: Proc) -> None:
    ws, _ = await login(proc.ws + "/ws")
    for frame in (
        "{not json",
        b"\x00\x01",
        "[1,2]",
        json.dumps({"type": "message", "id": [1]}),
        json.dumps({"type": "nope"}),
        json.dumps({"type": "resume"}),
        json.dumps({"type": "cancel"}),
    ):
        await ws.send(frame)
    await asyncio.sleep(0.3)
    await ws.close(1000)


async def never_auth(proc: Proc, other: Proc) -> None:
    ws = await websockets.connect(proc.ws + "/ws", open_timeout=15)
    if random.random() < 0.5:
        await ws.send(json.dumps({"secret": "wrong"}))
    try:
        while True:
            await recv(ws)
    except websockets.ConnectionClosed:
        pass


async def idle_drop(proc: Proc, other: Proc) -> None:
    ws, _ = await login(proc.ws + "/ws")
    ws.transport.abort()


def run_input(thread: str, text: str) -> dict[str, Any]:
    return {
        "threadId": thread,
        "runId": str(uuid.uuid4()),
        "state": {},
        "tools": [],
        "context": [],
        "forwardedProps": {},
        "messages": [{"id": str(uuid.uuid4()), "role": "user", "content": text}],
    }


async def agui_sse(proc: Proc, other: Proc) -> None:
    thread = str(uuid.uuid4())
    headers = {"Authorization": f"Bearer {SECRET}"}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        for target in (proc, other, proc)[: random.randint(1, 3)]:
            agent = random.choice(("assistant", "slow"))
            async with http.post(
                f"{target.http}/agui/{agent}", json=run_input(thread, words(10)), headers=headers
            ) as response:
                if random.random() < 0.2:  # goes away mid-run
                    await response.content.readline()
                    response.connection.transport.abort()  # type: ignore[union-attr]
                    return
                await response.read()


async def agui_ws(proc: Proc, other: Proc) -> None:
    thread = str(uuid.uuid4())
    ws = await websockets.connect(
        proc.ws + "/agui/ws", open_timeout=15, additional_headers={"Authorization": f"Bearer {SECRET}"}
    )
    for _ in range(random.randint(1, 2)):
        body = run_input(thread, words(10))
        await ws.send(json.dumps(body))
        if random.random() < 0.3:
            await ws.send(json.dumps({"type": "cancel", "runId": body["runId"]}))
        await until(ws, ("RUN_FINISHED", "RUN_ERROR"))
    if random.random() < 0.5:
        await ws.close(1000)
    else:
        ws.transport.abort()


async def take_over_live(proc: Proc, other: Proc) -> None:
    """Resume on the other process while the first connection is still open: it closes 4011."""
    ws, hello = await login(proc.ws + "/ws")
    await ws.send(json.dumps({"message": words(20), "agent": "slow", "id": "t1"}))
    seen = await until(ws, ("stream_chunk",))
    again = await websockets.connect(other.ws + "/ws", open_timeout=15)
    resume = {"type": "resume", "session_id": hello["session_id"], "resume_token": hello["resume_token"]}
    await again.send(json.dumps({**resume, "last_seq": max(f.get("seq", 0) for f in seen), "secret": SECRET}))
    with contextlib.suppress(websockets.ConnectionClosed):
        while True:
            await recv(ws)
    if random.random() < 0.5:
        await again.send(json.dumps({"type": "cancel", "id": "t1"}))
    await until(again, ("stream_end", "error"))
    await again.send(json.dumps({"type": "history"}))
    await until(again, ("history",))
    await again.close(1000)


async def agui_ws_resume(proc: Proc, other: Proc) -> None:
    """An AG-UI WebSocket dropped mid-run, resumed from its last seq (on the other process)."""
    thread = str(uuid.uuid4())
    auth = {"Authorization": f"Bearer {SECRET}"}
    ws = await websockets.connect(proc.ws + "/agui/ws", open_timeout=15, additional_headers=auth)
    await ws.send(json.dumps(run_input(thread, words(20))))
    seen = [await recv(ws) for _ in range(4)]
    ws.transport.abort()
    again = await websockets.connect(other.ws + "/agui/ws", open_timeout=15, additional_headers=auth)
    await again.send(json.dumps({"type": "resume", "threadId": thread, "lastSeq": seen[-1]["seq"]}))
    await until(again, ("RUN_FINISHED", "RUN_ERROR"))
    await again.close(1000)


async def ws_then_agui(proc: Proc, other: Proc) -> None:
    """A conversation begun over the WebSocket protocol, continued over AG-UI SSE with its token."""
    ws, hello = await login(proc.ws + "/ws")
    await ws.send(json.dumps({"message": words(5), "agent": "assistant"}))
    await until(ws, ("stream_end", "error"))
    ws.transport.abort()
    headers = {"Authorization": f"Bearer {SECRET}", "X-Connic-Resume-Token": hello["resume_token"]}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        body = run_input(hello["session_id"], words(5))
        async with http.post(f"{other.http}/agui/assistant", json=body, headers=headers) as response:
            await response.read()


BEHAVIOURS = [
    chat_and_close,
    drop_mid_stream,
    resume_elsewhere,
    cancel_one,
    over_limit,
    rate_limited,
    invalid_frames,
    never_auth,
    idle_drop,
    agui_sse,
    agui_ws,
    take_over_live,
    agui_ws_resume,
    ws_then_agui,
]
