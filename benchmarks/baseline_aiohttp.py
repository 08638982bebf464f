"""The connic protocol written directly on aiohttp, with no framework: the practical limit of this stack.

Connect with {"secret"} → connected; a message (canonical or shorthand) → ack, then
stream_start / stream_chunk (word-sized) / stream_end, or one response with --no-streaming.
Frames are sent one by one, as a hand-written handler would.
"""

from __future__ import annotations

import argparse
import json
import re
import uuid

from aiohttp import WSMsgType, web

WORD = re.compile(r"\s*\S+\s*|\s+")


def make_app(secret: str, streaming: bool) -> web.Application:
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
        async for msg in ws:
            if msg.type is not WSMsgType.TEXT:
                continue
            data = json.loads(msg.data)
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
    args = parser.parse_args()
    app = make_app(args.secret, not args.no_streaming)
    web.run_app(app, host="127.0.0.1", port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
