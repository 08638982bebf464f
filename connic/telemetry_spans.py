"""The spans of one agent turn and of a provider call: :mod:`connic.telemetry_otel`'s helpers.

Imported only with it, so only when OpenTelemetry is installed and telemetry is on.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import time
import types
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from connic import telemetry
from connic.agent import Progress, ToolCall, ToolResult, Turn
from connic.frames import ErrorFrame, Response, ServerFrame, StreamChunk, StreamEnd

if TYPE_CHECKING:
    from connic.message import Message
    from connic.telemetry_otel import Tracing

__all__ = ["TURN", "ProviderCallSpan", "TurnTrace", "error_type"]

_PROPAGATOR = TraceContextTextMapPropagator()  # the W3C format the protocol names, whatever OTEL_PROPAGATORS says
TURN: contextvars.ContextVar[TurnTrace | None] = contextvars.ContextVar("connic_turn_trace", default=None)
"""The traced turn running in this task."""


def error_type(exc: BaseException) -> str:
    """``error.type`` for an exception: ``cancelled`` for a cancellation, else its qualified class name."""
    if isinstance(exc, asyncio.CancelledError | GeneratorExit):
        return "cancelled"
    kind = type(exc)
    return kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"


def _parent(message: Message) -> otel_context.Context | None:
    """The client's trace context for ``message``: its ``context.traceparent``, else its handshake's."""
    context = message.frame.context
    traceparent = context.get("traceparent") if context else None
    if isinstance(traceparent, str):
        carrier = {"traceparent": traceparent}
        tracestate = context.get("tracestate")
        if isinstance(tracestate, str):
            carrier["tracestate"] = tracestate
        parent = _PROPAGATOR.extract(carrier)
        if trace.get_current_span(parent).get_span_context().is_valid:
            return parent
    handshake = message.handshake
    if handshake is not None:
        parent = _PROPAGATOR.extract(handshake)
        if trace.get_current_span(parent).get_span_context().is_valid:
            return parent
    return None  # a malformed traceparent is ignored, as the W3C spec says: the current context


def _text_message(role: str, text: str, finish_reason: str | None = None) -> str:
    """``gen_ai.input.messages`` / ``gen_ai.output.messages``: one text message, as JSON."""
    message: dict[str, Any] = {"role": role, "parts": [{"type": "text", "content": text}]}
    if finish_reason is not None:
        message["finish_reason"] = finish_reason
    return json.dumps([message], ensure_ascii=False)


class TurnTrace:
    """One turn's span, what its frames said, and its open tool spans."""

    __slots__ = (
        "agent",
        "connector",
        "error",
        "finish",
        "first_chunk",
        "first_seq",
        "interrupted",
        "last_seq",
        "message",
        "output",
        "provider",
        "request_model",
        "response_model",
        "span",
        "started",
        "tools",
        "tracing",
        "usage",
    )

    def __init__(self, tracing: Tracing, turn: Turn, message: Message) -> None:
        self.tracing = tracing
        self.message = message
        self.agent = turn.agent
        self.connector = message.session.sessions.label
        self.started = time.perf_counter()
        self.first_chunk = False
        self.first_seq: int | None = None
        self.last_seq: int | None = None
        self.finish: str | None = None
        self.usage: Mapping[str, int] | None = None
        self.error: str | None = None  # the error frame's code
        self.interrupted: str | None = None  # the chain itself raised (a cancellation)
        self.output: str | None = None
        self.provider: str | None = None
        self.request_model: str | None = None
        self.response_model: str | None = None
        self.tools: dict[str, trace.Span] = {}
        attributes: dict[str, Any] = {
            "gen_ai.operation.name": "invoke_agent",
            "gen_ai.agent.name": turn.agent,
            "gen_ai.conversation.id": turn.session.id,
            "connic.connector": self.connector,
            "connic.message.id": str(turn.id),
            "connic.message.number": turn.number,
        }
        if tracing.capture_content:
            attributes["gen_ai.input.messages"] = _text_message("user", turn.message)
        self.span = tracing.tracer.start_span(
            f"invoke_agent {turn.agent}", context=_parent(message), kind=SpanKind.INTERNAL, attributes=attributes
        )

    async def emit(self, frame: ServerFrame) -> None:
        """One frame of the reply: note what the span needs, then the session sends it."""
        # Message.emit numbers the frame before it first waits: this is the frame's seq.
        seq = self.message.session.seq + 1
        if self.first_seq is None:
            self.first_seq = seq
        self.last_seq = seq
        if isinstance(frame, StreamChunk):
            if not self.first_chunk:
                self.first_chunk = True
                self.tracing.first_chunk.record(
                    time.perf_counter() - self.started,
                    {"gen_ai.agent.name": self.agent, "connic.connector": self.connector},
                )
        elif isinstance(frame, Response | StreamEnd):
            self.finish = frame.finish_reason
            self.usage = frame.token_usage
            if self.tracing.capture_content:
                self.output = frame.response if isinstance(frame, Response) else frame.full_response
        elif isinstance(frame, ErrorFrame):
            self.error = frame.code
        await self.message.emit(frame)

    def event(self, value: ToolCall | ToolResult | Progress) -> None:
        """A tool call opens an ``execute_tool`` span, its result (by ``call_id``) closes it."""
        span = self.span
        if isinstance(value, Progress):
            span.add_event("connic.progress", {"connic.progress.stage": value.stage})
            return
        if isinstance(value, ToolCall):
            tool = self._tool(value.call_id, value.name)
            if self.tracing.capture_content:
                tool.set_attribute("gen_ai.tool.call.arguments", json.dumps(dict(value.arguments), ensure_ascii=False))
            return
        if value.call_id in self.tools:
            tool = self.tools.pop(value.call_id)
        else:  # a result with no call before it: a span of no length
            tool = self._tool(value.call_id, value.name, keep=False)
        if self.tracing.capture_content:
            tool.set_attribute("gen_ai.tool.call.result", json.dumps(value.result, ensure_ascii=False))
        if value.is_error:
            tool.set_attribute("error.type", "tool_error")
            tool.set_status(Status(StatusCode.ERROR))
        tool.end()

    def _tool(self, call_id: str, name: str, keep: bool = True) -> trace.Span:
        tool = self.tracing.tracer.start_span(
            f"execute_tool {name}",
            context=trace.set_span_in_context(self.span),
            kind=SpanKind.INTERNAL,
            attributes={
                "gen_ai.operation.name": "execute_tool",
                "gen_ai.tool.name": name,
                "gen_ai.tool.call.id": call_id,
                "gen_ai.tool.type": "function",
            },
        )
        if keep:
            old = self.tools.get(call_id)
            if old is not None:  # the same id called again before its result: the first ends here
                old.end()
            self.tools[call_id] = tool
        return tool

    def provider_ended(self, provider: str, request_model: str | None, response_model: str | None) -> None:
        """A provider call inside this turn ended: the turn span names the provider and models too."""
        self.provider = provider
        self.request_model = request_model or self.request_model
        self.response_model = response_model or self.response_model

    def end(self) -> None:
        """The turn is over: the span's last attributes, its end, and the turn's metrics."""
        error = self.error
        if error is None and (self.finish == "cancelled" or self.interrupted is not None):
            error = self.interrupted or "cancelled"
        span = self.span
        for tool in self.tools.values():  # calls that never got a result
            if error is not None:
                tool.set_attribute("error.type", error)
                tool.set_status(Status(StatusCode.ERROR))
            tool.end()
        self.tools.clear()
        usage = self.usage or {}
        input_tokens, output_tokens = usage.get("prompt_tokens", 0), usage.get("candidates_tokens", 0)
        if span.is_recording():
            attributes: dict[str, Any] = {}
            if self.first_seq is not None and self.last_seq is not None:
                attributes["connic.seq.first"] = self.first_seq
                attributes["connic.seq.last"] = self.last_seq
            if self.usage is not None:
                attributes["gen_ai.usage.input_tokens"] = input_tokens
                attributes["gen_ai.usage.output_tokens"] = output_tokens
            if self.finish is not None:
                attributes["gen_ai.response.finish_reasons"] = (self.finish,)
            if self.provider is not None:
                attributes["gen_ai.provider.name"] = self.provider
            if self.request_model is not None:
                attributes["gen_ai.request.model"] = self.request_model
            if self.response_model is not None:
                attributes["gen_ai.response.model"] = self.response_model
            if self.output is not None:
                attributes["gen_ai.output.messages"] = _text_message("assistant", self.output, self.finish)
            if error is not None:
                attributes["error.type"] = error
                span.set_status(Status(StatusCode.ERROR, error))
            span.set_attributes(attributes)
        span.end()
        metric: dict[str, Any] = {
            "gen_ai.operation.name": "invoke_agent",
            "gen_ai.agent.name": self.agent,
            "connic.connector": self.connector,
        }
        if self.provider is not None:
            metric["gen_ai.provider.name"] = self.provider
        if error is not None:
            metric["error.type"] = error
        tracing = self.tracing
        tracing.duration.record(time.perf_counter() - self.started, metric)
        _record_tokens(tracing, metric, input_tokens, output_tokens)


