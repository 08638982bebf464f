"""Shared fixtures: a real connic server (in-process or as a subprocess) and real clients."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import websockets
from aiohttp import web
from aiohttp.test_utils import TestServer

import connic

# --- numbers the reliability tests report, printed in one table at the end of the run -----

MEASURED: list[tuple[str, str]] = []
"""(name, value) pairs, from tests/reliability/conftest.py's ``report``."""


def pytest_sessionfinish(session: pytest.Session) -> None:
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:  # a pytest-xdist worker: its numbers go to the controller
        workeroutput["measured"] = [list(item) for item in MEASURED]


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: Any) -> None:
    MEASURED.extend((name, value) for name, value in getattr(node, "workeroutput", {}).get("measured", []))


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if MEASURED:
        terminalreporter.section("reliability: measured")
        for name, value in MEASURED:
            terminalreporter.write_line(f"{name}: {value}")


SECRET = "test-secret"
ROOT = Path(__file__).resolve().parent.parent


def make_config(connector: Mapping[str, Any] | None = None, agents: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Config data with one websocket connector at /ws and an echo agent named ``assistant``."""
    return {
        "agents": dict(agents) if agents is not None else {"assistant": {"use": "echo"}},
        "connectors": [{"transport": "websocket", "path": "/ws", "secrets": [SECRET], **(connector or {})}],
    }


class Server:
    """A running in-process connic server."""

    def __init__(self, server: TestServer) -> None:
        self.server = server

    @property
    def base(self) -> str:
        return f"ws://127.0.0.1:{self.server.port}"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.server.port}"

    def url(self, path: str = "/ws") -> str:
        return self.base + path


StartServer = Callable[..., Awaitable[Server]]


@pytest.fixture
async def start_server() -> AsyncIterator[StartServer]:
    """Start connic apps in-process: ``await start_server(config_or_app, registry=...)``."""
    servers: list[TestServer] = []

    async def start(config: Any = None, *, app: web.Application | None = None, **kwargs: Any) -> Server:
        if app is None:
            app = connic.create_app(config if config is not None else make_config(), **kwargs)
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        servers.append(server)
        return Server(server)

    yield start
    for server in reversed(servers):
        await server.close()


@pytest.fixture
async def server(start_server: StartServer) -> Server:
    """The default server: echo agent ``assistant`` at /ws, secret ``test-secret``."""
    return await start_server()


SEQUENCED = frozenset({"ack", "stream_start", "stream_chunk", "stream_end", "response", "tool_call", "tool_result"})
"""Frame types that always carry ``seq`` (PROTOCOL.md §7), besides errors that name a message."""


class Client:
    """A thin JSON wrapper over a real ``websockets`` client connection.

    Every frame received is checked against PROTOCOL.md §7: the frames of a
    message carry ``seq``, one more than the last, and no other frame does.
    ``seq`` is then removed from the frame unless ``keep_seq`` is set, so tests
    of other rules compare frames as the seed shows them.
    """

    def __init__(self, ws: websockets.ClientConnection, keep_seq: bool = False) -> None:
        self.ws = ws
        self.keep_seq = keep_seq
        self.last_seq: int | None = None

    async def send(self, frame: Any) -> None:
        await self.ws.send(frame if isinstance(frame, str | bytes) else json.dumps(frame))

    async def recv(self, timeout: float = 5.0) -> dict[str, Any]:
        data = await asyncio.wait_for(self.ws.recv(), timeout)
        return self._checked(json.loads(data))

    def _checked(self, frame: dict[str, Any]) -> dict[str, Any]:
        seq = frame.get("seq") if self.keep_seq else frame.pop("seq", None)
        kind = frame.get("type")
        if kind in SEQUENCED or kind == "progress" or (kind == "error" and frame.get("id") is not None):
            assert isinstance(seq, int), f"no seq on {frame}"
            assert self.last_seq is None or seq == self.last_seq + 1, f"seq {seq} after {self.last_seq}: {frame}"
            self.last_seq = seq
        else:
            assert seq is None, f"seq on a connection-level frame: {frame}"
        return frame

    async def until(self, kind: str, timeout: float = 5.0) -> list[dict[str, Any]]:
        """Receive frames up to and including the first of type ``kind``."""
        frames = []
        while True:
            frame = await self.recv(timeout)
            frames.append(frame)
            if frame["type"] == kind:
                return frames

    async def reply(self, message: Any, timeout: float = 5.0) -> list[dict[str, Any]]:
        """Send a message and collect frames until its stream_end, response or error."""
        await self.send(message)
        frames = []
        while True:
            frame = await self.recv(timeout)
            frames.append(frame)
            if frame["type"] in ("stream_end", "response", "error"):
                return frames

    async def closed(self, timeout: float = 5.0) -> tuple[int | None, list[dict[str, Any]]]:
        """Read until the server closes; return the close code and the frames before it."""
        frames = []
        try:
            async with asyncio.timeout(timeout):
                while True:
                    frames.append(self._checked(json.loads(await self.ws.recv())))
        except websockets.ConnectionClosed:
            pass
        return self.ws.close_code, frames


Connect = Callable[..., Awaitable[Client]]


@pytest.fixture
async def connect() -> AsyncIterator[Connect]:
    """Open clients: ``await connect(url, secret=SECRET)`` sends the seed's auth frame and checks ``connected``."""
    opened: list[websockets.ClientConnection] = []

    async def open_client(
        url: str, secret: str | None = SECRET, *, expect_connected: bool = True, keep_seq: bool = False, **kwargs: Any
    ) -> Client:
        ws = await websockets.connect(url, open_timeout=5, **kwargs)
        opened.append(ws)
        client = Client(ws, keep_seq)
        if secret is not None:
            await client.send({"secret": secret})
        if expect_connected:
            frame = await client.recv()
            assert frame["type"] == "connected", frame
            client.connected = frame  # type: ignore[attr-defined]
        return client

    yield open_client
    for ws in opened:
        await ws.close()


class CliServer:
    """``python -m connic run`` in a subprocess."""

    def __init__(self, proc: subprocess.Popen[str], port: int, secret: str | None, banner: list[str]) -> None:
        self.proc = proc
        self.port = port
        self.secret = secret
        self.banner = banner

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> tuple[int, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        out, _ = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, out


def start_cli(*args: str, env: Mapping[str, str] | None = None) -> CliServer:
    """Start ``python -m connic run --port 0 ARGS`` and wait for its banner."""
    proc_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc_env.pop("CONNIC_SECRET", None) if env is None or "CONNIC_SECRET" not in env else None
    proc = subprocess.Popen(
        [sys.executable, "-m", "connic", "run", "--port", "0", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=proc_env,
        cwd=ROOT,
    )
    assert proc.stdout is not None
    banner: list[str] = []
    port = None
    secret = None
    for line in proc.stdout:
        banner.append(line.rstrip("\n"))
        if m := re.search(r"listening on http://[^:]+:(\d+)", line):
            port = int(m.group(1))
        if m := re.search(r"secret \(generated.*\): (\S+)", line):
            secret = m.group(1)
        if line.startswith("Press Ctrl+C"):
            break
    if port is None:
        proc.kill()
        raise AssertionError("connic did not start:\n" + "\n".join(banner))
    return CliServer(proc, port, secret, banner)


@pytest.fixture
def cli() -> Iterator[Callable[..., CliServer]]:
    """Start CLI servers; they are stopped at the end of the test."""
    started: list[CliServer] = []

    def run(*args: str, env: Mapping[str, str] | None = None) -> CliServer:
        server = start_cli(*args, env=env)
        started.append(server)
        return server

    yield run
    for server in started:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.communicate()


CHROMIUM = "/usr/bin/chromium"
"""Debian's chromium: Playwright drives it and never downloads a browser of its own."""
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def require_chromium() -> None:
    """Skip when Debian's chromium is missing; fail instead where it must be there (scripts/test as root)."""
    if os.access(CHROMIUM, os.X_OK):
        return
    reason = f"{CHROMIUM} is missing (apt-get install chromium; scripts/test installs it when run as root)"
    if os.environ.get("CONNIC_REQUIRE_CHROMIUM"):
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """One headless Chromium for the module."""
    require_chromium()
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed (test extra)")
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=30_000)
        yield launched
        launched.close()
