"""The ``openai`` agent: any OpenAI-compatible Chat Completions API, streamed over SSE.

Works with OpenAI, Ollama, vLLM, llama.cpp's server and LM Studio. It speaks HTTP with
aiohttp's client (already a connic dependency), so it needs no SDK.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import attrs
import jinja2

from connic.agent import Agent, Turn, Usage
from connic.agents._common import mask, unexpected
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
    class Options:
        """See docs/agents-openai.md."""

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

    async def start(self) -> None:
        """Open the HTTP client session; warn when OpenAI itself would be called with no key."""
        if not self.api_key and urlsplit(self.options.base_url).hostname == "api.openai.com":
            # Every answer would be a 401: say so once now, not only in each client's agent_error.
            log.warning(
                "agent %s calls %s with no API key: set OPENAI_API_KEY (or the api_key option), "
                "or base_url to a local server",
                self.name,
                self.options.base_url,
            )
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.options.timeout))

    async def close(self) -> None:
        """Close the HTTP client session."""
        if self.session is not None:
            await self.session.close()
            self.session = None

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

    def request(self, turn: Turn) -> dict[str, Any]:
        """The request body."""
        body: dict[str, Any] = {
            "model": self.options.model,
            "messages": self.messages(turn),
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if self.options.temperature is not None:
            body["temperature"] = self.options.temperature
        if self.options.max_tokens is not None:
            body["max_tokens"] = self.options.max_tokens
        return body

    async def respond(self, turn: Turn) -> AsyncIterator[str | Usage]:
        """Stream the model's answer chunk by chunk, then its token usage.

        Every error message passes through one place that masks the API key: providers
        quote it in some of their error bodies.
        """
        if self.session is None:
            raise AgentError("the openai agent was not started")
        try:
            # Closed here, not left to the garbage collector: a cancel closes the HTTP response now.
            async with contextlib.aclosing(self._stream(self.session, turn)) as stream:
                async for item in stream:
                    yield item
        except AgentError as exc:
            raise AgentError(mask(exc.message, self.api_key)) from None
        except Exception as exc:
            raise unexpected(exc, self.api_key, log, turn.agent) from None

    async def _stream(self, session: aiohttp.ClientSession, turn: Turn) -> AsyncGenerator[str | Usage, None]:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        try:
            async with session.post(self.url, json=self.request(turn), headers=headers) as response:
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
                    for choice in event.get("choices") or ():
                        text = (choice.get("delta") or {}).get("content")
                        if text:
                            yield text
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
