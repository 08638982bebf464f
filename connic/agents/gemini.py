"""The ``gemini`` agent: Google's Gemini models through either Google SDK.

``google-genai`` (``pip install 'connic[gemini]'``) is the maintained SDK and is used natively
with asyncio. ``google-generativeai`` (``pip install 'connic[gemini-legacy]'``) is the SDK the
design card names; it is deprecated upstream and its asyncio path does not work over REST, so
its blocking stream runs in a thread of its own that feeds an asyncio queue
(connic/agents/_gemini_legacy.py). Both are imported only when a gemini agent is configured.
With ``tools`` (google-genai only) it runs the model <-> tool loop
(connic/agents/tool_loop.py): ``functionDeclarations`` in, ``functionCall`` parts out,
``functionResponse`` parts back.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import os
import re
import sys
import time
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from typing import Any

import aiohttp
import attrs
import jinja2

from connic.agent import Agent, ProgressEvent, Turn, Usage
from connic.agents._common import is_timeout, mask, unexpected
from connic.agents._gemini_turn import Overloaded, TurnContents
from connic.agents.tool_loop import Toolbox, ToolOptions, run_turn
from connic.config import non_negative, positive
from connic.errors import AgentError, ConfigError

__all__ = ["GeminiAgent"]

SDKS = ("auto", "google-genai", "google-generativeai")
_prompts = jinja2.Environment(undefined=jinja2.StrictUndefined, autoescape=False)
log = logging.getLogger("connic.agents.gemini")
_REQUEST_LINE = re.compile(r"^[A-Z]+ \S+: ")


def _sdk(_: object, attribute: attrs.Attribute[str], value: str) -> None:
    if value not in SDKS:
        raise ValueError(f"{attribute.name} must be one of {', '.join(SDKS)}, got {value!r}")


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


class GeminiAgent(Agent):
    """Answers with a Google Gemini model (google-genai, or the legacy google-generativeai)."""

    @attrs.frozen
    class Options(ToolOptions):
        """See docs/agents-gemini.md (``tools``, ``max_tool_rounds``, ``tool_timeout``: docs/tools.md)."""

        model: str = "gemini-2.5-flash"
        sdk: str = attrs.field(default="auto", validator=_sdk)
        api_key: str | None = None
        base_url: str | None = None
        system_prompt: str | None = None
        temperature: float | None = None
        top_p: float | None = None
        max_output_tokens: int | None = None
        safety_settings: Mapping[str, str] | None = None
        timeout: float = attrs.field(default=120.0, validator=positive)
        retries: int = attrs.field(default=2, validator=non_negative)
        legacy_threads: int = attrs.field(default=64, validator=positive)

    options: Options

    def __init__(self, name: str, options: Options) -> None:
        super().__init__(name, options)
        key = options.api_key or os.environ.get("GEMINI_API_KEY") or os.environ.get("GOOGLE_API_KEY")
        if not key:
            raise ConfigError("no Gemini API key: set GEMINI_API_KEY or GOOGLE_API_KEY (or the api_key option)")
        self.api_key = key
        # Connic's hosted names look like "gemini/gemini-2.5-flash".
        self.model = options.model.removeprefix("gemini/")
        sdk = options.sdk
        if sdk == "auto":
            if not _installed("google.genai") and not _installed("google.generativeai"):
                raise ConfigError("no Gemini SDK is installed: pip install 'connic[gemini]' (google-genai)")
            sdk = "google-genai" if _installed("google.genai") else "google-generativeai"
        module = "google.genai" if sdk == "google-genai" else "google.generativeai"
        if not _installed(module):
            extra = "gemini" if sdk == "google-genai" else "gemini-legacy"
            raise ConfigError(f"sdk {sdk!r} is not installed: pip install 'connic[{extra}]'")
        self.sdk = sdk
        self.toolbox = Toolbox(options.tool_sources(name))
        if self.toolbox.sources and sdk != "google-genai":
            # Its function calling converts schemas its own way and cannot take the JSON Schema
            # every tool source gives; the SDK is deprecated upstream besides.
            raise ConfigError(
                "tools, mcp_servers: the google-generativeai SDK cannot call tools here: "
                "use sdk = \"google-genai\" (pip install 'connic[gemini]')"
            )
        try:
            self.prompt = _prompts.from_string(options.system_prompt) if options.system_prompt else None
        except jinja2.TemplateSyntaxError as exc:
            raise ConfigError(f"system_prompt: {exc.message} (line {exc.lineno})") from None
        self.client: Any = None
        self.streams: Any = None  # google-generativeai's threads (connic.agents._gemini_legacy)

    async def start(self) -> None:
        """Start the tools and create the SDK client (the SDK is imported here, not before).

        A failure closes what was started: the app closes only the agents whose start
        succeeded, and an MCP server's process must not outlive a failed start.
        """
        try:
            await self.toolbox.start()
            self._create_client()
        except BaseException:
            await self.close()
            raise

    def _create_client(self) -> None:
        """The SDK's client: google-genai's, or the legacy SDK configured and its threads ready."""
        if self.sdk == "google-genai":
            genai = importlib.import_module("google.genai")
            types = importlib.import_module("google.genai.types")
            http = types.HttpOptions(base_url=self.options.base_url, timeout=int(self.options.timeout * 1000))
            self.client = genai.Client(api_key=self.api_key, http_options=http)
        else:
            legacy = importlib.import_module("google.generativeai")
            legacy_client = importlib.import_module("google.generativeai.client")
            threads = importlib.import_module("connic.agents._gemini_legacy")
            # This SDK's configuration is process-wide: legacy gemini agents share one key and endpoint.
            client_options = {"api_endpoint": self.options.base_url} if self.options.base_url else None
            legacy.configure(api_key=self.api_key, transport="rest", client_options=client_options)
            client = legacy_client.get_default_generative_client()
            try:
                self.streams = threads.LegacyStreams(self.name, self.options.legacy_threads, client)
            except TypeError as exc:
                raise ConfigError(f'{exc}: use sdk = "google-genai"') from None
            self.client = legacy

    async def close(self) -> None:
        """Close google-genai's HTTP sessions, or stop the legacy SDK's requests still running.

        (The legacy threads then end by themselves.)
        """
        if self.sdk == "google-genai" and self.client is not None:
            client, self.client = self.client, None
            await client.aio.aclose()
            client.close()
        if self.streams is not None:
            self.streams.close()
            self.streams = None
            self.client = None
        await self.toolbox.close()

    def system(self, turn: Turn) -> str | None:
        """The rendered system prompt, if any."""
        if self.prompt is None:
            return None
        try:
            return self.prompt.render(context=turn.context, session=turn.session, agent=turn.agent)
        except jinja2.UndefinedError as exc:
            raise AgentError(f"system_prompt: {exc.message}") from None

    def contents(self, turn: Turn) -> list[dict[str, Any]]:
        """The conversation as Gemini contents (roles ``user`` and ``model``).

        This agent's earlier answers are ``model`` turns. In a session with several agents,
        another agent's answer is a ``user`` turn that names it, so the model reads it as input.
        """
        contents: list[dict[str, Any]] = []
        for entry in turn.session.history:
            if entry.role == "user":
                contents.append({"role": "user", "parts": [{"text": entry.text}]})
            elif entry.agent == turn.agent:
                contents.append({"role": "model", "parts": [{"text": entry.text}]})
            else:
                contents.append({"role": "user", "parts": [{"text": f"[{entry.agent} answered] {entry.text}"}]})
        parts: list[dict[str, Any]] = [{"text": turn.message}]
        for file in turn.files:
            parts.append({"inline_data": {"mime_type": file.mime_type, "data": file.data}})
        contents.append({"role": "user", "parts": parts})
        return contents

    def generation_config(self) -> dict[str, Any]:
        """temperature, top_p and max_output_tokens, where set."""
        options = self.options
        values = {"temperature": options.temperature, "top_p": options.top_p}
        values["max_output_tokens"] = options.max_output_tokens
        return {k: v for k, v in values.items() if v is not None}

    def safety(self) -> list[dict[str, str]] | None:
        """safety_settings as the SDKs take them."""
        settings = self.options.safety_settings
        return [{"category": c, "threshold": t} for c, t in settings.items()] if settings else None

    def _clean(self, text: str) -> str:
        return mask(text, self.api_key)

    def _timed_out(self) -> AgentError:
        return AgentError(f"the Gemini request timed out after {self.options.timeout:g} s")

    async def respond(self, turn: Turn) -> AsyncIterator[str | Usage | ProgressEvent]:
        """Stream the model's answer chunk by chunk, the tool calls and results, then the token usage.

        A 503 (the model is overloaded) before a model call's first chunk is tried again, up
        to ``retries`` times, as long as the attempt would start within ``timeout``.
        """
        if self.client is None:
            raise AgentError("the gemini agent was not started")
        try:
            chat = TurnContents(self, turn, self.system(turn))
            async with contextlib.aclosing(run_turn(chat, self.toolbox, self.options, turn.agent)) as items:
                async for item in items:
                    yield item
        except AgentError as exc:
            raise AgentError(self._clean(exc.message)) from None
        except Exception as exc:
            raise unexpected(exc, self.api_key, log, turn.agent) from None

    def tools_config(self) -> dict[str, Any]:
        """The function declarations of the agent's tools (none: an empty dict), for GenerateContentConfig."""
        if not self.toolbox.tools:
            return {}
        types = importlib.import_module("google.genai.types")
        declarations = [
            types.FunctionDeclaration(name=t.name, description=t.description, parameters_json_schema=dict(t.parameters))
            for t in self.toolbox.tools.values()
        ]
        # connic runs the calls itself (the loop yields them to the client and bounds them).
        automatic = types.AutomaticFunctionCallingConfig(disable=True)
        return {"tools": [types.Tool(function_declarations=declarations)], "automatic_function_calling": automatic}

    async def _genai(self, contents: list[Any], system: str | None, deadline: float) -> AsyncGenerator[Any, None]:
        errors = importlib.import_module("google.genai.errors")
        types = importlib.import_module("google.genai.types")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise self._timed_out()
        # This attempt gets what is left of the timeout; the SDK's own retries are off
        # (connic's are bounded by the timeout and cancel at once).
        once = types.HttpRetryOptions(attempts=1)
        http = types.HttpOptions(timeout=max(1, int(remaining * 1000)), retry_options=once)
        config = types.GenerateContentConfig(
            system_instruction=system,
            safety_settings=self.safety(),
            http_options=http,
            **self.generation_config(),
            **self.tools_config(),
        )
        try:
            stream = await self.client.aio.models.generate_content_stream(
                model=self.model, contents=contents, config=config
            )
            async with contextlib.aclosing(stream):
                async for chunk in stream:
                    yield chunk
        except errors.APIError as exc:
            text = f"Gemini API error {exc.code}: {exc.message or exc.status}"
            raise (Overloaded if exc.code == 503 else AgentError)(text) from None
        except Exception as exc:
            raise self._failure(exc) from None

    async def _legacy(self, contents: list[Any], system: str | None, deadline: float) -> AsyncGenerator[Any, None]:
        assert self.streams is not None
        model = self.client.GenerativeModel(self.model, system_instruction=system, safety_settings=self.safety())
        config = self.generation_config() or None

        def call() -> Any:
            # In the worker thread, which may have waited for a free slot.
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            # retry=None: google-api-core would otherwise retry a 503 for up to 600 s in this
            # thread, deaf to the timeout and to cancel; connic retries instead (respond()).
            options = {"timeout": remaining, "retry": None}
            return model.generate_content(contents, stream=True, generation_config=config, request_options=options)

        try:
            async with contextlib.aclosing(self.streams.stream(call)) as chunks:
                async for chunk in chunks:
                    yield chunk
        except AgentError:
            raise
        except Exception as exc:
            code = getattr(exc, "code", None)
            if isinstance(code, int) and not is_timeout(exc):
                # google-api-core puts "POST <url>: " before Google's message; the other SDK does not.
                message = _REQUEST_LINE.sub("", str(getattr(exc, "message", None) or exc))
                text = f"Gemini API error {code}: {message}"
                raise (Overloaded if code == 503 else AgentError)(text) from None
            raise self._failure(exc) from None

    def _failure(self, exc: Exception) -> Exception:
        """What a failure other than an API error answer becomes."""
        if is_timeout(exc):
            return self._timed_out()
        if isinstance(exc, OSError | aiohttp.ClientError) or _transport_error(exc):
            return AgentError(f"could not reach the Gemini API: {type(exc).__name__}")
        return AgentError(f"Gemini request failed: {type(exc).__name__}: {exc}")


def _transport_error(exc: BaseException) -> bool:
    """An httpx connection failure (google-genai without aiohttp); httpx is loaded only if in use."""
    httpx = sys.modules.get("httpx")
    return httpx is not None and isinstance(exc, httpx.TransportError)
