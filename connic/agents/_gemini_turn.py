"""One turn of the ``gemini`` agent: its conversation in Gemini contents, for the tool loop.

Each model call is retried on a 503 (the model is overloaded) before its first chunk; the
``functionCall`` parts it asks for go to connic.agents.tool_loop, and their results come back
as ``functionResponse`` parts. The agent itself (clients, SDK calls) is connic/agents/gemini.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import time
from collections.abc import AsyncGenerator, Sequence
from typing import TYPE_CHECKING, Any

from connic import telemetry
from connic.agent import Turn, Usage
from connic.agents._common import backoff
from connic.agents.tool_loop import Call, Outcome
from connic.errors import AgentError

if TYPE_CHECKING:
    from connic.agents.gemini import GeminiAgent

__all__ = ["Overloaded", "TurnContents", "text_of"]

log = logging.getLogger("connic.agents.gemini")


class Overloaded(AgentError):
    """A 503 from Gemini ("the model is overloaded"): worth another attempt."""


class TurnContents:
    """One turn's conversation in Gemini contents, for the tool loop."""

    def __init__(self, agent: GeminiAgent, turn: Turn, system: str | None) -> None:
        self.agent = agent
        self.system = system
        self.contents: list[Any] = agent.contents(turn)
        self.model_turn: Any = None  # the model's last content, with its functionCall parts
        self.ids: dict[str, str | None] = {}  # call_id -> the id Gemini gave the call, if any

    async def step(self) -> AsyncGenerator[str | Usage | Call, None]:
        """One model call (retried on a 503 before its first chunk); the calls it asked for come last."""
        agent = self.agent
        deadline = time.monotonic() + agent.options.timeout
        delays = backoff()
        attempts = 0
        usage: Usage | None = None
        produced = False
        parts: list[Any] = []
        while True:
            attempts += 1
            parts = []
            if agent.sdk == "google-genai":
                chunks = agent._genai(self.contents, self.system, deadline)
            else:
                chunks = agent._legacy(self.contents, self.system, deadline)
            try:
                # agent.model: the name the request carries (a "gemini/" prefix dropped), as GenAI asks.
                with telemetry.provider_call("gcp.gemini", agent.model) as call:
                    async with contextlib.aclosing(chunks):
                        async for chunk in chunks:
                            metadata = getattr(chunk, "usage_metadata", None)
                            if metadata is not None and getattr(metadata, "prompt_token_count", None) is not None:
                                usage = Usage(
                                    prompt_tokens=int(metadata.prompt_token_count or 0),
                                    candidates_tokens=int(getattr(metadata, "candidates_token_count", 0) or 0),
                                )
                            if call.recording:
                                _record(call, chunk, usage)
                            text = text_of(chunk)
                            if agent.sdk == "google-genai":
                                parts.extend(_parts(chunk))
                            if text:
                                produced = True
                                yield text
                break
            except Overloaded as exc:
                delay = next(delays)
                # Never after a chunk (the client would get the start of the answer twice),
                # and never past the timeout.
                if produced or attempts > agent.options.retries or time.monotonic() + delay >= deadline:
                    tried = f" (gave up after {attempts} attempts)" if attempts > 1 else ""
                    raise AgentError(exc.message + tried) from None
                log.info("agent %s: %s; trying again in %g s", agent.name, agent._clean(exc.message), delay)
                await asyncio.sleep(delay)
        calls = [part.function_call for part in parts if getattr(part, "function_call", None) is not None]
        if not produced and not calls:
            raise AgentError("Gemini returned no candidates (an empty answer)")
        if usage is not None:
            yield usage
        if calls:
            types = importlib.import_module("google.genai.types")
            # The parts as they came (thought signatures included: Gemini wants them back).
            self.model_turn = types.Content(role="model", parts=parts)
            self.ids = {}
            for index, call in enumerate(calls):
                call_id = call.id or f"call_{len(self.contents)}_{index}"
                self.ids[call_id] = call.id
                yield Call(call_id, call.name or "", dict(call.args or {}))

    def answer(self, outcomes: Sequence[Outcome]) -> None:
        """The model's content with its calls, then a user content with one functionResponse per call."""
        responses = []
        for outcome in outcomes:
            response: dict[str, Any] = {"name": outcome.call.name}
            # Gemini's convention: "output" for the result, "error" for a failure.
            response["response"] = {"error" if outcome.is_error else "output": outcome.result}
            given = self.ids.get(outcome.call.call_id)
            if given:
                response["id"] = given
            responses.append({"function_response": response})
        self.contents.append(self.model_turn)
        self.contents.append({"role": "user", "parts": responses})


def _parts(chunk: Any) -> list[Any]:
    """The parts of a chunk's first candidate (the only one asked for)."""
    candidates = getattr(chunk, "candidates", None) or []
    content = getattr(candidates[0], "content", None) if candidates else None
    return list(getattr(content, "parts", None) or [])


def text_of(chunk: Any) -> str:
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


def _record(call: telemetry.ProviderCall, chunk: Any, usage: Usage | None) -> None:
    """Give the provider call's span what a streamed chunk says of the response (telemetry only)."""
    reasons = [
        str(getattr(reason, "name", reason))
        for candidate in getattr(chunk, "candidates", None) or ()
        if (reason := getattr(candidate, "finish_reason", None))
    ]
    call.record(
        response_model=getattr(chunk, "model_version", None) or None,
        response_id=getattr(chunk, "response_id", None) or None,
        finish_reasons=reasons or None,
        input_tokens=usage.prompt_tokens if usage is not None else None,
        output_tokens=usage.candidates_tokens if usage is not None else None,
    )
