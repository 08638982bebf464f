"""connic's OpenTelemetry spans and metrics: imported only by :func:`connic.telemetry.configure`.

Importing this module imports ``opentelemetry-api`` (and fails without it, which
is how the switch finds out). It follows the GenAI semantic conventions:

- one ``invoke_agent {agent}`` span per agent turn, parented by the client's W3C
  trace context (a message's ``context.traceparent``, else the handshake's
  ``traceparent`` header), with ``gen_ai.*`` attributes and connic's own under
  ``connic.*``;
- an ``execute_tool {name}`` child span from each :class:`~connic.ToolCall` to its
  :class:`~connic.ToolResult`, whatever the agent;
- a ``{operation} {model}`` client span per :func:`connic.telemetry.provider_call`;
- ``gen_ai.client.operation.duration`` and ``gen_ai.client.token.usage`` (per turn,
  ``gen_ai.operation.name = invoke_agent``, and per provider call), and
  ``connic.time_to_first_chunk``, ``connic.sessions.active``, ``connic.resumes``.

Message text (the user's message, the answer, tool arguments and results) is
recorded only with ``[server] telemetry_capture_content = true``.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from typing import TYPE_CHECKING, Any

from aiohttp import web
from opentelemetry import context as otel_context
from opentelemetry import metrics as otel_metrics
from opentelemetry import trace
from opentelemetry.metrics import CallbackOptions, NoOpMeterProvider, Observation

from connic import __version__, logs, telemetry
from connic.agent import Progress, ToolCall, ToolResult, Turn
from connic.telemetry_spans import TURN, ProviderCallSpan, TurnTrace, error_type

if TYPE_CHECKING:
    from connic.message import Message
    from connic.metrics import Metrics

__all__ = ["Tracing", "tracing"]

DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)
"""The GenAI semantic conventions' advice for ``gen_ai.client.operation.duration`` (seconds)."""
TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864)
"""Their advice for ``gen_ai.client.token.usage``."""

_NO_PROVIDER = (trace.ProxyTracerProvider, trace.NoOpTracerProvider)


def _no_meter_provider(provider: object) -> bool:
    # The API's stand-in until an SDK sets a provider has a private class: its name is what can be checked.
    return isinstance(provider, NoOpMeterProvider) or type(provider).__name__ == "_ProxyMeterProvider"


