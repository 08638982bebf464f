"""Graceful shutdown of ``python -m connic run`` on SIGTERM / SIGINT, black-box.

In-flight replies finish (up to ``server.shutdown_grace``), queued and new messages
are refused with ``server_shutting_down``, then every socket closes with 1001 and
the process exits 0. Time bounds here are deliberately loose: timing claims belong
in benchmarks.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import websockets

from conftest import ROOT, CliServer, Connect

Cli = Callable[..., CliServer]
SIGNALS = [pytest.param(signal.SIGTERM, id="SIGTERM"), pytest.param(signal.SIGINT, id="SIGINT")]
THIRTY_WORDS = " ".join(f"word{i}" for i in range(30))


def config_file(tmp_path: Path, *, delay: float, grace: float | None = None) -> Path:
    server = f"[server]\nshutdown_grace = {grace}\n\n" if grace is not None else ""
    path = tmp_path / "shutdown.toml"
    path.write_text(
        f'{server}[agents.echo]\nuse = "echo"\ndelay = {delay}\n\n[[connectors]]\nsecrets = ["s"]\n',
        encoding="utf-8",
    )
    return path


def split(frames: list[dict], message_id: object) -> tuple[list[dict], list[dict]]:  # type: ignore[type-arg]
    """The frames of one message, and the others."""
    mine = [f for f in frames if f.get("id") == message_id and f["type"] != "error"]
    rest = [f for f in frames if f not in mine]
    return mine, rest


def assert_exited_cleanly(server: CliServer) -> str:
    """The process exits 0 by itself (it was already signalled), having said so."""
    out, _ = server.proc.communicate(timeout=30)
    code = server.proc.returncode
    assert code == 0, out
    assert "connic: shutting down" in out
    assert "Traceback" not in out, out
    return out


@pytest.mark.parametrize("sig", SIGNALS)
async def test_in_flight_stream_finishes_then_1001(tmp_path: Path, cli: Cli, connect: Connect, sig: int) -> None:
    server = cli("--config", str(config_file(tmp_path, delay=0.05)))
    client = await connect(server.url, secret="s")
    await client.send({"id": "m1", "message": THIRTY_WORDS})
    before = await client.until("stream_chunk")
    assert [f["type"] for f in before] == ["ack", "stream_start", "stream_chunk"]

    server.proc.send_signal(sig)
    code, after = await client.closed(timeout=20)
    frames = before + after
    mine, rest = split(frames, "m1")
    chunks = [f["chunk"] for f in mine if f["type"] == "stream_chunk"]
    assert "".join(chunks) == THIRTY_WORDS
    assert len(chunks) == 30
    end = mine[-1]
    assert end["type"] == "stream_end", frames
    assert end["full_response"] == THIRTY_WORDS and end["finish_reason"] == "stop"
    assert end["token_usage"] == {"prompt_tokens": 30, "candidates_tokens": 30}
    # After the reply: one server_shutting_down, then the close.
    assert frames[-1] == rest[-1]
    assert [(f["type"], f["code"], f["id"]) for f in rest] == [("error", "server_shutting_down", None)]
    assert code == 1001
    assert_exited_cleanly(server)


@pytest.mark.parametrize("sig", SIGNALS)
async def test_idle_connections_close_promptly(cli: Cli, connect: Connect, sig: int) -> None:
    server = cli("--secret", "s")
    clients = [await connect(server.url, secret="s") for _ in range(3)]
    frames = await clients[0].reply({"message": "before"})
    assert frames[-1]["full_response"] == "before"

    started = time.monotonic()
    server.proc.send_signal(sig)
    results = await asyncio.gather(*(c.closed(timeout=10) for c in clients))
    elapsed = time.monotonic() - started
    for code, frames in results:
        assert [(f["type"], f["code"]) for f in frames] == [("error", "server_shutting_down")]
        assert code == 1001
    assert elapsed < 5, elapsed
    assert_exited_cleanly(server)


async def test_unauthenticated_connection_is_closed_too(cli: Cli, connect: Connect) -> None:
    server = cli("--secret", "s")
    waiting = await connect(server.url, secret=None, expect_connected=False)
    await asyncio.sleep(0.2)  # the server is now waiting for the auth frame
    started = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    code, frames = await waiting.closed(timeout=10)
    assert code == 1001, frames
    assert all(f.get("code") == "server_shutting_down" for f in frames), frames
    assert time.monotonic() - started < 5
    assert_exited_cleanly(server)


async def test_queued_messages_are_refused(tmp_path: Path, cli: Cli, connect: Connect) -> None:
    server = cli("--config", str(config_file(tmp_path, delay=0.05)))
    client = await connect(server.url, secret="s")
    text = " ".join(["w"] * 20)
    await client.send({"id": "m1", "message": text})
    await client.send({"id": "m2", "message": "queued behind m1"})
    await client.send({"id": "m3", "message": "queued behind m2"})
    before = await client.until("stream_chunk")
    server.proc.send_signal(signal.SIGTERM)

    # New connections are not accepted while draining (refused, or HTTP 503).
    await asyncio.sleep(0.2)
    with pytest.raises((OSError, websockets.InvalidHandshake, TimeoutError)):
        async with websockets.connect(server.url, open_timeout=3):
            pass

    code, after = await client.closed(timeout=20)
    frames = before + after
    assert [(f["id"], f["message_number"]) for f in frames if f["type"] == "ack"] == [("m1", 1), ("m2", 2), ("m3", 3)]
    m1, _ = split(frames, "m1")
    assert m1[-1]["type"] == "stream_end" and m1[-1]["full_response"] == text, frames
    assert m1[-1]["finish_reason"] == "stop"
    errors = [(f["id"], f["code"]) for f in frames if f["type"] == "error"]
    assert errors == [("m2", "server_shutting_down"), ("m3", "server_shutting_down"), (None, "server_shutting_down")]
    assert frames[-1]["type"] == "error"
    # The queued messages were not answered.
    assert not [f for f in frames if f.get("id") in ("m2", "m3") and f["type"] not in ("ack", "error")]
    assert code == 1001
    assert_exited_cleanly(server)


async def test_message_sent_while_draining_is_refused(tmp_path: Path, cli: Cli, connect: Connect) -> None:
    server = cli("--config", str(config_file(tmp_path, delay=0.05)))
    client = await connect(server.url, secret="s")
    text = " ".join(["w"] * 30)
    await client.send({"id": "m1", "message": text})
    before = await client.until("stream_chunk")
    server.proc.send_signal(signal.SIGTERM)
    await asyncio.sleep(0.3)  # the server is draining m1 (about 1.5 s of work)
    await client.send({"id": "late", "message": "sent while draining"})
    code, after = await client.closed(timeout=20)
    frames = before + after
    assert code == 1001
    assert_exited_cleanly(server)
    m1, _ = split(frames, "m1")
    assert m1[-1]["type"] == "stream_end" and m1[-1]["full_response"] == text
    late = [(f["type"], f.get("code")) for f in frames if f.get("id") == "late"]
    assert late == [("error", "server_shutting_down")], late


async def test_cancel_while_draining(tmp_path: Path, cli: Cli, connect: Connect) -> None:
    server = cli("--config", str(config_file(tmp_path, delay=0.2)))
    client = await connect(server.url, secret="s")
    text = " ".join(["w"] * 30)  # 6 s of work; shutdown_grace is 10 s
    await client.send({"id": "m1", "message": text})
    before = await client.until("stream_chunk")
    server.proc.send_signal(signal.SIGTERM)
    await asyncio.sleep(0.3)
    started = time.monotonic()
    await client.send({"type": "cancel", "id": "m1"})
    code, after = await client.closed(timeout=20)
    elapsed = time.monotonic() - started
    assert code == 1001
    assert_exited_cleanly(server)
    m1, _ = split(before + after, "m1")
    assert m1[-1]["type"] == "stream_end" and m1[-1]["finish_reason"] == "cancelled", m1[-1]
    assert elapsed < 4, elapsed


@pytest.mark.parametrize("streaming", [True, False], ids=["streaming", "buffered"])
async def test_grace_period_cancels_a_long_reply(tmp_path: Path, cli: Cli, connect: Connect, streaming: bool) -> None:
    flags = [] if streaming else ["--no-streaming"]
    server = cli("--config", str(config_file(tmp_path, delay=1.0, grace=0.5)), *flags)
    client = await connect(server.url, secret="s")
    text = " ".join(f"slow{i}" for i in range(20))  # 20 s of work
    await client.send({"id": "long", "message": text})
    if streaming:
        before = await client.until("stream_chunk")
    else:
        before = await client.until("ack")
        await asyncio.sleep(1.2)  # the agent has produced something

    started = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    code, after = await client.closed(timeout=20)
    elapsed = time.monotonic() - started
    frames = before + after
    mine, rest = split(frames, "long")
    last = mine[-1]
    assert last["type"] == ("stream_end" if streaming else "response"), frames
    assert last["finish_reason"] == "cancelled"
    produced = last["full_response"] if streaming else last["response"]
    assert produced and text.startswith(produced) and produced != text
    if streaming:
        assert produced == "".join(f["chunk"] for f in mine if f["type"] == "stream_chunk")
    assert [(f["type"], f["code"]) for f in rest] == [("error", "server_shutting_down")]
    assert frames[-1] == rest[-1]
    assert code == 1001
    assert elapsed < 5, elapsed  # grace 0.5 s + 1 s for cancellation, loosely
    assert_exited_cleanly(server)


@pytest.mark.parametrize("sig", SIGNALS)
async def test_shutdown_with_no_connections(cli: Cli, sig: int) -> None:
    server = cli("--secret", "s")
    started = time.monotonic()
    server.proc.send_signal(sig)
    assert_exited_cleanly(server)
    assert time.monotonic() - started < 10


def test_ctrl_c_the_moment_the_port_opens_still_shuts_down() -> None:
    # The port accepts connections as soon as the site listens, a moment before start-up
    # ends; a signal then must not be lost (it once was, and the server ran on).
    for _ in range(3):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        proc = subprocess.Popen(
            [sys.executable, "-m", "connic", "run", "--port", str(port), "--secret", "s"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=ROOT,
        )
        try:
            deadline = time.monotonic() + 30
            while True:
                with socket.socket() as s:
                    if s.connect_ex(("127.0.0.1", port)) == 0:
                        break
                assert proc.poll() is None and time.monotonic() < deadline, "connic did not start"
                time.sleep(0.002)
            proc.send_signal(signal.SIGINT)
            out, _ = proc.communicate(timeout=15)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == 0, out
        assert "connic: shutting down" in out
        assert "Traceback" not in out, out
