"""A local fake of an OpenAI-compatible Chat Completions API, for testing LLM agents offline.

It records each request, streams scripted chunks over SSE, can hold back its first byte or
its last chunk until released (a provider that never answers), can answer with an error, and
notices when the client goes away. Both fakes can also ask for tool calls, in the provider's
own format (OpenAI ``tool_calls`` deltas, Gemini ``functionCall`` parts): the tool results
the agent sends back are then in the recorded requests.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestServer

ToolCalls = list[tuple[str, Any]]
"""The calls one answer asks for: (tool name, arguments), arguments a dict or (OpenAI) raw JSON text."""


class _FakeServer:
    """A local aiohttp server recording requests; subclasses add their routes."""

    def __init__(self) -> None:
        self.tool_rounds: list[ToolCalls] = []  # each request takes the first, if any, and asks for those calls
        self.tool_loop: ToolCalls | None = None  # once tool_rounds is empty, ask for these forever
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.hold_last: asyncio.Event | None = None
        self.hold_first: asyncio.Event | None = None  # answer nothing, not even headers, until set
        self.active = 0  # requests being answered right now
        self.disconnected = asyncio.Event()
        self.server: TestServer | None = None

    @property
    def root(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.port}"

    async def before_answer(self) -> None:
        """Wait for ``hold_first``; a client that goes away meanwhile sets ``disconnected``."""
        if self.hold_first is not None:
            try:
                await self.hold_first.wait()
            except asyncio.CancelledError:  # aiohttp cancels the handler when the client disconnects
                self.disconnected.set()
                raise

    @web.middleware
    async def count(self, request: web.Request, handler: Any) -> web.StreamResponse:
        self.active += 1
        try:
            response: web.StreamResponse = await handler(request)
            return response
        finally:
            self.active -= 1

    def routes(self, app: web.Application) -> None:
        raise NotImplementedError

    def next_calls(self) -> ToolCalls | None:
        """The tool calls this request's answer asks for, if any."""
        if self.tool_rounds:
            return self.tool_rounds.pop(0)
        return self.tool_loop

    async def start(self) -> None:
        app = web.Application(middlewares=[self.count])
        self.routes(app)
        self.server = TestServer(app, host="127.0.0.1")
        await self.server.start_server()

    async def close(self) -> None:
        if self.server is not None:
            await self.server.close()


