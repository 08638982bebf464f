"""The connic protocol written directly on aiohttp, with no framework: the practical limit of this stack.

Connect with {"secret"} → connected; a message (canonical or shorthand) → ack, then
stream_start / stream_chunk (word-sized) / stream_end, or one response with --no-streaming.
Frames are sent one by one, as a hand-written handler would.

With --pace it does S7's work (docs/performance.md) as benchmarks/pace_agent.py does in
connic: it keeps each connection's conversation, builds a prompt from all of it every turn,
and streams 20 chunks 50 ms apart (none apart for a message whose context has "fast": true).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import uuid
from typing import Any

from aiohttp import WSMsgType, web

WORD = re.compile(r"\s*\S+\s*|\s+")
PACE_CHUNKS, PACE_DELAY = 20, 0.05


def build_prompt(history: list[tuple[str, str]], message: str) -> str:
    """As benchmarks/pace_agent.py, over (role, text) pairs (copied: this baseline must not import connic)."""
    lines = [f"{role}: {text}" for role, text in history]
    lines.append(f"user: {message}")
    return "\n".join(lines)


def chunk(index: int, prompt: str) -> str:
    """As benchmarks/pace_agent.py: the first chunk depends on the whole prompt."""
    return f"{len(prompt)} " if index == 0 else f"tok{index} "


async def answer_paced(
    ws: web.WebSocketResponse, history: list[tuple[str, str]], data: dict[str, Any], number: int
) -> None:
    """One S7 turn: read the whole history, then 20 chunks 50 ms apart, the history updated."""
    payload = data.get("payload") or data
    text = payload.get("message", payload.get("content", ""))
    context = payload.get("context") or {}
    mid = data.get("id") or f"auto-{number}"
    await ws.send_str(json.dumps({"type": "ack", "id": mid, "message_number": number}))
    prompt = build_prompt(history, text)
    history.append(("user", text))
    delay = 0.0 if context.get("fast") else PACE_DELAY
    await ws.send_str(json.dumps({"type": "stream_start", "id": mid, "agent": "echo"}))
    chunks = []
    for index in range(PACE_CHUNKS):
        if delay:
            await asyncio.sleep(delay)
        piece = chunk(index, prompt)
        chunks.append(piece)
        await ws.send_str(json.dumps({"type": "stream_chunk", "id": mid, "agent": "echo", "chunk": piece}))
    reply = "".join(chunks)
    history.append(("agent", reply))
    usage = {"prompt_tokens": len(prompt) // 4, "candidates_tokens": PACE_CHUNKS}
    end = {"type": "stream_end", "id": mid, "agent": "echo", "full_response": reply, "token_usage": usage}
    end["finish_reason"] = "stop"
    await ws.send_str(json.dumps(end))


def make_app(secret: str, streaming: bool, pace: bool = False) -> web.Application:
    async def handle(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        first = await ws.receive()
        if first.type is not WSMsgType.TEXT or json.loads(first.data).get("secret") != secret:
            await ws.send_str(json.dumps({"type": "error", "id": None, "code": "unauthorized", "message": "wrong"}))
            await ws.close(code=4001)
            return ws
        session_id = str(uuid.uuid4())
        await ws.send_str(json.dumps({"type": "connected", "session_id": session_id, "agents": ["echo"]}))
        number = 0
        history: list[tuple[str, str]] = []
        async for msg in ws:
            if msg.type is not WSMsgType.TEXT:
                continue
            data = json.loads(msg.data)
            if pace:
                number += 1
                await answer_paced(ws, history, data, number)
                continue
            payload = data.get("payload") or data
            text = payload.get("message", payload.get("content", ""))
            number += 1
            mid = data.get("id") or f"auto-{number}"
            await ws.send_str(json.dumps({"type": "ack", "id": mid, "message_number": number}))
            words = len(text.split())
            usage = {"prompt_tokens": words, "candidates_tokens": words}
            if streaming:
                await ws.send_str(json.dumps({"type": "stream_start", "id": mid, "agent": "echo"}))
                for chunk in WORD.findall(text):
                    await ws.send_str(json.dumps({"type": "stream_chunk", "id": mid, "agent": "echo", "chunk": chunk}))
                end = {"type": "stream_end", "id": mid, "agent": "echo", "full_response": text, "token_usage": usage}
                await ws.send_str(json.dumps(end))
            else:
                reply = {"type": "response", "id": mid, "agent": "echo", "response": text, "token_usage": usage}
                await ws.send_str(json.dumps(reply))
        return ws

    app = web.Application()
    app.router.add_get("/ws", handle)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=8081)
    parser.add_argument("--secret", default="bench")
    parser.add_argument("--no-streaming", action="store_true")
    parser.add_argument("--pace", action="store_true", help="S7: history read per turn, 20 chunks 50 ms apart")
    args = parser.parse_args()
    app = make_app(args.secret, not args.no_streaming, args.pace)
    web.run_app(app, host="127.0.0.1", port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
