"""``python -m connic run --reload``, as a user runs it: a subprocess in a temp dir serving an
agent file, real WebSocket clients, and the file rewritten under it.

A restart closes the connected clients with 1012 (service restart); the new server answers
with the new code, on the same port and with the same generated secret. A file that does
not import leaves the parent waiting for the next change.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from test_playground import Tab, ThreadServer
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

import connic
from conftest import SECRET, make_config

pytest.importorskip("watchfiles", reason="--reload needs watchfiles (the reload extra)")

WAIT = 30.0
"""Seconds any one step may take (a start, a restart, an answer): a bound, not a measure."""

AGENT = """\
import connic


class Echoish(connic.Agent):
    async def respond(self, turn: connic.Turn):
        yield {answer!r}
"""


def environment() -> dict[str, str]:
    """Ours (PYTHONPATH finds this connic) without any CONNIC_ setting."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONNIC_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


class Reloading:
    """``python -m connic run ... --reload`` in ``cwd``, its output read line by line."""

    def __init__(self, cwd: Path, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "connic", "run", *args],
            cwd=cwd,
            env=environment(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def expect(self, match: Callable[[str], bool]) -> str:
        """The next output line ``match`` accepts; fails after WAIT seconds or at end of output."""
        deadline = time.monotonic() + WAIT
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError("no such line in time; output so far:\n" + "\n".join(self.seen)) from None
            if line is None:
                raise AssertionError("connic exited; its output:\n" + "\n".join(self.seen))
            self.seen.append(line)
            if match(line):
                return line

    def banner(self) -> tuple[int, str]:
        """Wait for the next banner; the port and the generated secret it shows."""
        port = int(re.findall(r"listening on http://[^:]+:(\d+)", self.expect(lambda s: "listening on" in s))[0])
        secret = self.expect(lambda s: "secret (generated" in s).rsplit(" ", 1)[1]
        self.expect(lambda s: s.startswith("Press Ctrl+C"))
        return port, secret

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(WAIT)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def reloading(tmp_path: Path) -> Iterator[Callable[..., Reloading]]:
    started: list[Reloading] = []

    def start(*args: str) -> Reloading:
        server = Reloading(tmp_path, *args)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@contextlib.contextmanager
def client(port: int, secret: str, path: str = "/ws") -> Iterator[ClientConnection]:
    """An authenticated connection (PROTOCOL.md: the secret as the first frame)."""
    with connect(f"ws://127.0.0.1:{port}{path}", open_timeout=WAIT) as ws:
        ws.send(json.dumps({"secret": secret}))
        assert json.loads(ws.recv(WAIT))["type"] == "connected"
        yield ws


def ask(ws: ClientConnection, text: str = "hi") -> str:
    """Send a message; the whole streamed answer."""
    ws.send(json.dumps({"message": text}))
    chunks = []
    while True:
        frame = json.loads(ws.recv(WAIT))
        assert frame["type"] != "error", frame
        if frame["type"] == "stream_chunk":
            chunks.append(frame["chunk"])
        if frame["type"] in ("stream_end", "response"):
            return "".join(chunks) or frame.get("message", "")


def closed_with(ws: ClientConnection) -> tuple[int, list[dict[str, object]]]:
    """Read until the server closes: its close code, and the frames before it."""
    frames = []
    with pytest.raises(ConnectionClosed) as closed:
        while True:
            frames.append(json.loads(ws.recv(WAIT)))
    assert closed.value.rcvd is not None, "closed without a close frame"
    return closed.value.rcvd.code, frames


def write_agent(folder: Path, answer: str) -> None:
    (folder / "agents.py").write_text(AGENT.format(answer=answer), encoding="utf-8")


def test_editing_the_agent_file_changes_the_next_answer(tmp_path: Path, reloading: Callable[..., Reloading]) -> None:
    write_agent(tmp_path, "answer A")
    server = reloading("--agent", "agents.py:Echoish", "--reload", "--port", "0")
    port, secret = server.banner()
    with client(port, secret) as first:
        assert ask(first) == "answer A"
        edited = time.monotonic()
        write_agent(tmp_path, "answer B")
        code, frames = closed_with(first)
    assert code == 1012, (code, frames)  # service restart: come back
    assert frames[-1]["code"] == "server_shutting_down", frames

    # Same port, same secret: the page's link and a client's settings still work.
    assert server.banner() == (port, secret)
    with client(port, secret) as second:
        assert ask(second) == "answer B"
        print(f"edit to new answer: {time.monotonic() - edited:.2f} s")  # measured, reported in docs/cli.md

        # Ctrl+C (here SIGTERM) is a real stop: 1001, not 1012, and the parent exits 0.
        server.proc.send_signal(signal.SIGTERM)
        code, _ = closed_with(second)
    assert code == 1001
    assert server.stop() == 0


def child_processes(pid: int) -> set[int]:
    """``pid``'s child processes (Linux /proc)."""
    found = set()
    for entry in os.listdir("/proc"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            if entry.isdigit() and int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.add(int(entry))
    return found


def test_sighup_to_the_parent_drains_the_child_and_exits_0(tmp_path: Path, reloading: Callable[..., Reloading]) -> None:
    """A closed terminal (SIGHUP to the parent) stops ``--reload`` as Ctrl+C does: the child drains
    (1001, not 1012: it is not coming back) and the parent exits 0. It used to die of it at once,
    leaving its child, in a process group of its own, serving on with no parent."""
    write_agent(tmp_path, "answer A")
    server = reloading("--agent", "agents.py:Echoish", "--reload", "--port", "0")
    port, secret = server.banner()
    children = child_processes(server.proc.pid)
    assert children
    try:
        with client(port, secret) as ws:
            assert ask(ws) == "answer A"
            server.proc.send_signal(signal.SIGHUP)
            assert server.proc.wait(WAIT) == 0
            code, frames = closed_with(ws)
        assert code == 1001, (code, frames)
        assert frames[-1]["code"] == "server_shutting_down", frames
        assert not any(Path(f"/proc/{pid}").exists() for pid in children)  # reaped, not orphaned
        server.expect(lambda s: s == "connic: shutting down")
    finally:
        # Had the parent died alone, its child would outlive the test, holding the port.
        for pid in children:
            with contextlib.suppress(OSError):
                if b"connic" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    os.kill(pid, signal.SIGKILL)


def test_a_broken_file_waits_for_the_next_change(tmp_path: Path, reloading: Callable[..., Reloading]) -> None:
    write_agent(tmp_path, "answer A")
    server = reloading("--agent", "agents.py:Echoish", "--reload", "--port", "0")
    port, secret = server.banner()

    (tmp_path / "agents.py").write_text("import connic\n\nclass Echoish(connic.Agent:\n", encoding="utf-8")
    error = server.expect(lambda s: s.startswith("connic: error:"))
    assert "agents.py" in error and "SyntaxError" in error, error
    server.expect(lambda s: "waiting for a change" in s)
    assert server.proc.poll() is None  # the parent keeps watching

    write_agent(tmp_path, "answer C")
    assert server.banner() == (port, secret)
    with client(port, secret) as ws:
        assert ask(ws) == "answer C"


def test_a_toml_change_restarts_too(tmp_path: Path, reloading: Callable[..., Reloading]) -> None:
    """With --config, the configuration's folder is watched, the configuration included."""
    write_agent(tmp_path, "answer A")
    toml = '[agents.echoish]\nuse = "agents.py:Echoish"\n\n[[connectors]]\npath = "{path}"\n'
    (tmp_path / "connic.toml").write_text(toml.format(path="/ws"), encoding="utf-8")
    server = reloading("--config", "connic.toml", "--reload", "--port", "0")
    port, secret = server.banner()
    (tmp_path / "connic.toml").write_text(toml.format(path="/chat"), encoding="utf-8")
    server.expect(lambda s: "connic.toml changed; restarting" in s)
    server.banner()
    with client(port, secret, "/chat") as ws:
        assert ask(ws) == "answer A"


def test_reload_refuses_several_workers(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "connic", "run", "--reload", "--workers", "2", "--port", "0"],
        cwd=tmp_path,
        env=environment(),
        capture_output=True,
        text=True,
        timeout=WAIT,
    )
    assert done.returncode == 1
    assert done.stderr == "connic: error: --reload cannot be combined with --workers 2: use one or the other\n"
    assert done.stdout == ""


# --- the playground comes back by itself (headless Chromium) ------------------------------------


@pytest.fixture
def tab(browser: Any) -> Iterator[Tab]:
    context = browser.new_context(viewport={"width": 1100, "height": 820})
    tab = Tab(context.new_page())
    tab.page.set_default_timeout(WAIT * 1000)
    yield tab
    context.close()
    assert not tab.errors, tab.errors


@pytest.fixture(scope="module")
def served() -> Iterator[ThreadServer]:
    """A plain server for the page itself; the scripted tests answer its WebSocket."""
    server = ThreadServer(connic.create_app(make_config())).start()
    yield server
    server.stop()


Answer = Callable[[Any, int, dict[str, Any]], None]


def script(page: Any, answer: Answer) -> list[int]:
    """Answer the page's WebSockets with ``answer(ws, n, frame)`` (n counts sockets); the count, live."""
    sockets = [0]

    def route(ws: Any) -> None:
        sockets[0] += 1
        n = sockets[0]
        ws.on_message(lambda message: answer(ws, n, json.loads(message)))

    page.route_web_socket(re.compile(r".*/ws$"), route)
    return sockets


def send(ws: Any, **frame: Any) -> None:
    ws.send(json.dumps(frame))


def test_the_playground_reconnects_after_a_reload(
    tmp_path: Path, reloading: Callable[..., Reloading], tab: Tab
) -> None:
    write_agent(tmp_path, "answer A")
    server = reloading("--agent", "agents.py:Echoish", "--reload", "--port", "0")
    port, secret = server.banner()
    page = tab.page
    page.goto(f"http://127.0.0.1:{port}/#secret={secret}")  # the banner's link: connects by itself
    page.wait_for_selector("#message:enabled")
    first = page.text_content("#session-id")
    tab.say("hi")
    page.wait_for_function("() => document.querySelector('.turn.agent')?.textContent.includes('answer A')")

    write_agent(tmp_path, "answer B")
    server.banner()
    # A new session (the old one lived in the old process), with no click.
    page.wait_for_function("(old) => document.getElementById('session-id').textContent !== old", arg=first)
    page.wait_for_selector("#message:enabled")
    assert any(n.startswith("The server is restarting. Reconnecting…") for n in tab.notices()), tab.notices()
    tab.say("again")
    page.wait_for_function(
        "() => [...document.querySelectorAll('.turn.agent')].some((t) => t.textContent.includes('answer B'))"
    )


def test_the_playground_reconnects_after_1012_without_a_session_to_resume(tab: Tab, served: ThreadServer) -> None:
    """resume_window = 0 (no resume_token): a 1012 still brings the page back, to a new session."""

    def answer(ws: Any, n: int, frame: dict[str, Any]) -> None:
        if "secret" in frame and frame.get("type") != "resume":
            send(ws, type="connected", session_id=f"s{n}", agents=["assistant"])
        if n == 1 and frame.get("type") == "message":
            send(ws, type="error", id=None, code="server_shutting_down", message="the server is restarting")
            ws.close(code=1012, reason="server_shutting_down")

    page = tab.page
    sockets = script(page, answer)
    tab.open(f"{served.http}/?secret={SECRET}")
    assert tab.connect() == "s1"
    tab.say("hello")
    page.wait_for_function("() => document.getElementById('session-id').textContent === 's2'")
    page.wait_for_selector("#message:enabled")
    assert "The server is restarting. Reconnecting… close 1012" in tab.notices(), tab.notices()
    assert sockets == [2]


def test_the_playground_does_not_come_back_after_1001_without_a_session(tab: Tab, served: ThreadServer) -> None:
    """The contrast: a real shutdown (1001) with nothing to resume is final, as before."""

    def answer(ws: Any, n: int, frame: dict[str, Any]) -> None:
        if "secret" in frame:
            send(ws, type="connected", session_id=f"s{n}", agents=["assistant"])
        elif frame.get("type") == "message":
            send(ws, type="error", id=None, code="server_shutting_down", message="the server is shutting down")
            ws.close(code=1001, reason="server_shutting_down")

    page = tab.page
    sockets = script(page, answer)
    tab.open(f"{served.http}/?secret={SECRET}")
    tab.connect()
    tab.say("hello")
    page.wait_for_function("() => document.getElementById('status-text').textContent === 'Disconnected'")
    assert sockets == [1]
