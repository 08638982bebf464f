"""OpenTelemetry traces and metrics through a real server and real WebSocket clients.

The SDK's in-memory span exporter and metric reader are set as the process's
global providers once (OpenTelemetry allows that once per process); each test
reads only its own spans (the exporter is cleared first) and its own metric
points (by agent or connector name).
"""

from __future__ import annotations

import asyncio
import gc
import io
import json
import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest

pytest.importorskip("opentelemetry.sdk", reason="the OpenTelemetry SDK is not installed (test extra)")

import websockets
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import StatusCode
from otel_helpers import Sdk, finished, sdk_fixture  # noqa: F401  (a fixture)

import connic
from conftest import SECRET, Connect, StartServer, make_config
from connic import telemetry
from connic.logs import JsonFormatter
from connic.session import ChatSession
from helpers import test_registry

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"
OTHER_TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
OTHER_PARENT_ID = "b7ad6b7169203331"
OTHER_TRACEPARENT = f"00-{OTHER_TRACE_ID}-{OTHER_PARENT_ID}-01"
TEXT = "the quick brown zebra"


def points(sdk: Sdk, name: str, **attributes: Any) -> list[Any]:
    """The data points of metric ``name`` whose attributes include ``attributes``."""
    data = sdk.reader.get_metrics_data()
    found = []
    for resource in data.resource_metrics if data is not None else ():
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                if metric.name == name:
                    for point in metric.data.data_points:
                        if all(point.attributes.get(k) == v for k, v in attributes.items()):
                            found.append(point)
    return found


def all_attribute_text(spans: Sequence[ReadableSpan]) -> str:
    return json.dumps([dict(s.attributes or {}) for s in spans] + [[e.name for e in s.events] for s in spans])


class Tools(connic.Agent):
    """Calls a tool whose result comes later, and one that fails, then answers."""

    async def respond(self, turn: connic.Turn) -> AsyncIterator[Any]:
        yield connic.ToolCall("c1", "lookup", {"query": turn.message})
        yield connic.Progress("thinking")
        yield connic.ToolResult("c1", "lookup", {"found": turn.message})
        yield connic.ToolCall("c2", "broken", {})
        yield connic.ToolResult("c2", "broken", "no such thing", is_error=True)
        yield "done"


class Provider(connic.Agent):
    """An agent calling a (pretend) provider inside ``telemetry.provider_call``; it logs from inside it too."""

    async def respond(self, turn: connic.Turn) -> AsyncIterator[Any]:
        with telemetry.provider_call("openai", "gpt-test") as call:
            await asyncio.sleep(0)
            logging.getLogger("test.provider").info("calling the provider")
            call.record(response_model="gpt-test-2026", input_tokens=7, output_tokens=3, finish_reasons=["stop"])
            yield "answer"
        yield connic.Usage(7, 3)


def registry() -> Any:
    reg = test_registry()
    reg.register("agents", "tools", Tools)
    reg.register("agents", "provider", Provider)
    return reg


async def start(
    start_server: StartServer, agent: dict[str, Any], connector: dict[str, Any] | None = None, **server: Any
) -> Any:
    config = make_config(connector, agents={"bot": agent})
    config["server"] = {"playground": False, **server}
    return await start_server(config, registry=registry())


