"""The two clients of docs/reconnecting-clients.md, run as printed, across a real TCP drop.

Each client talks to a real connic server through tests/tcp_proxy.py; the test cuts the proxy's
connections in the middle of a slow streamed reply and the client must resume by itself and
end with the whole reply, every word once. The JavaScript one runs in headless Chromium, the
Python one in-process (its ``main`` on the test's event loop).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import re
import time
from collections.abc import Iterator
from typing import Any

import pytest
from test_playground_resume import LONG, WORDS, Handshakes, Proxied, slow_echo

from conftest import ROOT, SECRET

DOC = ROOT / "docs" / "reconnecting-clients.md"
PLACEHOLDER_MESSAGE = "Tell me a long story."


def code_block(heading: str, language: str) -> str:
    """The first fenced ``language`` block after ``heading`` in the doc, verbatim."""
    text = DOC.read_text(encoding="utf-8")
    start = text.index(f"\n{heading}\n")
    match = re.compile(rf"^```{language}\n(.*?)^```$", re.S | re.M).search(text, start)
    assert match, f"no {language} block after {heading!r} in {DOC}"
    return match.group(1)


def filled(code: str, url: str, message: str) -> str:
    """The block with the URL, secret and message of the test in place of its placeholders."""
    for placeholder in ("<websocket-url>", "<your-secret-key>", PLACEHOLDER_MESSAGE):
        assert placeholder in code, placeholder
    return (
        code.replace("<websocket-url>", url).replace("<your-secret-key>", SECRET).replace(PLACEHOLDER_MESSAGE, message)
    )


def test_the_blocks_are_there() -> None:
    assert "class ConnicClient" in code_block("## A browser client", "javascript")
    assert "class ConnicClient" in code_block("## A Python client", "python")


# --- the browser client ---------------------------------------------------------------------------


class Console:
    """A blank page (no CSP) with the console, the page errors and every WebSocket's frames."""

    def __init__(self, page: Any) -> None:
        self.page = page
        self.logged: list[str] = []
        self.errors: list[str] = []
        self.sent: list[list[dict[str, Any]]] = []
        self.received: list[list[dict[str, Any]]] = []
        page.on("console", lambda msg: self.logged.append(msg.text.rstrip()))
        page.on("pageerror", lambda error: self.errors.append(str(error)))
        page.on("websocket", self._watch)

    def _watch(self, ws: Any) -> None:
        sent: list[dict[str, Any]] = []
        received: list[dict[str, Any]] = []
        self.sent.append(sent)
        self.received.append(received)
        ws.on("framesent", lambda payload: sent.append(json.loads(payload)))
        ws.on("framereceived", lambda payload: received.append(json.loads(payload)))

    def wait_for_log(self, prefix: str, timeout: float = 20.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            found = [line for line in self.logged if line.startswith(prefix)]
            if found:
                return found[-1]
            assert time.monotonic() < deadline, (prefix, self.logged)
            self.page.wait_for_timeout(25)


@pytest.fixture
def console(browser: Any) -> Iterator[Console]:
    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(20_000)
    console = Console(page)
    page.set_content("<!doctype html><title>reconnecting client</title>")
    yield console
    context.close()
    assert not console.errors, console.errors


@pytest.fixture
def proxied() -> Iterator[Any]:
    started: list[Proxied] = []

    def start(config: dict[str, Any]) -> Proxied:
        started.append(Proxied(config))
        return started[-1]

    yield start
    for item in started:
        item.stop()


def run_js_client(console: Console, target: Proxied, message: str = WORDS) -> None:
    script = filled(code_block("## A browser client", "javascript"), f"ws://127.0.0.1:{target.proxy.port}/ws", message)
    console.page.add_script_tag(content=script)
    # `shown` is the example's own map: message id -> the reply text shown so far.
    console.page.wait_for_function("() => (shown.get('msg-001') ?? '').trim().split(/\\s+/).length >= 5")


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "deflate"])
def test_js_client_resumes_mid_reply(console: Console, proxied: Any, compress: bool) -> None:
    target = proxied(slow_echo(compress=compress))
    handshakes = Handshakes(console.page)
    run_js_client(console, target)
    assert target.cut() >= 1

    assert console.wait_for_log("reply msg-001") == f"reply msg-001: {WORDS}"  # not "(mended)"
    assert console.page.evaluate("() => shown.get('msg-001')") == WORDS
    first, second = console.received[0], console.received[1]
    session_id = first[0]["session_id"]
    assert not any(frame["type"] == "stream_end" for frame in first)  # the drop came mid-reply
    assert console.sent[1][0] == {
        "type": "resume",
        "session_id": session_id,
        "resume_token": first[0]["resume_token"],
        "last_seq": max(frame["seq"] for frame in first if "seq" in frame),
        "secret": SECRET,
    }
    assert second[0]["resumed"] is True and second[0]["recovered"] is True
    statuses = [line for line in console.logged if line.startswith("status:")]
    assert statuses[:3] == ["status: connecting", f"status: connected {session_id}", "status: reconnecting 1006"]
    assert statuses[-1] == f"status: connected {session_id}"
    handshakes.check(compress, 2)
    console.page.evaluate("() => client.close()")
    assert console.wait_for_log("status: closed") == "status: closed 1000"