def _record_tokens(tracing: Tracing, attributes: dict[str, Any], input_tokens: int, output_tokens: int) -> None:
    """``gen_ai.client.token.usage`` for one operation (nothing when it reported no tokens)."""
    if input_tokens or output_tokens:
        attributes = {k: v for k, v in attributes.items() if k != "error.type"}
        tracing.tokens.record(input_tokens, {**attributes, "gen_ai.token.type": "input"})
        tracing.tokens.record(output_tokens, {**attributes, "gen_ai.token.type": "output"})


class ProviderCallSpan(telemetry.ProviderCall):
    """A provider call's ``{operation} {model}`` client span, current while the block runs."""

    recording = True

    def __init__(self, tracing: Tracing, provider: str, model: str | None, operation: str) -> None:
        self.tracing = tracing
        self.capture_content = tracing.capture_content
        self.provider = provider
        self.model = model
        self.operation = operation
        self.response_model: str | None = None
        self.input_tokens: int | None = None
        self.output_tokens: int | None = None
        self.finish_reasons: tuple[str, ...] | None = None
        self.response_id: str | None = None
        self.span: trace.Span | None = None
        self._token: object = None
        self._started = 0.0
        self._turn: TurnTrace | None = None

    def __enter__(self) -> telemetry.ProviderCall:
        attributes: dict[str, Any] = {"gen_ai.operation.name": self.operation, "gen_ai.provider.name": self.provider}
        if self.model:
            attributes["gen_ai.request.model"] = self.model
        name = f"{self.operation} {self.model}" if self.model else self.operation
        self.span = self.tracing.tracer.start_span(name, kind=SpanKind.CLIENT, attributes=attributes)
        self._token = otel_context.attach(trace.set_span_in_context(self.span))
        self._turn = TURN.get()
        self._started = time.perf_counter()
        return self

    def record(
        self,
        *,
        response_model: str | None = None,
        input_tokens: int | None = None,
        output_tokens: int | None = None,
        finish_reasons: Sequence[str] | None = None,
        response_id: str | None = None,
    ) -> None:
        """What the provider answered (see :meth:`connic.telemetry.ProviderCall.record`); later calls add to it."""
        if response_model is not None:
            self.response_model = response_model
        if input_tokens is not None:
            self.input_tokens = input_tokens
        if output_tokens is not None:
            self.output_tokens = output_tokens
        if finish_reasons is not None:
            self.finish_reasons = tuple(finish_reasons)
        if response_id is not None:
            self.response_id = response_id

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: types.TracebackType | None
    ) -> None:
        span = self.span
        assert span is not None, "a provider call's block was left without being entered"
        error = error_type(exc) if exc is not None else None
        attributes: dict[str, Any] = {}
        if self.response_model is not None:
            attributes["gen_ai.response.model"] = self.response_model
        if self.response_id is not None:
            attributes["gen_ai.response.id"] = self.response_id
        if self.input_tokens is not None:
            attributes["gen_ai.usage.input_tokens"] = self.input_tokens
        if self.output_tokens is not None:
            attributes["gen_ai.usage.output_tokens"] = self.output_tokens
        if self.finish_reasons is not None:
            attributes["gen_ai.response.finish_reasons"] = self.finish_reasons
        if error is not None:
            attributes["error.type"] = error
            span.set_status(Status(StatusCode.ERROR, error))
        span.set_attributes(attributes)
        span.end()
        otel_context.detach(self._token)  # type: ignore[arg-type]  # the token attach() returned
        metric: dict[str, Any] = {"gen_ai.operation.name": self.operation, "gen_ai.provider.name": self.provider}
        if self.model:
            metric["gen_ai.request.model"] = self.model
        if self.response_model is not None:
            metric["gen_ai.response.model"] = self.response_model
        if error is not None:
            metric["error.type"] = error
        self.tracing.duration.record(time.perf_counter() - self._started, metric)
        _record_tokens(self.tracing, metric, self.input_tokens or 0, self.output_tokens or 0)
        if self._turn is not None:
            self._turn.provider_ended(self.provider, self.model, self.response_model)