async def test_a_streamed_turn_is_one_invoke_agent_span(start_server: StartServer, connect: Connect, sdk: Sdk) -> None:
    srv = await start(start_server, {"use": "echo"}, {"path": "/streamed"})
    client = await connect(srv.url("/streamed"), keep_seq=True)
    frames = await client.reply({"type": "message", "id": "m-1", "payload": {"message": TEXT}})
    (span,) = await finished(sdk, "invoke_agent bot")
    attributes = dict(span.attributes or {})
    assert attributes == {
        "gen_ai.operation.name": "invoke_agent",
        "gen_ai.agent.name": "bot",
        "gen_ai.conversation.id": client.connected["session_id"],  # type: ignore[attr-defined]
        "connic.connector": "/streamed",
        "connic.message.id": "m-1",
        "connic.message.number": 1,
        "connic.seq.first": frames[1]["seq"],  # frames[0] is the ack
        "connic.seq.last": frames[-1]["seq"],
        "gen_ai.usage.input_tokens": 4,
        "gen_ai.usage.output_tokens": 4,
        "gen_ai.response.finish_reasons": ("stop",),
    }
    assert [f["type"] for f in frames[:2]] == ["ack", "stream_start"]
    assert span.status.status_code is StatusCode.UNSET
    assert span.parent is None  # no trace context from the client: a trace of its own
    assert "zebra" not in all_attribute_text([span])  # message text only with telemetry_capture_content
    (duration,) = points(sdk, "gen_ai.client.operation.duration", **{"connic.connector": "/streamed"})
    assert duration.count == 1 and duration.attributes["gen_ai.operation.name"] == "invoke_agent"
    assert "error.type" not in duration.attributes
    (first,) = points(sdk, "connic.time_to_first_chunk", **{"connic.connector": "/streamed"})
    assert first.count == 1 and first.sum <= duration.sum
    tokens = points(sdk, "gen_ai.client.token.usage", **{"connic.connector": "/streamed"})
    assert sorted((p.attributes["gen_ai.token.type"], p.sum) for p in tokens) == [("input", 4), ("output", 4)]


async def test_a_cancelled_turn_has_error_type_cancelled(start_server: StartServer, connect: Connect, sdk: Sdk) -> None:
    srv = await start(start_server, {"use": "slow"}, {"path": "/cancelled"})
    client = await connect(srv.url("/cancelled"))
    await client.send({"type": "message", "id": "m-1", "payload": {"message": TEXT}})
    await client.until("stream_chunk")
    await client.send({"type": "cancel", "id": "m-1"})
    (end,) = [f for f in await client.until("stream_end")]
    assert end["finish_reason"] == "cancelled"
    (span,) = await finished(sdk, "invoke_agent bot")
    assert span.attributes is not None
    assert span.attributes["error.type"] == "cancelled"
    assert span.attributes["gen_ai.response.finish_reasons"] == ("cancelled",)
    assert span.status.status_code is StatusCode.ERROR
    (duration,) = points(sdk, "gen_ai.client.operation.duration", **{"connic.connector": "/cancelled"})
    assert duration.attributes["error.type"] == "cancelled"


@pytest.mark.parametrize(
    ("agent", "connector", "code"),
    [
        ({"use": "fail"}, {}, "agent_error"),
        ({"use": "slow"}, {"agent_timeout": 0.2}, "agent_timeout"),
    ],
)
async def test_a_failed_turn_has_the_error_code_as_error_type(
    start_server: StartServer, connect: Connect, sdk: Sdk, agent: dict[str, Any], connector: dict[str, Any], code: str
) -> None:
    srv = await start(start_server, agent, {"path": "/failing", **connector})
    client = await connect(srv.url("/failing"))
    frames = await client.reply({"type": "message", "id": "m-1", "payload": {"message": TEXT}})
    assert frames[-1]["type"] == "error" and frames[-1]["code"] == code
    (span,) = await finished(sdk, "invoke_agent bot")
    assert span.attributes is not None and span.attributes["error.type"] == code
    assert span.status.status_code is StatusCode.ERROR
    assert "gen_ai.response.finish_reasons" not in span.attributes


