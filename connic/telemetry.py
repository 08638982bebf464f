"""OpenTelemetry traces and metrics, at no cost when they are off: the switch and the hooks.

This module never imports OpenTelemetry. :func:`configure` (called when an
application is built) does, through :mod:`connic.telemetry_otel`, and only when
``[server] telemetry`` allows it and ``opentelemetry-api`` is installed (the
``connic[otel]`` extra). Until then every hook here is one check of a global
and a plain call: the session core calls :func:`answer` to run each agent turn
and the serialiser calls :func:`event` with each tool or progress event.

With OpenTelemetry on but no SDK configured (no tracer or meter provider set by
the application or by ``opentelemetry-instrument``), turns take the same
no-span path until a provider appears. docs/observability.md describes the
spans, attributes and metrics.

The switch is process-wide, as OpenTelemetry's own providers are: the last
application built decides (a process normally builds one).
"""

from __future__ import annotations

import contextvars
import logging
import types
from collections.abc import Coroutine, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from connic import logs
from connic.errors import ConfigError

if TYPE_CHECKING:
    from aiohttp import web

    from connic.agent import Progress, ToolCall, ToolResult, Turn
    from connic.config import ServerConfig
    from connic.message import Message
    from connic.metrics import Metrics

__all__ = [
    "HANDSHAKE",
    "MODES",
    "ProviderCall",
    "answer",
    "configure",
    "enabled",
    "event",
    "provider_call",
]

log = logging.getLogger("connic.telemetry")

MODES = ("auto", "on", "off")
"""``[server] telemetry``: on when installed (auto), required (on), never imported (off)."""

HANDSHAKE: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar("connic_handshake", default=None)
"""The W3C trace context headers of the WebSocket handshake, in the connection's task.

Set by an aiohttp middleware while telemetry is on; a message takes it when it is
accepted (:class:`connic.message.Message`), since the session's answering task may
outlive the connection that sent it.
"""


class _Chain(Protocol):
    def __call__(self, turn: Turn, emit: Any, /) -> Coroutine[Any, Any, None]: ...


class _Tracing(Protocol):
    """What :mod:`connic.telemetry_otel` provides once on."""

    def answer(self, chain: _Chain, turn: Turn, message: Message) -> Coroutine[Any, Any, None]: ...
    def event(self, value: ToolCall | ToolResult | Progress) -> None: ...
    def provider_call(self, provider: str, model: str | None, operation: str) -> ProviderCall: ...
    def watch(self, metrics: Metrics) -> None: ...
    def handshake_middleware(self) -> Any: ...


_tracing: _Tracing | None = None


def enabled() -> bool:
    """Whether OpenTelemetry is on in this process (:func:`configure` found it and was allowed to)."""
    return _tracing is not None


def configure(server: ServerConfig, metrics: Metrics, app: web.Application | None = None, *, where: str = "") -> None:
    """Turn OpenTelemetry on or off as ``server.telemetry`` says; called when an application is built.

    ``"auto"`` turns it on when ``opentelemetry-api`` is importable, ``"on"`` refuses
    to start without it, ``"off"`` never imports it. When on, ``metrics`` (the
    application's Prometheus metrics) is also observed for the OpenTelemetry
    session and resume metrics, and ``app`` gets the middleware that reads a
    handshake's ``traceparent``.
    """
    global _tracing
    mode = server.telemetry
    if mode == "off":
        _tracing = None
        return
    try:
        from connic import telemetry_otel
    except ImportError as exc:
        if mode == "on":
            raise ConfigError(
                f"{where or 'configuration'}: server.telemetry: 'on' needs OpenTelemetry, which is not installed"
                f" ({exc.name or exc}); pip install 'connic[otel]', or set telemetry = \"auto\""
            ) from None
        _tracing = None
        return
    tracing = telemetry_otel.tracing(capture_content=server.telemetry_capture_content)
    tracing.watch(metrics)
    if app is not None:
        app.middlewares.append(tracing.handshake_middleware())
    _tracing = tracing


def answer(chain: _Chain, turn: Turn, message: Message) -> Coroutine[Any, Any, None]:
    """``chain(turn, message.emit)``: one agent's turn, traced and with its ids in the logs when those are on."""
    tracing = _tracing
    if tracing is not None:
        return tracing.answer(chain, turn, message)
    if logs.ids_wanted:
        return _with_ids(chain, turn, message)
    return chain(turn, message.emit)


async def _with_ids(chain: _Chain, turn: Turn, message: Message) -> None:
    token = logs.TURN.set(turn_ids(turn, message))
    try:
        await chain(turn, message.emit)
    finally:
        logs.TURN.reset(token)


def turn_ids(turn: Turn, message: Message) -> logs.TurnIds:
    """The ids the logs show for ``turn``."""
    return logs.TurnIds(turn.session.id, turn.id, turn.number, message.session.sessions.label, turn.agent)


def event(value: ToolCall | ToolResult | Progress) -> None:
    """A tool call, tool result or progress event of the turn running in this task (a tool span's start or end)."""
    tracing = _tracing
    if tracing is not None:
        tracing.event(value)


class ProviderCall:
    """One call of an agent to its model provider, as a span: ``with provider_call(...) as call:``.

    This base class is what :func:`provider_call` returns while telemetry is off: it
    records nothing. Agents report what the provider answered with :meth:`record`.
    """

    capture_content = False
    """Whether message text may be recorded (``[server] telemetry_capture_content``)."""

    recording = False
    """Whether :meth:`record` keeps anything: agents skip gathering what to give it when not."""

    def __enter__(self) -> ProviderCall:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: types.TracebackType | None
    ) -> None:
        return None

    def record(
        self,
        *,
        response_model: str | None = None,
        input_tokens: int | None = None,
        output_tokens: int | None = None,
        finish_reasons: Sequence[str] | None = None,
        response_id: str | None = None,
    ) -> None:
        """What the provider answered: its model, token counts, finish reasons and response id (each optional)."""


_OFF = ProviderCall()


def provider_call(provider: str, model: str | None, *, operation: str = "chat") -> ProviderCall:
    """A context manager around one provider call of an agent: a ``{operation} {model}`` span while telemetry is on.

    ``provider`` is the GenAI ``gen_ai.provider.name`` (``"openai"``, ``"gcp.gemini"``),
    ``model`` the requested model. Inside an agent's turn the span is a child of the
    turn's ``invoke_agent`` span, and what it records (provider, models) is copied to
    the turn span too. An exception leaving the block sets ``error.type``::

        with telemetry.provider_call("openai", self.options.model) as call:
            response = await client.chat(...)
            call.record(response_model=response.model, input_tokens=..., output_tokens=...,
                        finish_reasons=[response.finish_reason])

    Costs one check of a global while telemetry is off.
    """
    tracing = _tracing
    if tracing is None:
        return _OFF
    return tracing.provider_call(provider, model, operation)
