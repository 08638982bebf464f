"""The built-in agents' provider calls as OpenTelemetry spans: the real SDKs against the provider fakes.

One turn with one tool round is two provider calls: two ``chat {model}`` client spans and
one ``execute_tool`` span, all children of the turn's ``invoke_agent`` span, with what
the provider said (response model, usage, finish reasons) on each call.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

pytest.importorskip("opentelemetry.sdk", reason="the OpenTelemetry SDK is not installed (test extra)")

import tool_functions
from opentelemetry import trace
from otel_helpers import Sdk, finished, sdk_fixture  # noqa: F401  (a fixture)

from conftest import Connect, StartServer
from fake_provider import GEMINI_MODEL, OPENAI_MODEL, FakeGemini, FakeOpenAI

KEY = "sk-test-very-secret-key"
AGENTS: dict[str, dict[str, Any]] = {
    "openai": {"use": "openai", "model": "m-requested"},
    "gemini": {"use": "gemini", "sdk": "google-genai", "model": "gemini-requested"},
}
PROVIDER = {"openai": "openai", "gemini": "gcp.gemini"}
RESPONSE_MODEL = {"openai": OPENAI_MODEL, "gemini": GEMINI_MODEL}
# What the fakes report for each call (OpenAI: 11 + 3, Gemini: 9 + 4).
USAGE = {"openai": (11, 3), "gemini": (9, 4)}
FINISH = {"openai": ["tool_calls", None], "gemini": ["STOP", "STOP"]}


@pytest.fixture(params=["openai", "gemini"])
async def fake(request: pytest.FixtureRequest) -> AsyncIterator[tuple[str, FakeOpenAI | FakeGemini]]:
    tool_functions.reset()
    provider: FakeOpenAI | FakeGemini = FakeOpenAI() if request.param == "openai" else FakeGemini()
    await provider.start()
    yield request.param, provider
    await provider.close()


async def test_each_provider_call_is_a_client_span_under_the_turn(
    start_server: StartServer, connect: Connect, sdk: Sdk, fake: tuple[str, FakeOpenAI | FakeGemini]
) -> None:
    kind, provider = fake
    provider.tool_rounds = [[("get_weather", {"city": "Oslo"})]]
    agent = {**AGENTS[kind], "base_url": provider.base_url, "api_key": KEY, "tools": ["tool_functions:get_weather"]}
    server = await start_server({"agents": {"bot": agent}, "connectors": [{"secrets": ["s"]}]})
    client = await connect(server.url(), secret="s")
    frames = await client.reply({"id": "m1", "message": "Weather in Oslo?"})
    assert frames[-1]["type"] == "stream_end"

    (turn,) = await finished(sdk, "invoke_agent bot")
    model = AGENTS[kind]["model"]
    calls = sorted(await finished(sdk, f"chat {model}", 2), key=lambda span: span.start_time or 0)
    (tool,) = await finished(sdk, "execute_tool get_weather")
    assert len(calls) == 2
    for call in (*calls, tool):
        assert call.parent is not None and call.parent.span_id == turn.context.span_id
    prompt, output = USAGE[kind]
    for call in calls:
        attributes = dict(call.attributes or {})
        assert call.kind is trace.SpanKind.CLIENT
        assert attributes["gen_ai.operation.name"] == "chat"
        assert attributes["gen_ai.provider.name"] == PROVIDER[kind]
        assert attributes["gen_ai.request.model"] == model
        assert attributes["gen_ai.response.model"] == RESPONSE_MODEL[kind]
        assert (attributes["gen_ai.usage.input_tokens"], attributes["gen_ai.usage.output_tokens"]) == (prompt, output)
    # The model asked for the tool in the first call, answered in the second.
    assert calls[0].end_time is not None and tool.start_time is not None and calls[0].end_time <= tool.start_time
    assert tool.end_time is not None and calls[1].start_time is not None and tool.end_time <= calls[1].start_time
    first_reasons = dict(calls[0].attributes or {}).get("gen_ai.response.finish_reasons")
    if FINISH[kind][0] is not None:
        assert first_reasons is not None and FINISH[kind][0] in first_reasons
    turn_attributes = dict(turn.attributes or {})
    assert turn_attributes["gen_ai.provider.name"] == PROVIDER[kind]
    assert turn_attributes["gen_ai.request.model"] == model
    # The turn's usage is the sum over both calls.
    assert (turn_attributes["gen_ai.usage.input_tokens"], turn_attributes["gen_ai.usage.output_tokens"]) == (
        2 * prompt,
        2 * output,
    )


async def test_a_failing_provider_call_records_its_error_type(
    start_server: StartServer, connect: Connect, sdk: Sdk, fake: tuple[str, FakeOpenAI | FakeGemini]
) -> None:
    kind, provider = fake
    provider.error = (400, "bad request") if kind == "gemini" else (400, {"error": {"message": "bad request"}})
    agent = {**AGENTS[kind], "base_url": provider.base_url, "api_key": KEY}
    server = await start_server({"agents": {"bot": agent}, "connectors": [{"secrets": ["s"]}]})
    client = await connect(server.url(), secret="s")
    frames = await client.reply({"id": "m1", "message": "hi"})
    assert frames[-1]["type"] == "error"
    (call,) = await finished(sdk, f"chat {AGENTS[kind]['model']}")
    assert dict(call.attributes or {}).get("error.type") == "connic.errors.AgentError"
    assert call.status.status_code is trace.StatusCode.ERROR