@pytest.mark.parametrize("progress_events", [False, True])
async def test_tool_calls_are_execute_tool_spans_under_the_turn(
    start_server: StartServer, connect: Connect, sdk: Sdk, progress_events: bool
) -> None:
    srv = await start(start_server, {"use": "tools"}, {"progress_events": progress_events})
    client = await connect(srv.url())
    frames = await client.reply({"type": "message", "id": "m-1", "payload": {"message": TEXT}})
    assert ("tool_call" in [f["type"] for f in frames]) is progress_events  # spans either way
    (turn,) = await finished(sdk, "invoke_agent bot")
    (lookup,) = await finished(sdk, "execute_tool lookup")
    (broken,) = await finished(sdk, "execute_tool broken")
    for tool, name, call_id in ((lookup, "lookup", "c1"), (broken, "broken", "c2")):
        assert tool.parent is not None and tool.parent.span_id == turn.context.span_id
        assert tool.context.trace_id == turn.context.trace_id
        assert tool.attributes is not None
        assert tool.attributes["gen_ai.operation.name"] == "execute_tool"
        assert tool.attributes["gen_ai.tool.name"] == name
        assert tool.attributes["gen_ai.tool.call.id"] == call_id
    assert lookup.status.status_code is StatusCode.UNSET
    assert broken.status.status_code is StatusCode.ERROR and broken.attributes["error.type"] == "tool_error"
    assert [e.name for e in turn.events] == ["connic.progress"]
    assert "zebra" not in all_attribute_text([turn, lookup, broken])


async def test_the_demo_tools_echo_agent_makes_a_tool_span(
    start_server: StartServer, connect: Connect, sdk: Sdk
) -> None:
    srv = await start(start_server, {"use": "echo", "demo_tools": True})
    client = await connect(srv.url())
    await client.reply({"type": "message", "id": 5, "payload": {"message": TEXT}})
    (tool,) = await finished(sdk, "execute_tool word_count")
    assert tool.attributes is not None and tool.attributes["gen_ai.tool.call.id"] == "call-1"


async def test_a_provider_call_is_a_child_span_and_names_the_provider_on_the_turn(
    start_server: StartServer, connect: Connect, sdk: Sdk
) -> None:
    srv = await start(start_server, {"use": "provider"}, {"path": "/provider"})
    client = await connect(srv.url("/provider"))
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("test.provider")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        await client.reply({"type": "message", "id": "m-1", "payload": {"message": TEXT}})
        (turn,) = await finished(sdk, "invoke_agent bot")
    finally:
        logger.removeHandler(handler)
    (call,) = await finished(sdk, "chat gpt-test")
    assert call.kind is trace.SpanKind.CLIENT
    assert call.parent is not None and call.parent.span_id == turn.context.span_id
    assert dict(call.attributes or {}) == {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "openai",
        "gen_ai.request.model": "gpt-test",
        "gen_ai.response.model": "gpt-test-2026",
        "gen_ai.usage.input_tokens": 7,
        "gen_ai.usage.output_tokens": 3,
        "gen_ai.response.finish_reasons": ("stop",),
    }
    assert turn.attributes is not None
    assert turn.attributes["gen_ai.provider.name"] == "openai"
    assert turn.attributes["gen_ai.request.model"] == "gpt-test"
    assert turn.attributes["gen_ai.response.model"] == "gpt-test-2026"
    # The agent's own log line carries the turn's ids and the provider span's.
    (line,) = [json.loads(text) for text in stream.getvalue().splitlines()]
    assert line["message"] == "calling the provider"
    assert line["session_id"] == client.connected["session_id"]  # type: ignore[attr-defined]
    assert (line["message_id"], line["connector"], line["agent"]) == ("m-1", "/provider", "bot")
    assert line["trace_id"] == format(call.context.trace_id, "032x")
    assert line["span_id"] == format(call.context.span_id, "016x")
    # Its own points only: the process's meter also holds other modules' provider calls.
    chat = points(
        sdk, "gen_ai.client.operation.duration", **{"gen_ai.operation.name": "chat", "gen_ai.request.model": "gpt-test"}
    )
    assert chat and all(p.attributes["gen_ai.provider.name"] == "openai" for p in chat)


def test_provider_call_records_the_exception_type_and_works_outside_a_turn(sdk: Sdk) -> None:
    with pytest.raises(TimeoutError), telemetry.provider_call("gcp.gemini", None) as call:
        call.record(input_tokens=1)
        raise TimeoutError
    (span,) = [s for s in sdk.spans.get_finished_spans() if s.name == "chat"]
    assert span.attributes is not None
    assert span.attributes["error.type"] == "TimeoutError"
    assert span.attributes["gen_ai.usage.input_tokens"] == 1
    assert "gen_ai.request.model" not in span.attributes
    assert span.status.status_code is StatusCode.ERROR


