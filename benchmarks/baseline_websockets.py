"""The connic protocol on the `websockets` library: what a user might write instead of connic."""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import signal
import uuid

from websockets.asyncio.server import ServerConnection, serve

WORD = re.compile(r"\s*\S+\s*|\s+")


def make_handler(secret: str, streaming: bool):  # type: ignore[no-untyped-def]
    async def handle(ws: ServerConnection) -> None:
        first = json.loads(await ws.recv())
        if not isinstance(first, dict) or first.get("secret") != secret:
            await ws.send(json.dumps({"type": "error", "id": None, "code": "unauthorized", "message": "wrong"}))
            await ws.close(code=4001)
            return
        await ws.send(json.dumps({"type": "connected", "session_id": str(uuid.uuid4()), "agents": ["echo"]}))
        number = 0
        async for raw in ws:
            data = json.loads(raw)
            payload = data.get("payload") or data
            text = payload.get("message", payload.get("content", ""))
            number += 1
            mid = data.get("id") or f"auto-{number}"
            await ws.send(json.dumps({"type": "ack", "id": mid, "message_number": number}))
            words = len(text.split())
            usage = {"prompt_tokens": words, "candidates_tokens": words}
            if streaming:
                await ws.send(json.dumps({"type": "stream_start", "id": mid, "agent": "echo"}))
                for chunk in WORD.findall(text):
                    await ws.send(json.dumps({"type": "stream_chunk", "id": mid, "agent": "echo", "chunk": chunk}))
                end = {"type": "stream_end", "id": mid, "agent": "echo", "full_response": text, "token_usage": usage}
                await ws.send(json.dumps(end))
            else:
                reply = {"type": "response", "id": mid, "agent": "echo", "response": text, "token_usage": usage}
                await ws.send(json.dumps(reply))

    return handle


async def run(port: int, secret: str, streaming: bool) -> None:
    stop = asyncio.get_running_loop().create_future()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set_result, None)
    async with serve(make_handler(secret, streaming), "127.0.0.1", port, compression=None, max_queue=64):
        await stop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=8082)
    parser.add_argument("--secret", default="bench")
    parser.add_argument("--no-streaming", action="store_true")
    args = parser.parse_args()
    asyncio.run(run(args.port, args.secret, not args.no_streaming))


if __name__ == "__main__":
    main()
