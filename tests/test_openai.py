"""The openai agent over a real WebSocket, against a local fake of the Chat Completions API."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import pytest

import connic
from conftest import ROOT, Connect, Server, StartServer
from fake_provider import FakeOpenAI

KEY = "sk-test-very-secret-key"


@pytest.fixture
async def fake() -> AsyncIterator[FakeOpenAI]:
    provider = FakeOpenAI()
    await provider.start()
    yield provider
    if provider.hold_last is not None:
        provider.hold_last.set()
    await provider.close()


async def start(start_server: StartServer, fake: FakeOpenAI, streaming: bool = True, **options: Any) -> Server:
    agent = {"use": "openai", "base_url": fake.base_url, "api_key": KEY, "model": "test-model", **options}
    config = {"agents": {"gpt": agent}, "connectors": [{"secrets": ["s"], "streaming": streaming}]}
    return await start_server(config)


async def test_streams_with_usage_and_remembers(start_server: StartServer, connect: Connect, fake: FakeOpenAI) -> None:
    server = await start(start_server, fake, temperature=0.2, max_tokens=50)
    client = await connect(server.url(), secret="s")
    frames = await client.reply({"message": "Hi there"})
    chunks = [f["chunk"] for f in frames if f["type"] == "stream_chunk"]
    assert chunks == ["Hello", " from", " the fake."]
    assert frames[-1]["full_response"] == "Hello from the fake."
    assert frames[-1]["token_usage"] == {"prompt_tokens": 11, "candidates_tokens": 3}
    first = fake.requests[0]
    assert first["model"] == "test-model" and first["stream"] is True
    assert first["stream_options"] == {"include_usage": True}
    assert first["temperature"] == 0.2 and first["max_tokens"] == 50
    assert first["messages"] == [{"role": "user", "content": "Hi there"}]
    assert fake.headers[0]["Authorization"] == f"Bearer {KEY}"
    await client.reply({"message": "And again?"})
    assert fake.requests[1]["messages"] == [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello from the fake."},
        {"role": "user", "content": "And again?"},
    ]


async def test_system_prompt_rendered_from_context(
    start_server: StartServer, connect: Connect, fake: FakeOpenAI
) -> None:
    prompt = "You are {{ agent }}, helping someone in {{ context.location }} (session {{ session.id }})."
    server = await start(start_server, fake, system_prompt=prompt)
    client = await connect(server.url(), secret="s")
    await client.reply({"type": "message", "payload": {"message": "weather?", "context": {"location": "Oslo"}}})
    system = fake.requests[0]["messages"][0]
    session_id = client.connected["session_id"]
    assert system == {"role": "system", "content": f"You are gpt, helping someone in Oslo (session {session_id})."}
    frames = await client.reply({"message": "no context this time"})
    assert frames[-1]["type"] == "error" and frames[-1]["code"] == "agent_error"
    assert "system_prompt" in frames[-1]["message"] and "location" in frames[-1]["message"]


async def test_streaming_is_real(start_server: StartServer, connect: Connect, fake: FakeOpenAI) -> None:
    fake.hold_last = asyncio.Event()
    server = await start(start_server, fake)
    client = await connect(server.url(), secret="s")
    await client.send({"message": "go"})
    frames = await client.until("stream_chunk")
    assert frames[-1]["chunk"] == "Hello"  # while the fake still holds back its last chunk
    fake.hold_last.set()
    end = (await client.until("stream_end"))[-1]
    assert end["full_response"] == "Hello from the fake."


@pytest.mark.parametrize(
    ("status", "body", "needle"),
    [
        (429, {"error": {"message": "Rate limit reached for requests"}}, "HTTP 429: Rate limit reached"),
        (500, {"error": {"message": "The server had an error"}}, "HTTP 500: The server had an error"),
        (401, {"error": {"message": "Incorrect API key provided"}}, "HTTP 401: Incorrect API key provided"),
    ],
)
async def test_provider_error_is_agent_error_and_session_goes_on(
    start_server: StartServer, connect: Connect, fake: FakeOpenAI, status: int, body: dict[str, Any], needle: str
) -> None:
    server = await start(start_server, fake, streaming=False)
    client = await connect(server.url(), secret="s")
    fake.error = (status, body)
    frames = await client.reply({"id": "e", "message": "fail please"})
    error = frames[-1]
    assert error["type"] == "error" and error["code"] == "agent_error" and error["agent"] == "gpt"
    assert needle in error["message"]
    assert KEY not in error["message"]
    fake.error = None
    frames = await client.reply({"message": "works now"})
    assert frames[-1]["type"] == "response" and frames[-1]["response"] == "Hello from the fake."
    # The failed exchange is not in the history the provider sees next.
    assert fake.requests[-1]["messages"] == [
        {"role": "user", "content": "fail please"},
        {"role": "user", "content": "works now"},
    ]


async def test_unreachable_provider(start_server: StartServer, connect: Connect, fake: FakeOpenAI) -> None:
    config = {
        "agents": {"gpt": {"use": "openai", "base_url": "http://127.0.0.1:9/v1", "api_key": KEY, "timeout": 5}},
        "connectors": [{"secrets": ["s"]}],
    }
    server = await start_server(config)
    client = await connect(server.url(), secret="s")
    frames = await client.reply({"message": "anyone?"})
    assert frames[-1]["code"] == "agent_error" and "could not reach the provider" in frames[-1]["message"]
    assert KEY not in frames[-1]["message"]


async def test_cancel_closes_the_provider_stream(start_server: StartServer, connect: Connect, fake: FakeOpenAI) -> None:
    fake.hold_last = asyncio.Event()
    server = await start(start_server, fake)
    client = await connect(server.url(), secret="s")
    await client.send({"id": "c", "message": "long answer"})
    await client.until("stream_chunk")
    await client.send({"type": "cancel", "id": "c"})
    end = (await client.until("stream_end"))[-1]
    assert end["finish_reason"] == "cancelled"
    assert end["full_response"] == "Hello from the fake."[: len(end["full_response"])]
    await asyncio.wait_for(fake.disconnected.wait(), 5)


async def test_other_agents_answers_are_named_user_turns(
    start_server: StartServer, connect: Connect, fake: FakeOpenAI
) -> None:
    agents = {"gpt": {"use": "openai", "base_url": fake.base_url, "api_key": KEY}, "echo": {"use": "echo"}}
    server = await start_server({"agents": agents, "connectors": [{"secrets": ["s"]}]})
    client = await connect(server.url(), secret="s")
    await client.send({"message": "one"})
    ends = 0
    while ends < 2:
        ends += (await client.recv())["type"] == "stream_end"
    await client.reply({"type": "message", "payload": {"message": "two", "agent": "gpt"}})
    sent = fake.requests[-1]["messages"]
    assert sent[0] == {"role": "user", "content": "one"} and sent[3:] == [{"role": "user", "content": "two"}]
    # A message's replies are in the history in the order they ended (docs/protocol.md, Session).
    replies = [
        {"role": "assistant", "content": "Hello from the fake."},
        {"role": "user", "content": "[echo answered] one"},
    ]
    assert sent[1:3] in (replies, replies[::-1])


def test_bad_options_are_config_errors() -> None:
    base = {"connectors": [{"secrets": ["s"]}]}
    with pytest.raises(connic.ConfigError, match=r"agents\.gpt: system_prompt: "):
        connic.create_app({**base, "agents": {"gpt": {"use": "openai", "system_prompt": "{% if %}"}}})
    with pytest.raises(connic.ConfigError, match=r"agents\.gpt: unknown key 'modle'"):
        connic.create_app({**base, "agents": {"gpt": {"use": "openai", "modle": "x"}}})


def test_echo_only_start_imports_no_llm_sdk() -> None:
    code = (
        "import sys, connic\n"
        "connic.create_app({'agents': {'e': {'use': 'echo'}}, 'connectors': [{'secrets': ['s']}]})\n"
        "sdks = ('google.genai', 'google.generativeai', 'google.ai', 'openai')\n"
        "print(sorted(m for m in sys.modules if m.startswith(sdks)))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize("where", ["json_body", "text_body", "stream_event"])
async def test_api_key_is_masked_in_every_error(
    start_server: StartServer, connect: Connect, fake: FakeOpenAI, where: str
) -> None:
    quoted = f"API key not valid: {KEY} was rejected"
    if where == "json_body":
        fake.error = (400, {"error": {"message": quoted}})
    elif where == "text_body":
        fake.error = (400, quoted)
    else:
        fake.stream_error = {"error": {"message": quoted}}
    server = await start(start_server, fake)
    client = await connect(server.url(), secret="s")
    frames = await client.reply({"message": "hi"})
    error = frames[-1]
    assert error["type"] == "error" and error["code"] == "agent_error"
    assert KEY not in error["message"]
    assert "API key not valid: *** was rejected" in error["message"]


async def test_warns_at_start_up_when_openai_would_get_no_key(
    start_server: StartServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    agents = {"cloud": {"use": "openai"}, "local": {"use": "openai", "base_url": "http://127.0.0.1:11434/v1"}}
    with caplog.at_level("WARNING", logger="connic.agents.openai"):
        await start_server({"agents": agents, "connectors": [{"secrets": ["s"]}]})
    warnings = [r.getMessage() for r in caplog.records if r.name == "connic.agents.openai"]
    assert len(warnings) == 1, warnings  # the local server needs no key: no warning for it
    assert "agent cloud" in warnings[0] and "no API key" in warnings[0] and "OPENAI_API_KEY" in warnings[0]
