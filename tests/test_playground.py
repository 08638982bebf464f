"""The playground page, driven in real headless Chromium (Debian's /usr/bin/chromium) by Playwright.

The connic server runs in a thread with its own event loop, so the tests use
Playwright's sync API; one browser serves the whole module, each test gets a
fresh browser context.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

import connic
from conftest import ROOT, SECRET, StartServer, make_config

sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed (test extra)")

ARTIFACTS = ROOT / "test-artifacts"
UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
WORDS = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen"
TIMEOUT_MS = 10_000


# --- the server, in a thread --------------------------------------------------------------------


class ThreadServer:
    """An aiohttp application served on 127.0.0.1 by a thread with its own event loop."""

    def __init__(self, app: web.Application) -> None:
        self.app = app
        self.loop = asyncio.new_event_loop()
        self.port = 0
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="connic-test-server", daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=5)
        try:
            self.loop.run_until_complete(runner.setup())
            site = web.TCPSite(runner, "127.0.0.1", 0)
            self.loop.run_until_complete(site.start())
            self.port = runner.addresses[0][1]
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        try:
            self.loop.run_forever()
        finally:
            self.loop.run_until_complete(runner.cleanup())
            self.loop.close()

    def start(self) -> ThreadServer:
        self._thread.start()
        assert self._ready.wait(15), "the test server did not start"
        if self._error is not None:
            raise self._error
        return self

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(30)

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def echo_config(**server: Any) -> dict[str, Any]:
    """The module's configuration: a slow echo agent (0.1 s per word) on /ws and on a 1-message /limited."""
    config = make_config(agents={"assistant": {"use": "echo", "delay": 0.1}})
    config["server"] = {"shutdown_grace": 1.0, **server}
    config["connectors"].append({"path": "/limited", "secrets": [SECRET], "max_messages": 1})
    return config


@pytest.fixture(scope="module")
def served() -> Iterator[ThreadServer]:
    """The standalone app of :func:`echo_config`, for the whole module."""
    server = ThreadServer(connic.create_app(echo_config())).start()
    yield server
    server.stop()


@pytest.fixture
def serve() -> Iterator[Callable[[web.Application], ThreadServer]]:
    """Serve more apps for one test."""
    started: list[ThreadServer] = []

    def start(app: web.Application) -> ThreadServer:
        started.append(ThreadServer(app).start())
        return started[-1]

    yield start
    for server in started:
        server.stop()


def http_get(url: str) -> tuple[int, dict[str, str], str]:
    """GET without following redirects: status, headers, body."""

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: Any, **kwargs: Any) -> None:
            return None

    opener = urllib.request.build_opener(NoRedirect)
    try:
        with opener.open(url, timeout=10) as response:
            return response.status, dict(response.headers), response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read().decode()


# --- the browser ----------------------------------------------------------------------------------


class Tab:
    """A page plus what it sent over WebSockets and any uncaught script errors."""

    def __init__(self, page: Any) -> None:
        self.page = page
        self.sent: list[dict[str, Any]] = []
        self.errors: list[str] = []
        page.set_default_timeout(TIMEOUT_MS)
        page.on("pageerror", lambda error: self.errors.append(str(error)))
        page.on("websocket", self._watch)

    def _watch(self, ws: Any) -> None:
        ws.on("framesent", lambda payload: self.sent.append(json.loads(payload)))

    def open(self, url: str) -> None:
        self.page.goto(url)
        # Arrow functions only: the page's CSP forbids the eval() a bare expression would need.
        self.page.wait_for_function("() => document.getElementById('connector-url').textContent !== ''")

    def connect(self) -> str:
        """Press Connect and wait for the session; returns the session id shown."""
        self.page.click("#connect")
        self.page.wait_for_selector("#session:not([hidden])")
        self.page.wait_for_selector("#message:enabled")
        return str(self.page.text_content("#session-id"))

    def say(self, text: str) -> None:
        """Type a message and press Enter."""
        self.page.fill("#message", text)
        self.page.press("#message", "Enter")

    def reply(self, message_id: str, agent: str = "assistant") -> Any:
        return self.page.locator(f'.exchange[data-id="{message_id}"] .turn.agent[data-agent="{agent}"]')

    def notices(self) -> list[str]:
        return [" ".join(t.split()) for t in self.page.locator(".notice").all_inner_texts()]


@pytest.fixture
def tab(browser: Any) -> Iterator[Tab]:
    context = browser.new_context(viewport={"width": 1100, "height": 820})
    tab = Tab(context.new_page())
    yield tab
    context.close()
    assert not tab.errors, tab.errors


