"""The OpenTelemetry SDK the telemetry tests share: set once per process, as OpenTelemetry allows."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from opentelemetry import metrics as otel_metrics
from opentelemetry import trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from connic import telemetry_otel


class Sdk:
    """The SDK's tracer and meter providers, exporting to memory, set as the process's global ones."""

    def __init__(self) -> None:
        self.spans = InMemorySpanExporter()
        self.reader = InMemoryMetricReader()
        tracer_provider = TracerProvider()
        tracer_provider.add_span_processor(SimpleSpanProcessor(self.spans))
        trace.set_tracer_provider(tracer_provider)
        otel_metrics.set_meter_provider(MeterProvider(metric_readers=[self.reader]))


_SDK: Sdk | None = None


@pytest.fixture(name="sdk")
def sdk_fixture() -> Iterator[Sdk]:
    """The process's OpenTelemetry SDK, with an empty span exporter."""
    global _SDK
    if _SDK is None:
        _SDK = Sdk()
        # A turn before this (another module's) found no provider and would look again only a second later.
        telemetry_otel.tracing(capture_content=False)._next_check = 0.0
    _SDK.spans.clear()
    yield _SDK
    _SDK.spans.clear()  # other test modules' turns are recorded too while it is set: keep nothing


async def finished(sdk: Sdk, name: str, count: int = 1) -> list[ReadableSpan]:
    """The finished spans called ``name``, once there are ``count`` (a span ends just after its last frame)."""
    async with asyncio.timeout(5):
        while True:
            spans = [s for s in sdk.spans.get_finished_spans() if s.name == name]
            if len(spans) >= count:
                return spans
            await asyncio.sleep(0.01)
