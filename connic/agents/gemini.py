"""The ``gemini`` agent: Google's Gemini models through either Google SDK.

``google-genai`` (``pip install 'connic[gemini]'``) is the maintained SDK and is used natively
with asyncio. ``google-generativeai`` (``pip install 'connic[gemini-legacy]'``) is the SDK the
design card names; it is deprecated upstream and its asyncio path does not work over REST, so
its blocking stream runs in a worker thread that feeds an asyncio queue. Both are imported
only when a gemini agent is configured.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import importlib.util
import os
import socket
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from typing import Any

import attrs
import jinja2

from connic.agent import Agent, Turn, Usage
from connic.config import positive
from connic.errors import AgentError, ConfigError

__all__ = ["GeminiAgent"]

SDKS = ("auto", "google-genai", "google-generativeai")
_prompts = jinja2.Environment(undefined=jinja2.StrictUndefined, autoescape=False)


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
    class Options:
        """See docs/agents-gemini.md."""

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
        try:
            self.prompt = _prompts.from_string(options.system_prompt) if options.system_prompt else None
        except jinja2.TemplateSyntaxError as exc:
            raise ConfigError(f"system_prompt: {exc.message} (line {exc.lineno})") from None
        self.client: Any = None

    async def start(self) -> None:
        """Create the SDK client (the SDK is imported here, not before)."""
        if self.sdk == "google-genai":
            genai = importlib.import_module("google.genai")
            types = importlib.import_module("google.genai.types")
            http = types.HttpOptions(base_url=self.options.base_url, timeout=int(self.options.timeout * 1000))
            self.client = genai.Client(api_key=self.api_key, http_options=http)
        else:
            legacy = importlib.import_module("google.generativeai")
            # This SDK's configuration is process-wide: legacy gemini agents share one key and endpoint.
            client_options = {"api_endpoint": self.options.base_url} if self.options.base_url else None
            legacy.configure(api_key=self.api_key, transport="rest", client_options=client_options)
            self.client = legacy

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
        return text.replace(self.api_key, "***")

    async def respond(self, turn: Turn) -> AsyncIterator[str | Usage]:
        """Stream the model's answer chunk by chunk, then its token usage."""
        if self.client is None:
            raise AgentError("the gemini agent was not started")
        system = self.system(turn)
        chunks = self._genai(turn, system) if self.sdk == "google-genai" else self._legacy(turn, system)
        usage: Usage | None = None
        produced = False
        async with contextlib.aclosing(chunks):
            async for chunk in chunks:
                metadata = getattr(chunk, "usage_metadata", None)
                if metadata is not None and getattr(metadata, "prompt_token_count", None) is not None:
                    usage = Usage(
                        prompt_tokens=int(metadata.prompt_token_count or 0),
                        candidates_tokens=int(getattr(metadata, "candidates_token_count", 0) or 0),
                    )
                text = _text(chunk)
                if text:
                    produced = True
                    yield text
        if not produced:
            raise AgentError("Gemini returned no candidates (an empty answer)")
        if usage is not None:
            yield usage

    async def _genai(self, turn: Turn, system: str | None) -> AsyncGenerator[Any, None]:
        errors = importlib.import_module("google.genai.errors")
        types = importlib.import_module("google.genai.types")
        config = types.GenerateContentConfig(
            system_instruction=system, safety_settings=self.safety(), **self.generation_config()
        )
        try:
            stream = await self.client.aio.models.generate_content_stream(
                model=self.model, contents=self.contents(turn), config=config
            )
            async with contextlib.aclosing(stream):
                async for chunk in stream:
                    yield chunk
        except errors.APIError as exc:
            raise AgentError(self._clean(f"Gemini API error {exc.code}: {exc.message or exc.status}")) from None
        except (TimeoutError, OSError) as exc:
            raise AgentError(self._clean(f"could not reach the Gemini API: {type(exc).__name__}")) from None

    async def _legacy(self, turn: Turn, system: str | None) -> AsyncGenerator[Any, None]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        stop = threading.Event()
        holder: dict[str, Any] = {}
        model = self.client.GenerativeModel(self.model, system_instruction=system, safety_settings=self.safety())
        contents = self.contents(turn)
        config = self.generation_config() or None

        def put(kind: str, value: Any) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, (kind, value))

        def work() -> None:
            try:
                result = model.generate_content(
                    contents, stream=True, generation_config=config, request_options={"timeout": self.options.timeout}
                )
                holder["result"] = result
                for chunk in result:
                    if stop.is_set():
                        return
                    put("chunk", chunk)
                put("done", None)
            except StopIteration:  # the SDK's way of saying the stream had no chunk at all
                put("done", None)
            except Exception as exc:
                if not stop.is_set():
                    put("error", exc)

        worker = loop.run_in_executor(None, work)
        try:
            while True:
                kind, value = await queue.get()
                if kind == "done":
                    break
                if kind == "error":
                    raise AgentError(self._clean(_legacy_error(value))) from None
                yield value
        finally:
            stop.set()
            _close_legacy_stream(holder.get("result"))
            # The thread ends once its read fails on the closed response.
            with contextlib.suppress(TimeoutError, Exception):
                await asyncio.wait_for(asyncio.shield(worker), 5)


def _text(chunk: Any) -> str:
    """A chunk's text; a blocked prompt or an empty candidate is an error the client sees."""
    feedback = getattr(chunk, "prompt_feedback", None)
    reason = getattr(feedback, "block_reason", None) if feedback is not None else None
    if reason:
        raise AgentError(f"Gemini blocked the prompt: {getattr(reason, 'name', reason)}")
    candidates = getattr(chunk, "candidates", None) or []
    texts = []
    for candidate in candidates:
        content = getattr(candidate, "content", None)
        for part in getattr(content, "parts", None) or []:
            text = getattr(part, "text", None)
            if text:
                texts.append(text)
    return "".join(texts)


def _legacy_error(exc: BaseException) -> str:
    code = getattr(exc, "code", None)
    message = getattr(exc, "message", None) or str(exc)
    if code is not None:
        return f"Gemini API error {int(code) if isinstance(code, int) else code}: {message}"
    return f"Gemini request failed: {type(exc).__name__}: {message}"


def _close_legacy_stream(result: Any) -> None:
    """Close the HTTP response under a google-generativeai stream, so its thread stops reading.

    Closing a socket does not wake a thread blocked reading it; shutting it down does. The
    response is the REST transport's ``requests`` response, reached through the SDK's
    iterator (private attributes, hence the care).
    """
    iterator = getattr(result, "_iterator", None)
    response = getattr(iterator, "_response", None)
    if response is None:
        return
    raw = getattr(response, "raw", None)
    sock = getattr(getattr(raw, "_connection", None), "sock", None)
    if sock is None:
        fp = getattr(getattr(getattr(raw, "_fp", None), "fp", None), "raw", None)
        sock = getattr(fp, "_sock", None)
    if isinstance(sock, socket.socket):
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(Exception):
        response.close()