def test_js_client_rebuilds_when_frames_were_evicted(console: Console, proxied: Any) -> None:
    target = proxied(slow_echo(replay_buffer=1))
    run_js_client(console, target, LONG)
    target.refuse(True)
    assert target.cut() >= 1
    console.wait_for_log("status: reconnecting")
    console.page.wait_for_timeout(1000)  # the reply streams on, past what a 1-frame log can replay
    target.refuse(False)

    # Mended by stream_end; or, had the reply ended during the break, taken from history.
    logged = console.wait_for_log("reply msg-001")
    assert logged in (f"reply msg-001 (mended): {LONG}", f"reply msg-001 (from history): {LONG}")
    resumed = next(frames for frames in console.received[1:] if frames and frames[0].get("resumed"))
    assert resumed[0]["recovered"] is False
    assert any({"type": "history"} in sent for sent in console.sent[1:])
    assert console.page.evaluate("() => shown.get('msg-001')") == LONG


# --- the Python client --------------------------------------------------------------------------


def python_client() -> dict[str, Any]:
    """The doc's Python block, executed as a module that is not ``__main__``."""
    namespace: dict[str, Any] = {"__name__": "reconnecting_client"}
    exec(compile(code_block("## A Python client", "python"), str(DOC), "exec"), namespace)
    return namespace


def run_python_client(target: Proxied, message: str = WORDS, *, hold: float = 0.0) -> tuple[str, str]:
    """Run the doc's main() through the proxy and cut mid-reply: its stdout and its stderr.

    main() runs on the server thread's event loop, so this test needs no loop of its own
    (the module's sync Playwright browser owns the main thread's).
    """
    out, err = io.StringIO(), io.StringIO()
    main = python_client()["main"]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        url = f"ws://127.0.0.1:{target.proxy.port}/ws"
        done = asyncio.run_coroutine_threadsafe(main(url, SECRET, message), target.server.loop)
        deadline = time.monotonic() + 10
        while len(out.getvalue().split()) < 5:
            assert not done.done() and time.monotonic() < deadline, (out.getvalue(), err.getvalue())
            time.sleep(0.02)
        if hold:
            target.refuse(True)
        assert target.cut() >= 1
        if hold:
            time.sleep(hold)  # the reply streams on while the client cannot get back
            target.refuse(False)
        done.result(30)
    return out.getvalue(), err.getvalue()


def test_python_client_resumes_mid_reply(proxied: Any) -> None:
    target = proxied(slow_echo())
    out, err = run_python_client(target)
    assert out == WORDS + "\n"  # streamed once: every word, none twice
    assert "[connection lost (1006); resuming in" in err
    sessions = re.findall(r"\[session (\S+), resumed: (\w+)\]", err)
    assert [resumed for _, resumed in sessions] == ["False", "True"], err
    assert sessions[0][0] == sessions[1][0]
    assert target.proxy.accepted == 2


def test_python_client_rebuilds_when_frames_were_evicted(proxied: Any) -> None:
    target = proxied(slow_echo(replay_buffer=1))
    out, err = run_python_client(target, LONG, hold=1.0)
    streamed, _, full = out.partition("\n[the reply in full:]\n")
    assert full == LONG + "\n", out
    assert set(streamed.split()) < set(LONG.split())  # a gap in what streamed, then the whole reply
    assert re.search(r"\[session \S+, resumed: True\]", err), err
