"""The gemini agent with both real Google SDKs, over a real WebSocket, against a local fake of the API."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import pytest

import connic
from conftest import ROOT, Connect, Server, StartServer
from fake_provider import FakeGemini

KEY = "AIza-test-very-secret-key"
SDKS = ["google-genai", "google-generativeai"]

pytestmark = [
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]


@pytest.fixture
async def fake() -> AsyncIterator[FakeGemini]:
    provider = FakeGemini()
    await provider.start()
    yield provider
    for held in (provider.hold_first, provider.hold_last):
        if held is not None:
            held.set()
    await provider.close()


async def start(
    start_server: StartServer, fake: FakeGemini, sdk: str, streaming: bool = True, **options: Any
) -> Server:
    agent = {"use": "gemini", "sdk": sdk, "base_url": fake.base_url, "api_key": KEY, **options}
    config = {"agents": {"gem": agent}, "connectors": [{"secrets": ["s"], "streaming": streaming}]}
    return await start_server(config)


def texts(content: dict[str, Any]) -> str:
    return "".join(part.get("text", "") for part in content["parts"])


@pytest.mark.parametrize("sdk", SDKS)
async def test_streams_usage_and_memory(
    start_server: StartServer, connect: Connect, fake: FakeGemini, sdk: str
) -> None:
    server = await start(start_server, fake, sdk, model="gemini/gemini-2.5-flash", temperature=0.5)
    client = await connect(server.url(), secret="s")
    frames = await client.reply({"message": "Hi"})
    assert [f["chunk"] for f in frames if f["type"] == "stream_chunk"] == ["Hello", " from", " Gemini."]
    assert frames[-1]["full_response"] == "Hello from Gemini."
    assert frames[-1]["token_usage"] == {"prompt_tokens": 9, "candidates_tokens": 4}
    assert "models/gemini-2.5-flash:streamGenerateContent" in fake.paths[0]
    assert ("alt=sse" in fake.paths[0]) == (sdk == "google-genai")
    assert fake.requests[0]["generationConfig"]["temperature"] == 0.5
    assert fake.headers[0].get("x-goog-api-key") == KEY
    await client.reply({"message": "Again"})
    contents = fake.requests[1]["contents"]
    assert [(c["role"], texts(c)) for c in contents] == [
        ("user", "Hi"),
        ("model", "Hello from Gemini."),
        ("user", "Again"),
    ]


@pytest.mark.parametrize("sdk", SDKS)
async def test_system_prompt_from_context(
    start_server: StartServer, connect: Connect, fake: FakeGemini, sdk: str
) -> None:
    server = await start(start_server, fake, sdk, system_prompt="Answer about {{ context.city }} as {{ agent }}.")
    client = await connect(server.url(), secret="s")
    await client.reply({"type": "message", "payload": {"message": "weather?", "context": {"city": "Lima"}}})
    assert texts(fake.requests[0]["systemInstruction"]) == "Answer about Lima as gem."


@pytest.mark.parametrize("sdk", SDKS)
async def test_streaming_is_real(start_server: StartServer, connect: Connect, fake: FakeGemini, sdk: str) -> None:
    fake.hold_last = asyncio.Event()
    server = await start(start_server, fake, sdk)
    client = await connect(server.url(), secret="s")
    await client.send({"message": "go"})
    frames = await client.until("stream_chunk")
    assert frames[-1]["chunk"] == "Hello"  # while the fake holds back its last chunk
    fake.hold_last.set()
    assert (await client.until("stream_end"))[-1]["full_response"] == "Hello from Gemini."


@pytest.mark.parametrize("sdk", SDKS)
async def test_provider_error_then_recovery(
    start_server: StartServer, connect: Connect, fake: FakeGemini, sdk: str
) -> None:
    server = await start(start_server, fake, sdk, streaming=False)
    client = await connect(server.url(), secret="s")
    fake.error = (429, "Resource has been exhausted (e.g. check quota).")
    frames = await client.reply({"message": "fail"})
    error = frames[-1]
    assert error["type"] == "error" and error["code"] == "agent_error" and error["agent"] == "gem"
    assert "429" in error["message"] and "Resource has been exhausted" in error["message"]
    assert KEY not in error["message"]
    fake.error = None
    frames = await client.reply({"message": "works"})
    assert frames[-1]["type"] == "response" and frames[-1]["response"] == "Hello from Gemini."


@pytest.mark.parametrize("sdk", SDKS)
async def test_cancel_closes_the_provider_stream(
    start_server: StartServer, connect: Connect, fake: FakeGemini, sdk: str
) -> None:
    fake.hold_last = asyncio.Event()
    server = await start(start_server, fake, sdk)
    client = await connect(server.url(), secret="s")
    await client.send({"id": "c", "message": "long"})
    await client.until("stream_chunk")
    await client.send({"type": "cancel", "id": "c"})
    end = (await client.until("stream_end"))[-1]
    assert end["finish_reason"] == "cancelled"
    assert end["full_response"].startswith("Hello")
    await asyncio.wait_for(fake.disconnected.wait(), 5)


@pytest.mark.parametrize("sdk", SDKS)
async def test_files_become_inline_data(
    start_server: StartServer, connect: Connect, fake: FakeGemini, sdk: str
) -> None:
    server = await start(start_server, fake, sdk)
    client = await connect(server.url(), secret="s")
    files = [{"name": "a.txt", "mime_type": "text/plain", "data": "aGVsbG8="}]
    await client.reply({"type": "message", "payload": {"message": "read this", "files": files}})
    parts = fake.requests[0]["contents"][-1]["parts"]
    inline = [p.get("inlineData") or p.get("inline_data") for p in parts if "inlineData" in p or "inline_data" in p]
    assert inline and inline[0]["mimeType" if "mimeType" in inline[0] else "mime_type"] == "text/plain"
    assert inline[0]["data"] == "aGVsbG8="


@pytest.mark.parametrize("sdk", SDKS)
@pytest.mark.parametrize("case", ["blocked", "empty"])
async def test_blocked_or_empty_answer_is_agent_error(
    start_server: StartServer, connect: Connect, fake: FakeGemini, sdk: str, case: str
) -> None:
    server = await start(start_server, fake, sdk)
    client = await connect(server.url(), secret="s")
    if case == "blocked":
        fake.blocked = True
    else:
        fake.chunks = []
    frames = await client.reply({"message": "something"})
    assert frames[-1]["type"] == "error" and frames[-1]["code"] == "agent_error"
    assert ("blocked" if case == "blocked" else "no candidates") in frames[-1]["message"].lower()
    fake.blocked = False
    fake.chunks = ["ok"]
    frames = await client.reply({"message": "again"})
    assert frames[-1]["full_response"] == "ok"


def test_missing_key_is_a_one_line_start_up_error() -> None:
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("GEMINI_API_KEY", "GOOGLE_API_KEY")}
    done = subprocess.run(
        [sys.executable, "-m", "connic", "run", "--agent", "gemini", "--port", "0"],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
        cwd=ROOT,
    )
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "GEMINI_API_KEY" in lines[0] and "GOOGLE_API_KEY" in lines[0]


def test_bad_sdk_option() -> None:
    with pytest.raises(connic.ConfigError, match=r"agents\.gem: sdk must be one of"):
        connic.create_app(
            {"agents": {"gem": {"use": "gemini", "sdk": "vertex", "api_key": "k"}}, "connectors": [{"secrets": ["s"]}]}
        )


@pytest.mark.parametrize("sdk", SDKS)
async def test_api_key_is_masked_in_errors(
    start_server: StartServer, connect: Connect, fake: FakeGemini, sdk: str
) -> None:
    server = await start(start_server, fake, sdk)
    client = await connect(server.url(), secret="s")
    fake.error = (400, f"API key not valid: {KEY} was rejected")
    frames = await client.reply({"message": "hi"})
    error = frames[-1]
    assert error["type"] == "error" and error["code"] == "agent_error"
    assert KEY not in error["message"]
    assert "400" in error["message"] and "API key not valid: *** was rejected" in error["message"]


@pytest.mark.parametrize("sdk", SDKS)
async def test_silent_provider_times_out(
    start_server: StartServer, connect: Connect, fake: FakeGemini, sdk: str
) -> None:
    # The fake accepts the connection and the request, and never answers.
    fake.hold_first = asyncio.Event()
    server = await start(start_server, fake, sdk, timeout=1)
    client = await connect(server.url(), secret="s")
    frames = await client.reply({"message": "anyone?"}, timeout=10)
    error = frames[-1]
    assert error["type"] == "error" and error["code"] == "agent_error"
    assert "timed out after 1 s" in error["message"], error["message"]
    assert "could not reach" not in error["message"]


@pytest.mark.parametrize("sdk", SDKS)
async def test_stalled_stream_times_out(
    start_server: StartServer, connect: Connect, fake: FakeGemini, sdk: str
) -> None:
    fake.hold_last = asyncio.Event()  # the first chunk, then silence
    server = await start(start_server, fake, sdk, timeout=1)
    client = await connect(server.url(), secret="s")
    frames = await client.reply({"message": "go on"}, timeout=10)
    assert [f["chunk"] for f in frames if f["type"] == "stream_chunk"] == ["Hello", " from"]
    assert frames[-1]["code"] == "agent_error" and "timed out after 1 s" in frames[-1]["message"]


@pytest.mark.parametrize("sdk", SDKS)
async def test_refused_connection_is_could_not_reach(start_server: StartServer, connect: Connect, sdk: str) -> None:
    agent = {"use": "gemini", "sdk": sdk, "base_url": "http://127.0.0.1:9", "api_key": KEY, "timeout": 5}
    server = await start_server({"agents": {"gem": agent}, "connectors": [{"secrets": ["s"]}]})
    client = await connect(server.url(), secret="s")
    frames = await client.reply({"message": "anyone?"}, timeout=10)
    assert frames[-1]["code"] == "agent_error" and "could not reach the Gemini API" in frames[-1]["message"]
    assert KEY not in frames[-1]["message"]