def screenshot(tab: Tab, name: str, capsys: pytest.CaptureFixture[str]) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    tab.page.screenshot(path=str(path))
    with capsys.disabled():
        print(f"\nscreenshot: {path}")
    return path


# --- tests: HTTP ------------------------------------------------------------------------------------


def test_page_is_served_with_its_assets(served: ThreadServer) -> None:
    status, headers, body = http_get(served.http + "/")
    assert status == 200
    assert headers["Content-Type"] == "text/html; charset=utf-8"
    assert "script-src 'self'" in headers["Content-Security-Policy"]
    assert headers["Referrer-Policy"] == "no-referrer"
    assert '<option value="ws" data-path="/ws" data-auth="yes">/ws</option>' in body
    assert '<option value="limited" data-path="/limited"' in body
    assert SECRET not in body  # secrets never reach the page
    assert "http://" not in body.replace("http://www.w3.org/2000/svg", "")  # nothing external
    for name, kind in (("playground.js", "text/javascript"), ("playground.css", "text/css")):
        assert f'href="_playground/{name}?v=' in body or f'src="_playground/{name}?v=' in body
        status, headers, asset = http_get(f"{served.http}/_playground/{name}")
        assert status == 200, name
        assert headers["Content-Type"].startswith(kind)
        assert "http://" not in asset and "https://" not in asset
    # The vendored libraries (their own URLs are in comments and namespace names: the CSP is what
    # keeps the page from loading anything, see test_playground_md.py).
    for name, banner in (("marked.umd.js", "marked v"), ("purify.min.js", "DOMPurify 3.")):
        assert f'src="_playground/vendor/{name}?v=' in body
        status, headers, asset = http_get(f"{served.http}/_playground/vendor/{name}")
        assert status == 200, name
        assert headers["Content-Type"].startswith("text/javascript")
        assert banner in asset[:400]


def test_page_escapes_connector_paths(serve: Callable[[web.Application], ThreadServer]) -> None:
    config = make_config({"path": '/ws"><script>alert(1)</script>'})
    server = serve(connic.create_app(config))
    _, _, body = http_get(server.http + "/")
    assert "<script>alert(1)</script>" not in body
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in body
    assert "\\u003cscript\\u003e" in body  # the JSON config is escaped as well


async def test_playground_off_gives_404(start_server: StartServer) -> None:
    import aiohttp

    config = make_config()
    config["server"] = {"playground": False}
    server = await start_server(config)
    async with aiohttp.ClientSession() as session:
        for path in ("/", "/_playground/playground.js"):
            async with session.get(server.http + path) as response:
                assert response.status == 404, path
        async with session.get(server.http + "/metrics") as response:
            assert response.status == 200  # the rest of the app is unchanged


def test_prefixed_page_redirects_to_its_slash(serve: Callable[[web.Application], ThreadServer]) -> None:
    host = web.Application()
    connic.setup(host, make_config(), prefix="/chat")
    server = serve(host)
    status, headers, _ = http_get(server.http + "/chat?secret=x")
    assert status == 302
    assert headers["Location"] == "chat/?secret=x"
    assert http_get(server.http + "/chat/")[0] == 200
    assert http_get(server.http + "/chat/_playground/playground.css")[0] == 200
    assert http_get(server.http + "/")[0] == 404  # the host's root stays the host's


# --- tests: the browser -------------------------------------------------------------------------