class FakeOpenAI(_FakeServer):
    """Scripted ``POST /v1/chat/completions``; set the attributes before a request."""

    def __init__(self) -> None:
        super().__init__()
        self.chunks: list[str] = ["Hello", " from", " the fake."]
        self.usage: dict[str, int] | None = {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14}
        self.delay = 0.0
        self.error: tuple[int, dict[str, Any] | str] | None = None  # a str is sent as a plain-text body
        self.stream_error: dict[str, Any] | None = None  # an error event sent after the first chunk

    @property
    def base_url(self) -> str:
        return self.root + "/v1"

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/chat/completions", self.completions)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(await request.json())
        self.headers.append(dict(request.headers))
        await self.before_answer()
        if self.error is not None:
            status, body = self.error
            if isinstance(body, str):
                return web.Response(text=body, status=status)
            return web.json_response(body, status=status)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        calls = self.next_calls()
        if calls is not None:
            await self.ask_for_tools(response, calls)
            return response
        try:
            for index, text in enumerate(self.chunks):
                if index == len(self.chunks) - 1 and self.hold_last is not None:
                    await self.hold_last.wait()
                elif self.delay:
                    await asyncio.sleep(self.delay)
                event = {
                    "id": "c1",
                    "object": "chat.completion.chunk",
                    "model": OPENAI_MODEL,
                    "choices": [{"index": 0, "delta": {"content": text}}],
                }
                await response.write(f"data: {json.dumps(event)}\n\n".encode())
                if self.stream_error is not None:
                    await response.write(f"data: {json.dumps(self.stream_error)}\n\n".encode())
                    await response.write_eof()
                    return response
            if self.usage is not None:
                event = {
                    "id": "c1",
                    "object": "chat.completion.chunk",
                    "model": OPENAI_MODEL,
                    "choices": [],
                    "usage": self.usage,
                }
                await response.write(f"data: {json.dumps(event)}\n\n".encode())
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
        except (ConnectionError, asyncio.CancelledError):
            self.disconnected.set()
            raise
        return response

    async def ask_for_tools(self, response: web.StreamResponse, calls: ToolCalls) -> None:
        """Stream ``tool_calls`` deltas as OpenAI does: id and name first, the arguments in two pieces."""
        number = len(self.requests)

        async def send(delta: dict[str, Any], finish: str | None = None) -> None:
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
            event = {"id": f"c{number}", "object": "chat.completion.chunk", "model": OPENAI_MODEL, "choices": [choice]}
            await response.write(f"data: {json.dumps(event)}\n\n".encode())

        await send({"role": "assistant", "content": None})
        for index, (name, arguments) in enumerate(calls):
            text = arguments if isinstance(arguments, str) else json.dumps(arguments)
            half = len(text) // 2
            head = {"index": index, "id": f"call_{number}_{index}", "type": "function"}
            await send({"tool_calls": [{**head, "function": {"name": name, "arguments": text[:half]}}]})
            await send({"tool_calls": [{"index": index, "function": {"arguments": text[half:]}}]})
        await send({}, finish="tool_calls")
        if self.usage is not None:
            event = {
                "id": f"c{number}",
                "object": "chat.completion.chunk",
                "model": OPENAI_MODEL,
                "choices": [],
                "usage": self.usage,
            }
            await response.write(f"data: {json.dumps(event)}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()


_STATUS = {400: "INVALID_ARGUMENT", 429: "RESOURCE_EXHAUSTED", 500: "INTERNAL", 503: "UNAVAILABLE"}


OPENAI_MODEL = "gpt-fake-2026-11"  # the model a fake says answered (as the real APIs do)
GEMINI_MODEL = "gemini-fake-001"

SIGNATURE = "c2lnbmF0dXJl"  # base64 of b"signature"


class FakeGemini(_FakeServer):
    """Gemini's ``models/{model}:streamGenerateContent`` in both forms the SDKs use.

    google-genai asks for ``?alt=sse`` and reads server-sent events; google-generativeai's
    REST transport asks for ``$alt=json;enum-encoding=int`` and reads one streamed JSON array
    (first byte ``[``, nothing after ``]``).
    """

    def __init__(self) -> None:
        super().__init__()
        self.paths: list[str] = []
        self.chunks: list[str] = ["Hello", " from", " Gemini."]
        self.usage: dict[str, int] | None = {"promptTokenCount": 9, "candidatesTokenCount": 4, "totalTokenCount": 13}
        self.error: tuple[int, str] | None = None
        self.error_times: int | None = None  # answer `error` this many times, then normally (None: always)
        self.blocked = False

    @property
    def base_url(self) -> str:
        return self.root

    def routes(self, app: web.Application) -> None:
        app.router.add_route("POST", "/{version}/models/{action}", self.stream)

    def _chunk(self, index: int, text: str) -> dict[str, Any]:
        chunk: dict[str, Any] = {
            "candidates": [{"content": {"role": "model", "parts": [{"text": text}]}, "index": 0}],
            "modelVersion": GEMINI_MODEL,
        }
        if index == len(self.chunks) - 1:
            chunk["candidates"][0]["finishReason"] = "STOP"
            if self.usage is not None:
                chunk["usageMetadata"] = self.usage
        return chunk

    async def stream(self, request: web.Request) -> web.StreamResponse:
        if not request.match_info["action"].endswith(":streamGenerateContent"):
            raise web.HTTPNotFound()
        self.requests.append(await request.json())
        self.headers.append(dict(request.headers))
        self.paths.append(request.path_qs)
        sse = request.query.get("alt") == "sse"
        await self.before_answer()
        if self.error is not None and self.error_times != 0:
            if self.error_times is not None:
                self.error_times -= 1
            status, message = self.error
            body = {"error": {"code": status, "message": message, "status": _STATUS.get(status, "UNKNOWN")}}
            return web.json_response(body, status=status)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream" if sse else "application/json"})
        await response.prepare(request)
        calls = self.next_calls()
        if calls is not None:
            # functionCall parts, with the thought signature Gemini wants back in the next request.
            parts = [
                {"functionCall": {"name": name, "args": args}, "thoughtSignature": SIGNATURE} for name, args in calls
            ]
            chunk: dict[str, Any] = {
                "candidates": [{"content": {"role": "model", "parts": parts}, "finishReason": "STOP", "index": 0}],
                "modelVersion": GEMINI_MODEL,
            }
            if self.usage is not None:
                chunk["usageMetadata"] = self.usage
            data = json.dumps(chunk)
            await response.write((f"data: {data}\r\n\r\n" if sse else f"[{data}]").encode())
            await response.write_eof()
            return response
        if self.blocked:
            # A prompt blocked by safety filters: feedback, no candidates (SAFETY is 1 as an int enum).
            data = json.dumps({"promptFeedback": {"blockReason": "SAFETY" if sse else 1}})
            await response.write((f"data: {data}\r\n\r\n" if sse else f"[{data}]").encode())
            await response.write_eof()
            return response
        try:
            for index, text in enumerate(self.chunks):
                if index == len(self.chunks) - 1 and self.hold_last is not None:
                    await self.hold_last.wait()
                data = json.dumps(self._chunk(index, text))
                if sse:
                    await response.write(f"data: {data}\r\n\r\n".encode())
                else:
                    await response.write((("[" if index == 0 else ",\r\n") + data).encode())
            if not sse:
                await response.write(b"]" if self.chunks else b"[]")
            await response.write_eof()
        except (ConnectionError, asyncio.CancelledError):
            self.disconnected.set()
            raise
        return response
