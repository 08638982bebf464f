"""The ``openai`` agent: any OpenAI-compatible Chat Completions API, streamed over SSE.

Works with OpenAI, Ollama, vLLM, llama.cpp's server and LM Studio. It speaks HTTP with
aiohttp's client (already a connic dependency), so it needs no SDK. With ``tools`` it runs
the model <-> tool loop (connic.agents.tool_loop): the tools go in the request's ``tools``,
the streamed ``tool_calls`` deltas are assembled, and the results go back as ``role: "tool"``
messages.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import attrs
import jinja2

from connic import telemetry
from connic.agent import Agent, ProgressEvent, Turn, Usage
from connic.agents._common import mask, unexpected
from connic.agents.tool_loop import Call, Outcome, Toolbox, ToolOptions, run_turn
from connic.config import positive
from connic.errors import AgentError, ConfigError

__all__ = ["OpenAIAgent"]

_prompts = jinja2.Environment(undefined=jinja2.StrictUndefined, autoescape=False)
log = logging.getLogger("connic.agents.openai")


def _optional_positive(_: object, attribute: attrs.Attribute[Any], value: float | None) -> None:
    if value is not None and value <= 0:
        raise ValueError(f"{attribute.name} must be a positive number, got {value!r}")


class OpenAIAgent(Agent):
    """Answers with an OpenAI-compatible chat model (OpenAI, Ollama, vLLM, llama.cpp, LM Studio)."""

    @attrs.frozen
    class Options(ToolOptions):
        """See docs/agents-openai.md (``tools``, ``max_tool_rounds``, ``tool_timeout``: docs/tools.md)."""

        model: str = "gpt-4o-mini"
        base_url: str = "https://api.openai.com/v1"
        api_key: str | None = None
        system_prompt: str | None = None
        temperature: float | None = None
        max_tokens: int | None = attrs.field(default=None, validator=_optional_positive)
        timeout: float = attrs.field(default=120.0, validator=positive)

    options: Options

    def __init__(self, name: str, options: Options) -> None:
        super().__init__(name, options)
        self.api_key = options.api_key or os.environ.get("OPENAI_API_KEY")
        self.url = options.base_url.rstrip("/") + "/chat/completions"
        try:
            self.prompt = _prompts.from_string(options.system_prompt) if options.system_prompt else None
        except jinja2.TemplateSyntaxError as exc:
            raise ConfigError(f"system_prompt: {exc.message} (line {exc.lineno})") from None
        self.session: aiohttp.ClientSession | None = None
        self.toolbox = Toolbox(options.tool_sources(name))

    async def start(self) -> None:
        """Open the HTTP client session and start the tools; warn when OpenAI would be called with no key."""
        if not self.api_key and urlsplit(self.options.base_url).hostname == "api.openai.com":
            # Every answer would be a 401: say so once now, not only in each client's agent_error.
            log.warning(
                "agent %s calls %s with no API key: set OPENAI_API_KEY (or the api_key option), "
                "or base_url to a local server",
                self.name,
                self.options.base_url,
            )
        try:
            await self.toolbox.start()
            self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.options.timeout))
        except BaseException:
            # The app closes only the agents whose start succeeded: close what started here.
            await self.close()
            raise

    async def close(self) -> None:
        """Close the HTTP client session and the tools."""
        if self.session is not None:
            await self.session.close()
            self.session = None
        await self.toolbox.close()

    def messages(self, turn: Turn) -> list[dict[str, Any]]:
        """The conversation as Chat Completions messages.

        This agent's earlier answers are ``assistant`` messages; in a session with several
        agents, another agent's answer is passed as a ``user`` message that names it, so the
        model sees it as input rather than as something it said itself.
        """
        messages: list[dict[str, Any]] = []
        if self.prompt is not None:
            try:
                system = self.prompt.render(context=turn.context, session=turn.session, agent=turn.agent)
            except jinja2.UndefinedError as exc:
                raise AgentError(f"system_prompt: {exc.message}") from None
            messages.append({"role": "system", "content": system})
        for entry in turn.session.history:
            if entry.role == "user":
                messages.append({"role": "user", "content": entry.text})
            elif entry.agent == turn.agent:
                messages.append({"role": "assistant", "content": entry.text})
            else:
                messages.append({"role": "user", "content": f"[{entry.agent} answered] {entry.text}"})
        content: str | list[dict[str, Any]] = turn.message
        images = [f for f in turn.files if f.mime_type.startswith("image/")]
        if images:
            content = [{"type": "text", "text": turn.message}]
            for image in images:
                data = base64.b64encode(image.data).decode()
                content.append({"type": "image_url", "image_url": {"url": f"data:{image.mime_type};base64,{data}"}})
        messages.append({"role": "user", "content": content})
        return messages

    def request(self, turn: Turn, messages: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """The request body (``messages``: the conversation so far, by default the turn's)."""
        body: dict[str, Any] = {
            "model": self.options.model,
            "messages": self.messages(turn) if messages is None else messages,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if self.options.temperature is not None:
            body["temperature"] = self.options.temperature
        if self.options.max_tokens is not None:
            body["max_tokens"] = self.options.max_tokens
        if self.toolbox.tools:
            body["tools"] = [
                {
                    "type": "function",
                    "function": {"name": t.name, "description": t.description, "parameters": dict(t.parameters)},
                }
                for t in self.toolbox.tools.values()
            ]
        return body

    async def respond(self, turn: Turn) -> AsyncIterator[str | Usage | ProgressEvent]:
        """Stream the model's answer chunk by chunk, the tool calls and results, then the token usage.

        Every error message passes through one place that masks the API key: providers
        quote it in some of their error bodies.
        """
        if self.session is None:
            raise AgentError("the openai agent was not started")
        try:
            chat = _Chat(self, self.session, turn)
            # Closed here, not left to the garbage collector: a cancel closes the HTTP response
            # (and cancels the tools still running) now.
            async with contextlib.aclosing(run_turn(chat, self.toolbox, self.options, turn.agent)) as items:
                async for item in items:
                    yield item
        except AgentError as exc:
            raise AgentError(mask(exc.message, self.api_key)) from None
        except Exception as exc:
            raise unexpected(exc, self.api_key, log, turn.agent) from None

    async def _stream(
        self, session: aiohttp.ClientSession, body: dict[str, Any], calls: dict[int, dict[str, str]]
    ) -> AsyncGenerator[str | Usage, None]:
        """One streamed request: text and usage are yielded, ``tool_calls`` deltas assembled into ``calls``."""
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        try:
            with telemetry.provider_call("openai", body.get("model")) as call:
                async with session.post(self.url, json=body, headers=headers) as response:
                    if response.status != 200:
                        raise AgentError(await _provider_error(response))
                    async for data in _sse_data(response):
                        if data == "[DONE]":
                            break
                        try:
                            event = json.loads(data)
                        except ValueError:
                            raise AgentError("the provider sent a malformed stream event") from None
                        if "error" in event:
                            raise AgentError(f"provider error: {_message(event)}")
                        if call.recording:
                            _record(call, event)
                        for choice in event.get("choices") or ():
                            delta = choice.get("delta") or {}
                            text = delta.get("content")
                            if text:
                                yield text
                            for piece in delta.get("tool_calls") or ():
                                _assemble(calls, piece)
                        usage = event.get("usage")
                        if usage:
                            yield Usage(
                                prompt_tokens=int(usage.get("prompt_tokens") or 0),
                                candidates_tokens=int(usage.get("completion_tokens") or 0),
                            )
        except TimeoutError:
            raise AgentError(f"the provider did not answer within {self.options.timeout:g} s") from None
        except aiohttp.ClientError as exc:
            raise AgentError(f"could not reach the provider at {self.options.base_url}: {type(exc).__name__}") from None


class _Chat:
    """One turn's conversation in Chat Completions messages, for the tool loop."""

    def __init__(self, agent: OpenAIAgent, session: aiohttp.ClientSession, turn: Turn) -> None:
        self.agent = agent
        self.session = session
        self.turn = turn
        self.messages = agent.messages(turn)
        self.assistant: dict[str, Any] = {}  # the model's last message, with its tool_calls

    async def step(self) -> AsyncGenerator[str | Usage | Call, None]:
        """One request on the messages so far; the tool calls it asked for come last."""
        calls: dict[int, dict[str, str]] = {}
        texts: list[str] = []
        body = self.agent.request(self.turn, self.messages)
        async with contextlib.aclosing(self.agent._stream(self.session, body, calls)) as stream:
            async for item in stream:
                if isinstance(item, str):
                    texts.append(item)
                yield item
        if not calls:
            return
        assembled = [calls[index] for index in sorted(calls)]
        for index, call in enumerate(assembled):
            # An id is what pairs a result with its call: make one up if the server sent none.
            call["id"] = call["id"] or f"call_{len(self.messages)}_{index}"
        self.assistant = {
            "role": "assistant",
            "content": "".join(texts) or None,
            "tool_calls": [
                {"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
                for c in assembled
            ],
        }
        for call in assembled:
            yield _call(call["id"], call["name"], call["arguments"])

    def answer(self, outcomes: Sequence[Outcome]) -> None:
        """The assistant message with its tool_calls, then one ``tool`` message per call."""
        self.messages.append(self.assistant)
        for outcome in outcomes:
            if outcome.is_error:
                content = json.dumps({"error": outcome.result})
            elif isinstance(outcome.result, str):
                content = outcome.result
            else:
                content = json.dumps(outcome.result, ensure_ascii=False)
            self.messages.append({"role": "tool", "tool_call_id": outcome.call.call_id, "content": content})


def _record(call: telemetry.ProviderCall, event: dict[str, Any]) -> None:
    """Give the provider call's span what a stream event says of the response (telemetry only)."""
    finish = [str(c["finish_reason"]) for c in event.get("choices") or () if c.get("finish_reason")]
    usage = event.get("usage") or {}
    call.record(
        response_model=event.get("model") or None,
        response_id=event.get("id") or None,
        finish_reasons=finish or None,
        input_tokens=usage.get("prompt_tokens"),
        output_tokens=usage.get("completion_tokens"),
    )


def _assemble(calls: dict[int, dict[str, str]], piece: Any) -> None:
    """Add one streamed ``tool_calls`` delta: the id and name come first, the arguments in pieces."""
    if not isinstance(piece, dict):
        raise AgentError("the provider sent a malformed tool call")
    index = piece.get("index", len(calls))
    if not isinstance(index, int):
        raise AgentError("the provider sent a malformed tool call")
    call = calls.setdefault(index, {"id": "", "name": "", "arguments": ""})
    function = piece.get("function") or {}
    if piece.get("id") and not call["id"]:
        call["id"] = str(piece["id"])
    call["name"] += str(function.get("name") or "")
    call["arguments"] += str(function.get("arguments") or "")


def _call(call_id: str, name: str, arguments: str) -> Call:
    """A Call from the model's JSON arguments; arguments that are not a JSON object are the model's error."""
    try:
        parsed = json.loads(arguments) if arguments.strip() else {}
    except ValueError:
        parsed = None
    if not isinstance(parsed, dict):
        problem = f"the arguments are not a JSON object: {arguments[:200]!r}"
        return Call(call_id, name, {}, problem=problem)
    return Call(call_id, name, parsed)


async def _sse_data(response: aiohttp.ClientResponse) -> AsyncIterator[str]:
    """The ``data:`` payloads of a server-sent event stream, one per event."""
    lines: list[str] = []
    async for raw in response.content:
        line = raw.decode("utf-8").rstrip("\r\n")
        if not line:
            if lines:
                yield "\n".join(lines)
                lines = []
        elif line.startswith("data:"):
            lines.append(line[5:].lstrip(" "))
    if lines:
        yield "\n".join(lines)


def _message(payload: Any) -> str:
    error = payload.get("error") if isinstance(payload, dict) else None
    if isinstance(error, dict):
        return str(error.get("message") or error)
    return str(error or payload)


async def _provider_error(response: aiohttp.ClientResponse) -> str:
    text = await response.text()
    try:
        detail = _message(json.loads(text))
    except ValueError:
        detail = text.strip()[:300] or response.reason or ""
    return f"provider returned HTTP {response.status}: {detail}"
