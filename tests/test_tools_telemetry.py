"""The gemini agent's provider-call span names the model the request really asks for.

``model = "gemini/gemini-x"`` (Connic's hosted naming) is sent to Gemini as ``gemini-x``;
``gen_ai.request.model`` must say the same, on the ``chat`` span and on the turn's span.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

pytest.importorskip("opentelemetry.sdk", reason="the OpenTelemetry SDK is not installed (test extra)")

from otel_helpers import Sdk, finished, sdk_fixture  # noqa: F401  (a fixture)

from conftest import Connect, StartServer
from fake_provider import FakeGemini


@pytest.fixture
async def fake() -> AsyncIterator[FakeGemini]:
    provider = FakeGemini()
    await provider.start()
    yield provider
    await provider.close()


async def test_gemini_reports_the_model_it_requests_without_the_prefix(
    start_server: StartServer, connect: Connect, sdk: Sdk, fake: FakeGemini
) -> None:
    agent = {"use": "gemini", "sdk": "google-genai", "model": "gemini/gemini-x", "base_url": fake.base_url}
    server = await start_server({"agents": {"bot": {**agent, "api_key": "k"}}, "connectors": [{"secrets": ["s"]}]})
    client = await connect(server.url(), secret="s")
    frames = await client.reply({"message": "hi"})
    assert frames[-1]["type"] == "stream_end"
    assert "/models/gemini-x:streamGenerateContent" in fake.paths[0]  # what the request asked for
    (call,) = await finished(sdk, "chat gemini-x")
    assert dict(call.attributes or {})["gen_ai.request.model"] == "gemini-x"
    (turn,) = await finished(sdk, "invoke_agent bot")
    assert dict(turn.attributes or {})["gen_ai.request.model"] == "gemini-x"