def test_provider_call_records_nothing_with_telemetry_off(sdk: Sdk) -> None:
    telemetry.configure(connic.config.ServerConfig(telemetry="off"), connic.metrics.Metrics())
    try:
        with telemetry.provider_call("openai", "gpt-test") as call:
            call.record(input_tokens=1)
        assert type(call) is telemetry.ProviderCall and not telemetry.enabled()
        assert sdk.spans.get_finished_spans() == ()
    finally:
        telemetry.configure(connic.config.ServerConfig(), connic.metrics.Metrics())
    assert telemetry.enabled()


async def test_telemetry_off_makes_no_span(start_server: StartServer, connect: Connect, sdk: Sdk) -> None:
    srv = await start(start_server, {"use": "echo"}, telemetry="off")
    try:
        client = await connect(srv.url())
        await client.reply({"type": "message", "id": "m-1", "payload": {"message": TEXT}})
        assert not telemetry.enabled()
        assert sdk.spans.get_finished_spans() == ()
    finally:
        telemetry.configure(connic.config.ServerConfig(), connic.metrics.Metrics())


async def test_the_handshake_traceparent_parents_the_turns(
    start_server: StartServer, connect: Connect, sdk: Sdk
) -> None:
    srv = await start(start_server, {"use": "echo"})
    client = await connect(srv.url(), additional_headers={"traceparent": TRACEPARENT, "tracestate": "vendor=x"})
    await client.reply({"type": "message", "id": "m-1", "payload": {"message": TEXT}})
    await client.reply({"type": "message", "id": "m-2", "payload": {"message": TEXT}})
    spans = await finished(sdk, "invoke_agent bot", 2)
    for span in spans:
        assert format(span.context.trace_id, "032x") == TRACE_ID
        assert span.parent is not None and format(span.parent.span_id, "016x") == PARENT_ID
        assert span.parent.is_remote and span.context.trace_state.get("vendor") == "x"


async def test_a_message_traceparent_parents_its_turn_before_the_handshake_one(
    start_server: StartServer, connect: Connect, sdk: Sdk
) -> None:
    srv = await start(start_server, {"use": "echo"})
    client = await connect(srv.url(), additional_headers={"traceparent": TRACEPARENT})
    context = {"traceparent": OTHER_TRACEPARENT}
    await client.reply({"type": "message", "id": "m-1", "payload": {"message": TEXT, "context": context}})
    malformed = {"traceparent": "00-not-a-trace-01"}  # ignored, as W3C says: the handshake's applies
    await client.reply({"type": "message", "id": "m-2", "payload": {"message": TEXT, "context": malformed}})
    first, second = sorted(await finished(sdk, "invoke_agent bot", 2), key=lambda s: s.start_time or 0)
    assert format(first.context.trace_id, "032x") == OTHER_TRACE_ID
    assert first.parent is not None and format(first.parent.span_id, "016x") == OTHER_PARENT_ID
    assert format(second.context.trace_id, "032x") == TRACE_ID


async def test_a_message_traceparent_without_a_handshake_one(
    start_server: StartServer, connect: Connect, sdk: Sdk
) -> None:
    srv = await start(start_server, {"use": "echo"})
    client = await connect(srv.url())
    context = {"traceparent": OTHER_TRACEPARENT, "tracestate": 7}  # a tracestate that is no string is left out
    await client.reply({"type": "message", "id": "m-1", "payload": {"message": TEXT, "context": context}})
    (span,) = await finished(sdk, "invoke_agent bot")
    assert format(span.context.trace_id, "032x") == OTHER_TRACE_ID


