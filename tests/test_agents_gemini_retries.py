"""The gemini agent when Gemini is overloaded or slow: bounded retries, prompt cancel and shutdown, its threads.

Real SDKs (google-genai and google-generativeai) against the local fake, through a real
WebSocket; the shutdown test runs ``python -m connic run`` in a subprocess.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import websockets

from conftest import Client, CliServer, Connect, Server, StartServer
from fake_provider import FakeGemini

KEY = "AIza-test-very-secret-key"
SDKS = ["google-genai", "google-generativeai"]
OVERLOADED = (503, "The model is overloaded. Please try again later.")

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


async def start(start_server: StartServer, fake: FakeGemini, sdk: str, **options: Any) -> Server:
    agent = {"use": "gemini", "sdk": sdk, "base_url": fake.base_url, "api_key": KEY, **options}
    return await start_server({"agents": {"gem": agent}, "connectors": [{"secrets": ["s"]}]})


async def eventually(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait (bounded) until ``condition()`` holds; fail if it does not."""
    for _ in range(int(timeout / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    assert condition()


# --- 503: retried a bounded number of times, within the timeout -------------------------------


@pytest.mark.parametrize("sdk", SDKS)
async def test_overloaded_ends_with_agent_error_within_the_timeout(
    start_server: StartServer, connect: Connect, fake: FakeGemini, sdk: str
) -> None:
    # google-api-core used to retry this for 600 s, whatever the agent's timeout.
    fake.error = OVERLOADED
    server = await start(start_server, fake, sdk, timeout=2)
    client = await connect(server.url(), secret="s")
    frames = await client.reply({"message": "hi"}, timeout=10)
    error = frames[-1]
    assert error["type"] == "error" and error["code"] == "agent_error", error
    assert "503" in error["message"] and "overloaded" in error["message"]
    assert 1 <= len(fake.requests) <= 3
    fake.error = None
    frames = await client.reply({"message": "again"})
    assert frames[-1]["full_response"] == "Hello from Gemini."


@pytest.mark.parametrize("sdk", SDKS)
async def test_retries_bounds_the_attempts(
    start_server: StartServer, connect: Connect, fake: FakeGemini, sdk: str
) -> None:
    fake.error = OVERLOADED
    server = await start(start_server, fake, sdk, retries=1, timeout=30)
    client = await connect(server.url(), secret="s")
    frames = await client.reply({"message": "hi"}, timeout=10)
    assert frames[-1]["code"] == "agent_error"
    assert "503" in frames[-1]["message"] and "gave up after 2 attempts" in frames[-1]["message"]
    assert len(fake.requests) == 2


@pytest.mark.parametrize("sdk", SDKS)
async def test_retries_zero_reports_the_first_503(
    start_server: StartServer, connect: Connect, fake: FakeGemini, sdk: str
) -> None:
    fake.error = OVERLOADED
    server = await start(start_server, fake, sdk, retries=0)
    client = await connect(server.url(), secret="s")
    frames = await client.reply({"message": "hi"})
    assert frames[-1]["code"] == "agent_error" and "503" in frames[-1]["message"]
    assert "attempts" not in frames[-1]["message"]
    assert len(fake.requests) == 1


@pytest.mark.parametrize("sdk", SDKS)
async def test_a_passing_overload_is_retried(
    start_server: StartServer, connect: Connect, fake: FakeGemini, sdk: str
) -> None:
    fake.error = OVERLOADED
    fake.error_times = 1
    server = await start(start_server, fake, sdk, timeout=10)
    client = await connect(server.url(), secret="s")
    frames = await client.reply({"message": "hi"}, timeout=10)
    assert frames[-1]["type"] == "stream_end" and frames[-1]["full_response"] == "Hello from Gemini."
    assert len(fake.requests) == 2


@pytest.mark.parametrize("status", [400, 429, 500])
async def test_other_errors_are_not_retried(
    start_server: StartServer, connect: Connect, fake: FakeGemini, status: int
) -> None:
    fake.error = (status, "no")
    server = await start(start_server, fake, "google-generativeai")
    client = await connect(server.url(), secret="s")
    frames = await client.reply({"message": "hi"})
    assert frames[-1]["code"] == "agent_error" and str(status) in frames[-1]["message"]
    assert len(fake.requests) == 1


# --- cancel: within a second in every phase ----------------------------------------------------


async def cancelled_end(client: Client) -> dict[str, Any]:
    """Cancel message ``c``; its stream_end must come within a bound well under the old 5 s."""
    await client.send({"type": "cancel", "id": "c"})
    end = (await client.until("stream_end", timeout=2.5))[-1]
    assert end["finish_reason"] == "cancelled"
    return end


@pytest.mark.parametrize("sdk", SDKS)
async def test_cancel_before_the_first_byte(
    start_server: StartServer, connect: Connect, fake: FakeGemini, sdk: str
) -> None:
    fake.hold_first = asyncio.Event()  # the request arrives and nothing comes back
    server = await start(start_server, fake, sdk)
    client = await connect(server.url(), secret="s")
    await client.send({"id": "c", "message": "hi"})
    await eventually(lambda: fake.active == 1)
    end = await cancelled_end(client)
    assert end["full_response"] == ""
    # The provider sees its request end: the connection is closed, not left waiting.
    await asyncio.wait_for(fake.disconnected.wait(), 2.5)
    await eventually(lambda: fake.active == 0, 2.5)
    fake.hold_first = None
    frames = await client.reply({"message": "again"})
    assert frames[-1]["full_response"] == "Hello from Gemini."


@pytest.mark.parametrize("sdk", SDKS)
async def test_cancel_between_retries(start_server: StartServer, connect: Connect, fake: FakeGemini, sdk: str) -> None:
    fake.error = OVERLOADED
    server = await start(start_server, fake, sdk, timeout=60)
    client = await connect(server.url(), secret="s")
    await client.send({"id": "c", "message": "hi"})
    await eventually(lambda: len(fake.requests) == 1)
    await cancelled_end(client)
    attempts = len(fake.requests)
    await asyncio.sleep(1.5)  # longer than the first retry delay (1 s)
    assert len(fake.requests) == attempts  # no attempt after the cancel


# --- shutdown during a retry loop --------------------------------------------------------------


async def test_sigterm_during_a_legacy_retry_loop(
    cli: Callable[..., CliServer], fake: FakeGemini, tmp_path: Path
) -> None:
    fake.error = OVERLOADED
    config = tmp_path / "connic.toml"
    config.write_text(
        f"""
[server]
shutdown_grace = 0.5

[agents.gem]
use = "gemini"
sdk = "google-generativeai"
base_url = "{fake.base_url}"
api_key = "{KEY}"
timeout = 60

[[connectors]]
secrets = ["s"]
"""
    )
    # Blocking for the banner is fine: the fake is not asked anything before it.
    server = cli("--config", str(config))
    async with websockets.connect(server.url, open_timeout=5) as ws:
        await ws.send(json.dumps({"secret": "s"}))
        assert json.loads(await asyncio.wait_for(ws.recv(), 5))["type"] == "connected"
        await ws.send(json.dumps({"id": "m", "message": "hi"}))
        await eventually(lambda: len(fake.requests) == 1)  # the first 503 is in: retrying now
        server.proc.send_signal(signal.SIGTERM)
        frames = []
        with pytest.raises(websockets.ConnectionClosed):
            async with asyncio.timeout(5):
                while True:
                    frames.append(json.loads(await ws.recv()))
        assert ws.close_code == 1001
    ends = [f for f in frames if f["type"] == "stream_end"]
    assert ends and ends[0]["finish_reason"] == "cancelled", frames
    # In a thread: the fake must keep answering on this loop meanwhile.
    assert await asyncio.to_thread(server.proc.wait, 5) == 0
    out, _ = server.proc.communicate(timeout=5)
    assert "Traceback" not in out, out
    attempts = len(fake.requests)
    await asyncio.sleep(1.5)
    assert len(fake.requests) == attempts


# --- the legacy SDK's threads ------------------------------------------------------------------


async def first_chunks(clients: list[Client], timeout: float = 10.0) -> None:
    for client in clients:
        frames = await client.until("stream_chunk", timeout)
        assert frames[-1]["chunk"] == "Hello"


async def test_legacy_streams_are_not_capped_by_the_default_executor(
    start_server: StartServer, connect: Connect, fake: FakeGemini
) -> None:
    # One more stream than asyncio's default executor has threads, all held open at once.
    streams = min(32, (os.cpu_count() or 1) + 4) + 1
    fake.hold_last = asyncio.Event()
    server = await start(start_server, fake, "google-generativeai")
    clients = [await connect(server.url(), secret="s") for _ in range(streams)]
    for client in clients:
        await client.send({"message": "hi"})
    await first_chunks(clients)
    fake.hold_last.set()
    for client in clients:
        assert (await client.until("stream_end"))[-1]["full_response"] == "Hello from Gemini."


async def test_legacy_threads_bounds_the_streams_and_says_so(
    start_server: StartServer, connect: Connect, fake: FakeGemini, caplog: pytest.LogCaptureFixture
) -> None:
    fake.hold_last = asyncio.Event()
    server = await start(start_server, fake, "google-generativeai", legacy_threads=2)
    one, two, three = [await connect(server.url(), secret="s") for _ in range(3)]
    await one.send({"id": "c", "message": "hi"})
    await two.send({"message": "hi"})
    await first_chunks([one, two])
    with caplog.at_level("WARNING", logger="connic.agents.gemini"):
        await three.send({"message": "hi"})
        await eventually(lambda: any("legacy_threads" in r.getMessage() for r in caplog.records))
    await asyncio.sleep(0.3)
    assert len(fake.requests) == 2  # the third waits for a thread
    await cancelled_end(one)
    await first_chunks([three])
    assert len(fake.requests) == 3
    fake.hold_last.set()
    for client in (two, three):
        assert (await client.until("stream_end"))[-1]["full_response"] == "Hello from Gemini."


async def test_cancel_while_waiting_for_a_thread(start_server: StartServer, connect: Connect, fake: FakeGemini) -> None:
    fake.hold_last = asyncio.Event()
    server = await start(start_server, fake, "google-generativeai", legacy_threads=1)
    busy, waiting = [await connect(server.url(), secret="s") for _ in range(2)]
    await busy.send({"message": "hi"})
    await first_chunks([busy])
    await waiting.send({"id": "c", "message": "hi"})
    await waiting.until("ack")
    await cancelled_end(waiting)
    fake.hold_last.set()
    assert (await busy.until("stream_end"))[-1]["full_response"] == "Hello from Gemini."
    await asyncio.sleep(0.3)
    assert len(fake.requests) == 1  # the cancelled answer never reached the provider


@pytest.mark.parametrize("value", [0, -1])
def test_legacy_threads_must_be_positive(value: int) -> None:
    import connic

    config = {"agents": {"gem": {"use": "gemini", "api_key": "k", "legacy_threads": value}}}
    with pytest.raises(connic.ConfigError, match=r"agents\.gem: legacy_threads must be a positive number"):
        connic.create_app({**config, "connectors": [{"secrets": ["s"]}]})
