"""A local fake of an OpenAI-compatible Chat Completions API, for testing LLM agents offline.

It records each request, streams scripted chunks over SSE, can hold back its last chunk
until released, can answer with an error, and notices when the client goes away.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestServer


class FakeOpenAI:
    """Scripted ``POST /v1/chat/completions``; set the attributes before a request."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.chunks: list[str] = ["Hello", " from", " the fake."]
        self.usage: dict[str, int] | None = {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14}
        self.delay = 0.0
        self.error: tuple[int, dict[str, Any]] | None = None
        self.hold_last: asyncio.Event | None = None
        self.disconnected = asyncio.Event()
        self.server: TestServer | None = None

    @property
    def base_url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.port}/v1"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.completions)
        self.server = TestServer(app, host="127.0.0.1")
        await self.server.start_server()

    async def close(self) -> None:
        if self.server is not None:
            await self.server.close()

    async def completions(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(await request.json())
        self.headers.append(dict(request.headers))
        if self.error is not None:
            status, body = self.error
            return web.json_response(body, status=status)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        try:
            for index, text in enumerate(self.chunks):
                if index == len(self.chunks) - 1 and self.hold_last is not None:
                    await self.hold_last.wait()
                elif self.delay:
                    await asyncio.sleep(self.delay)
                event = {
                    "id": "c1",
                    "object": "chat.completion.chunk",
                    "choices": [{"index": 0, "delta": {"content": text}}],
                }
                await response.write(f"data: {json.dumps(event)}\n\n".encode())
            if self.usage is not None:
                event = {"id": "c1", "object": "chat.completion.chunk", "choices": [], "usage": self.usage}
                await response.write(f"data: {json.dumps(event)}\n\n".encode())
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
        except (ConnectionError, asyncio.CancelledError):
            self.disconnected.set()
            raise
        return response