async def test_message_text_is_recorded_only_when_the_setting_says_so(
    start_server: StartServer, connect: Connect, sdk: Sdk
) -> None:
    srv = await start(start_server, {"use": "tools"}, telemetry_capture_content=True)
    try:
        client = await connect(srv.url())
        await client.reply({"type": "message", "id": "m-1", "payload": {"message": TEXT}})
        (turn,) = await finished(sdk, "invoke_agent bot")
        (tool,) = await finished(sdk, "execute_tool lookup")
    finally:
        telemetry.configure(connic.config.ServerConfig(), connic.metrics.Metrics())
    assert turn.attributes is not None and tool.attributes is not None
    assert json.loads(str(turn.attributes["gen_ai.input.messages"])) == [
        {"role": "user", "parts": [{"type": "text", "content": TEXT}]}
    ]
    assert json.loads(str(turn.attributes["gen_ai.output.messages"])) == [
        {"role": "assistant", "parts": [{"type": "text", "content": "done"}], "finish_reason": "stop"}
    ]
    assert json.loads(str(tool.attributes["gen_ai.tool.call.arguments"])) == {"query": TEXT}
    assert json.loads(str(tool.attributes["gen_ai.tool.call.result"])) == {"found": TEXT}


async def test_several_agents_each_have_a_span(start_server: StartServer, connect: Connect, sdk: Sdk) -> None:
    config = make_config(agents={"one": {"use": "echo"}, "two": {"use": "tools"}})
    srv = await start_server(config, registry=registry())
    client = await connect(srv.url())
    await client.send({"type": "message", "id": "m-1", "payload": {"message": TEXT}})
    ends = 0
    while ends < 2:
        ends += (await client.recv())["type"] == "stream_end"
    (one,) = await finished(sdk, "invoke_agent one")
    (two,) = await finished(sdk, "invoke_agent two")
    (tool,) = await finished(sdk, "execute_tool lookup")
    assert tool.parent is not None and tool.parent.span_id == two.context.span_id
    assert one.context.trace_id != two.context.trace_id  # no client context: each turn a trace of its own


async def test_sessions_and_resumes_are_observed(start_server: StartServer, connect: Connect, sdk: Sdk) -> None:
    srv = await start(start_server, {"use": "echo"}, {"path": "/observed"})
    client = await connect(srv.url("/observed"))
    (active,) = points(sdk, "connic.sessions.active", **{"connic.connector": "/observed"})
    assert active.value == 1
    resume = {"type": "resume", "session_id": "nope", "resume_token": "nope", "last_seq": 0, "secret": SECRET}
    async with websockets.connect(srv.url("/observed")) as ws:
        await ws.send(json.dumps(resume))
        assert json.loads(await ws.recv())["resumed"] is False
        (failed,) = points(sdk, "connic.resumes", **{"connic.connector": "/observed", "connic.resume.result": "failed"})
        assert failed.value == 1
    await client.ws.close()


async def test_a_session_that_ended_is_freed_at_once_with_telemetry_on(
    start_server: StartServer, connect: Connect, sdk: Sdk
) -> None:
    """The agent_timeout timer a chain's turns share must not keep the turn that armed it.

    A timer keeps the context it was scheduled in; a turn's context holds its trace, and
    through it the message, the session and the whole history. Armed by the first turn, then
    again from its own callback, the timer kept that session for agent_timeout (300 s) after
    it ended, and for as long as turns kept running.
    """
    srv = await start(start_server, {"use": "echo"}, {"path": "/freed"})
    client = await connect(srv.url("/freed"))
    await client.reply({"message": TEXT})
    session_id = client.connected["session_id"]  # type: ignore[attr-defined]

    def alive() -> list[ChatSession]:
        return [o for o in gc.get_objects() if type(o) is ChatSession and o.id == session_id]

    gc.collect()
    gc.disable()  # freed by refcounting alone, as it ends
    try:
        await client.ws.close()  # 1000: the session ends for good
        for _ in range(200):
            if not alive():
                break
            await asyncio.sleep(0.01)
        kept = alive()
        assert not kept, [type(r).__name__ for r in gc.get_referrers(*kept)]
    finally:
        gc.enable()