def test_reply_streams_live_with_usage(tab: Tab, served: ThreadServer, capsys: pytest.CaptureFixture[str]) -> None:
    page = tab.page
    tab.open(f"{served.http}/?secret={SECRET}")
    assert page.input_value("#secret") == SECRET
    assert page.text_content("#connector-url") == f"ws://127.0.0.1:{served.port}/ws"
    session_id = tab.connect()
    assert UUID.match(session_id), session_id
    assert page.locator("#agents .chip").all_inner_texts() == ["assistant"]
    assert tab.sent[0] == {"secret": SECRET}  # the seed's auth frame

    # Every change of the reply's text, with the bubble's state at that moment.
    page.evaluate(
        """() => {
        window.seen = [];
        new MutationObserver(() => {
          const turn = document.querySelector('.turn.agent');
          if (turn) window.seen.push([turn.querySelector('.text').textContent, turn.dataset.state]);
        }).observe(document.getElementById('log'), {subtree: true, childList: true, characterData: true});
    }"""
    )
    tab.say(WORDS)
    assert page.input_value("#message") == ""
    reply = tab.reply("msg-001")
    # Partial text in the DOM while the reply is still streaming (before stream_end).
    page.wait_for_function(
        """() => {
        const turn = document.querySelector('.turn.agent[data-state="streaming"]');
        return turn && turn.querySelector('.text').textContent.trim().split(/\\s+/).length >= 3;
    }"""
    )
    partial = reply.locator(".text").text_content()
    assert reply.get_attribute("data-state") == "streaming"
    assert partial and WORDS.startswith(partial) and len(partial) < len(WORDS)

    page.wait_for_selector('.turn.agent[data-state="done"]')
    assert reply.locator(".text").text_content() == WORDS
    assert " ".join(reply.locator(".meta").inner_text().split()) == "stop tokens: 15 prompt · 15 candidates"
    seen = page.evaluate("window.seen")
    growing = sorted({len(text) for text, state in seen if state == "streaming" and text})
    assert len(growing) >= 10, growing  # one step per chunk, not one jump at the end
    assert tab.sent[1] == {"type": "message", "id": "msg-001", "payload": {"message": WORDS}}
    assert page.locator('.exchange[data-id="msg-001"] .turn.user .meta').inner_text() == "message #1"
    screenshot(tab, "playground-exchange.png", capsys)


def test_stop_cancels_mid_stream(tab: Tab, served: ThreadServer) -> None:
    page = tab.page
    tab.open(f"{served.http}/?secret={SECRET}")
    tab.connect()
    assert page.is_disabled("#stop")
    tab.say(WORDS)
    reply = tab.reply("msg-001")
    page.wait_for_function(
        "() => (document.querySelector('.turn.agent .text') || {}).textContent?.split(' ').length >= 3"
    )
    page.click("#stop")
    page.wait_for_selector('.turn.agent[data-state="cancelled"]')
    assert {"type": "cancel", "id": "msg-001"} in tab.sent
    assert reply.locator(".meta .badge").inner_text() == "cancelled"
    text = reply.locator(".text").text_content()
    assert text and WORDS.startswith(text) and len(text) < len(WORDS)
    assert page.is_disabled("#stop")
    # The session goes on.
    tab.say("still here")
    page.wait_for_selector('.exchange[data-id="msg-002"] .turn.agent[data-state="done"]')


def test_wrong_secret_in_plain_words(tab: Tab, served: ThreadServer) -> None:
    page = tab.page
    tab.open(f"{served.http}/?secret=not-the-secret")
    page.click("#connect")
    page.wait_for_selector(".notice.error")
    assert tab.notices()[-1] == "Wrong secret: the server refused it. Check it and connect again. close 4001"
    assert page.text_content("#status-text") == "Refused"
    assert page.is_disabled("#message")
    # No secret at all says so.
    page.fill("#secret", "")
    page.click("#reconnect")
    page.wait_for_selector(".notice.error >> nth=1")
    assert tab.notices()[-1] == "This connector needs a secret: enter it and connect again. close 4001"
    # And the right one connects.
    page.fill("#secret", SECRET)
    page.click("#connect")
    page.wait_for_selector("#session:not([hidden])")


def test_enter_sends_shift_enter_adds_a_line_and_context(tab: Tab, served: ThreadServer) -> None:
    page = tab.page
    tab.open(f"{served.http}/?secret={SECRET}")
    tab.connect()
    page.click("#message")
    page.keyboard.type("first line")
    page.keyboard.press("Shift+Enter")
    page.keyboard.type("second")
    assert page.input_value("#message") == "first line\nsecond"
    assert len(tab.sent) == 1  # only the auth frame so far
    page.click("#extras summary")
    page.fill("#context", "[1, 2")
    page.press("#message", "Enter")
    assert page.text_content("#context-error").startswith("Context is not valid JSON")
    assert len(tab.sent) == 1
    page.fill("#context", '{"location": "New York"}')
    page.press("#message", "Enter")
    page.wait_for_selector('.turn.agent[data-state="done"]')
    assert tab.sent[1] == {
        "type": "message",
        "id": "msg-001",
        "payload": {"message": "first line\nsecond", "context": {"location": "New York"}},
    }
    # Markdown with single newlines kept as line breaks (<br>).
    assert tab.reply("msg-001").locator(".text").inner_text() == "first line\nsecond"
    assert page.get_attribute("#message", "aria-describedby") == "compose-hint"
    for field in ("connector", "secret", "message", "context", "agent"):
        assert page.locator(f'label[for="{field}"]').count() == 1, field