class Tracing:
    """The tracer, the instruments and the per-turn hook (one per process: :func:`tracing`)."""

    def __init__(self) -> None:
        self.capture_content = False
        self.tracer = trace.get_tracer("connic", __version__)
        meter = otel_metrics.get_meter("connic", __version__)
        self.duration = meter.create_histogram(
            "gen_ai.client.operation.duration",
            unit="s",
            description="GenAI operation duration: agent turns (invoke_agent) and provider calls.",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        )
        self.tokens = meter.create_histogram(
            "gen_ai.client.token.usage",
            unit="{token}",
            description="Tokens used, by gen_ai.token.type: agent turns (invoke_agent) and provider calls.",
            explicit_bucket_boundaries_advisory=TOKEN_BUCKETS,
        )
        self.first_chunk = meter.create_histogram(
            "connic.time_to_first_chunk", unit="s", description="Time from a turn's start to its first chunk."
        )
        self._watched: weakref.WeakSet[Metrics] = weakref.WeakSet()
        meter.create_observable_up_down_counter(
            "connic.sessions.active",
            callbacks=[self._sessions],
            unit="{session}",
            description="Sessions this process holds, attached or detached.",
        )
        meter.create_observable_counter(
            "connic.resumes",
            callbacks=[self._resumes],
            unit="{resume}",
            description="Resume attempts, by connic.resume.result (resumed, not_recovered, failed).",
        )
        self._live = False
        self._next_check = 0.0

    # --- the switch's calls -----------------------------------------------------

    def live(self) -> bool:
        """Whether an SDK (or any real provider) is set: until then a turn costs no span at all.

        Asking OpenTelemetry costs microseconds (each lookup reads the environment), so
        until a provider is found it is asked again at most once a second: a provider set
        after the server started counts from the next turn after that.
        """
        if self._live:
            return True
        now = time.monotonic()
        if now < self._next_check:
            return False
        self._next_check = now + 1.0
        no_tracer = isinstance(trace.get_tracer_provider(), _NO_PROVIDER)
        # Once set, a global provider cannot be replaced: live stays live.
        self._live = not (no_tracer and _no_meter_provider(otel_metrics.get_meter_provider()))
        return self._live

    def answer(self, chain: telemetry._Chain, turn: Turn, message: Message) -> Coroutine[Any, Any, None]:
        """Run one agent's turn inside its ``invoke_agent`` span (see :func:`connic.telemetry.answer`)."""
        if not self.live():
            if logs.ids_wanted:
                return telemetry._with_ids(chain, turn, message)
            return chain(turn, message.emit)
        return self._answer(chain, turn, message)

    async def _answer(self, chain: telemetry._Chain, turn: Turn, message: Message) -> None:
        turn_trace = TurnTrace(self, turn, message)
        span_token = otel_context.attach(trace.set_span_in_context(turn_trace.span))
        turn_token = TURN.set(turn_trace)
        ids_token = logs.TURN.set(telemetry.turn_ids(turn, message))
        try:
            await chain(turn, turn_trace.emit)
        except BaseException as exc:
            # Only the task's cancellation leaves a chain (its error boundary keeps the rest).
            turn_trace.interrupted = error_type(exc)
            raise
        finally:
            logs.TURN.reset(ids_token)
            TURN.reset(turn_token)
            otel_context.detach(span_token)
            turn_trace.end()

    def event(self, value: ToolCall | ToolResult | Progress) -> None:
        """A progress event of the turn running in this task: a tool span starts or ends."""
        turn_trace = TURN.get()
        if turn_trace is not None:
            turn_trace.event(value)

    def provider_call(self, provider: str, model: str | None, operation: str) -> telemetry.ProviderCall:
        """A provider call's span (see :func:`connic.telemetry.provider_call`)."""
        return ProviderCallSpan(self, provider, model, operation)

    def handshake_middleware(self) -> Callable[..., Awaitable[web.StreamResponse]]:
        """An aiohttp middleware that keeps a request's ``traceparent`` for the messages its connection sends.

        Not a coroutine: it sets the trace context and hands back the handler's own awaitable,
        so that no frame of it stays alive for as long as a WebSocket connection is open (some
        0.4 KB per idle connection). aiohttp handles each request in a task of its own, whose
        context ends with it: nothing needs resetting.
        """

        def trace_context(
            request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
        ) -> Awaitable[web.StreamResponse]:
            traceparent = request.headers.get("traceparent")
            if traceparent is not None:
                carrier = {"traceparent": traceparent}
                tracestate = request.headers.get("tracestate")
                if tracestate:
                    carrier["tracestate"] = tracestate
                telemetry.HANDSHAKE.set(carrier)
            return handler(request)

        return web.middleware(trace_context)

    # --- metrics read from the Prometheus ones ----------------------------------

    def watch(self, metrics: Metrics) -> None:
        """Observe an application's Prometheus metrics for ``connic.sessions.active`` and ``connic.resumes``."""
        self._watched.add(metrics)

    def _sessions(self, options: CallbackOptions) -> Iterable[Observation]:
        totals: dict[str, float] = {}
        for metrics in list(self._watched):
            for (connector,), value in metrics.sessions_open.values.items():
                totals[connector] = totals.get(connector, 0.0) + value
        return [Observation(value, {"connic.connector": connector}) for connector, value in totals.items()]

    def _resumes(self, options: CallbackOptions) -> Iterable[Observation]:
        totals: dict[tuple[str, str], float] = {}
        for metrics in list(self._watched):
            for (connector, result), value in metrics.resumes.values.items():
                totals[connector, result] = totals.get((connector, result), 0.0) + value
        return [
            Observation(value, {"connic.connector": connector, "connic.resume.result": result})
            for (connector, result), value in totals.items()
        ]


_instance: Tracing | None = None


def tracing(*, capture_content: bool) -> Tracing:
    """The process's :class:`Tracing` (instruments are made once: OpenTelemetry's registry is global too)."""
    global _instance
    if _instance is None:
        _instance = Tracing()
    _instance.capture_content = capture_content
    return _instance