def test_reconnect_starts_a_new_session(tab: Tab, served: ThreadServer) -> None:
    page = tab.page
    tab.open(f"{served.http}/?secret={SECRET}")
    first = tab.connect()
    page.click("#reconnect")
    page.wait_for_function("(first) => document.getElementById('session-id').textContent !== first", arg=first)
    second = str(page.text_content("#session-id"))
    assert UUID.match(second) and second != first
    assert any(n.startswith("Reconnecting: a new connection is a new session.") for n in tab.notices())
    tab.say("again")
    page.wait_for_selector('.turn.agent[data-state="done"]')
    page.click("#disconnect")
    page.wait_for_selector("#message:disabled")
    assert tab.notices()[-1] == "Disconnected. close 1000"


def test_message_limit_in_plain_words(tab: Tab, served: ThreadServer) -> None:
    page = tab.page
    tab.open(f"{served.http}/?secret={SECRET}&connector=/limited")
    assert page.input_value("#connector") == "limited"
    tab.connect()
    assert "1 message per session" in str(page.text_content("#limits"))
    tab.say("one")
    tab.say("two")
    page.wait_for_selector("text=close 4009")
    assert tab.notices()[-1] == (
        "Message limit reached: a session allows 1 message. Reconnect to start a new session. close 4009"
    )
    assert tab.reply("msg-001").get_attribute("data-state") == "done"


@pytest.mark.parametrize(
    ("code", "close", "words"),
    [
        ("session_expired", 4008, "Session expired after 60 s idle. Reconnect to start a new session."),
        ("auth_timeout", 4002, "No secret arrived in time, so the server closed the connection."),
        ("server_shutting_down", 1001, "The server is shutting down."),
        ("slow_consumer", 4010, "This page fell too far behind reading replies, so the server closed the connection."),
        ("message_too_large", 1009, "Message too large: the server closed the connection."),
        (None, 1011, "The server hit an internal error and closed the connection."),
    ],
)
def test_close_codes_in_plain_words(tab: Tab, served: ThreadServer, code: str | None, close: int, words: str) -> None:
    # Closes that take long to provoke for real: a scripted server stands in for connic.
    page = tab.page

    def handler(ws: Any) -> None:
        def on_message(message: str | bytes) -> None:
            ws.send(json.dumps({"type": "connected", "session_id": "s", "agents": ["a"], "session_timeout": 60}))
            if code is not None:
                ws.send(json.dumps({"type": "error", "id": None, "code": code, "message": "m"}))
            ws.close(code=close, reason=code or "")

        ws.on_message(on_message)

    page.route_web_socket(re.compile(r".*/ws$"), handler)
    tab.open(f"{served.http}/?secret={SECRET}")
    page.click("#connect")
    page.wait_for_selector(f"text=close {close}")
    assert tab.notices()[-1] == f"{words} close {close}"


def test_page_under_an_embedding_prefix(tab: Tab, serve: Callable[[web.Application], ThreadServer]) -> None:
    async def home(request: web.Request) -> web.Response:
        return web.Response(text="the host's own page")

    host = web.Application()
    host.router.add_get("/", home)
    connic.setup(host, echo_config(), prefix="/chat")
    server = serve(host)
    page = tab.page
    tab.open(f"{server.http}/chat?secret={SECRET}")  # redirected to /chat/
    assert page.url == f"{server.http}/chat/?secret={SECRET}"
    assert page.text_content("#connector-url") == f"ws://127.0.0.1:{server.port}/chat/ws"
    tab.connect()
    tab.say("under a prefix")
    page.wait_for_selector('.turn.agent[data-state="done"]')
    assert tab.reply("msg-001").locator(".text").text_content() == "under a prefix"
    assert http_get(server.http + "/")[2] == "the host's own page"


def test_page_when_installed_at_the_host_root(tab: Tab, serve: Callable[[web.Application], ThreadServer]) -> None:
    async def home(request: web.Request) -> web.Response:
        return web.Response(text="the host's own page")

    host = web.Application()
    host.router.add_get("/", home)
    connic.setup(host, make_config(), prefix=None)  # connic's routes in the host app itself
    server = serve(host)
    assert http_get(server.http + "/")[2] == "the host's own page"
    page = tab.page
    tab.open(f"{server.http}/connic/?secret={SECRET}")
    assert page.text_content("#connector-url") == f"ws://127.0.0.1:{server.port}/ws"
    tab.connect()
    tab.say("at the root")
    page.wait_for_selector('.turn.agent[data-state="done"]')
