"""The playground resumes a dropped session by itself (PROTOCOL.md section 7), in headless Chromium.

The real-server tests serve the page *through* tests/tcp_proxy.py, so its HTTP requests and
its WebSocket both cross the proxy; cutting the proxy's connections mid-reply is a TCP drop
(no close frame), which the page must ride out: reconnect with backoff, send ``resume`` with
the highest ``seq`` it saw, and keep filling the same bubble.

The scripted tests stand in for the server where a real one cannot be made to misbehave on
purpose (replaying frames the page has already seen) or where they pin the page's answer to
each kind of ``connected`` (recovered or not, resumed or not, taken over).
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from tcp_proxy import TcpProxy
from test_playground import Tab, ThreadServer

import connic
from conftest import SECRET, make_config

sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed (test extra)")

WORDS = " ".join(f"word{n}" for n in range(1, 31))  # 30 words, 0.1 s each: a 3 s reply
LONG = " ".join(f"word{n}" for n in range(1, 61))  # still streaming after a break of a second or two
WAIT_MS = 20_000


# --- a real server behind a proxy ---------------------------------------------------------------


class Proxied:
    """A connic server in a thread and a TcpProxy in front of it, on the server's event loop."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.server = ThreadServer(connic.create_app(config)).start()
        self.proxy = self._run(TcpProxy(self.server.port).start())

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.server.loop).result(10)

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.proxy.port}"

    def cut(self) -> int:
        """Drop every connection through the proxy; how many were open."""
        return int(self._run(self.proxy.cut()))

    def refuse(self, refusing: bool) -> None:
        self.server.loop.call_soon_threadsafe(setattr, self.proxy, "refusing", refusing)

    def stop(self) -> None:
        self._run(self.proxy.close())
        self.server.stop()


@pytest.fixture
def proxied() -> Iterator[Callable[[dict[str, Any]], Proxied]]:
    started: list[Proxied] = []

    def start(config: dict[str, Any]) -> Proxied:
        started.append(Proxied(config))
        return started[-1]

    yield start
    for item in started:
        item.stop()


def slow_echo(**connector: Any) -> dict[str, Any]:
    return make_config(connector, agents={"assistant": {"use": "echo", "delay": 0.1}})


class Handshakes:
    """The ``Sec-WebSocket-Extensions`` each WebSocket handshake of the page was answered with (CDP)."""

    def __init__(self, page: Any) -> None:
        self.extensions: list[str] = []
        self._cdp = page.context.new_cdp_session(page)
        self._cdp.on("Network.webSocketHandshakeResponseReceived", self._answered)
        self._cdp.send("Network.enable")

    def _answered(self, params: dict[str, Any]) -> None:
        headers = {name.lower(): value for name, value in params["response"]["headers"].items()}
        self.extensions.append(headers.get("sec-websocket-extensions", ""))

    def check(self, compress: bool, sockets: int) -> None:
        """Every handshake so far (at least ``sockets``) took permessage-deflate exactly when ``compress``."""
        assert len(self.extensions) >= sockets, self.extensions
        assert all(("permessage-deflate" in value) is compress for value in self.extensions), self.extensions


class Sockets:
    """Every WebSocket the page opens, with the frames it received, in order."""

    def __init__(self, page: Any) -> None:
        self.received: list[list[dict[str, Any]]] = []
        page.on("websocket", self._watch)

    def _watch(self, ws: Any) -> None:
        frames: list[dict[str, Any]] = []
        self.received.append(frames)
        ws.on("framereceived", lambda payload: frames.append(json.loads(payload)))


@pytest.fixture
def tab(browser: Any) -> Iterator[Tab]:
    context = browser.new_context(viewport={"width": 1100, "height": 820})
    tab = Tab(context.new_page())
    tab.page.set_default_timeout(WAIT_MS)
    yield tab
    context.close()
    assert not tab.errors, tab.errors


def words_shown(tab: Tab, n: int) -> None:
    tab.page.wait_for_function(
        """(n) => {
        const turn = document.querySelector('.turn.agent[data-state="streaming"]');
        return turn && turn.querySelector('.text').textContent.trim().split(/\\s+/).length >= n;
    }""",
        arg=n,
    )


def record_texts(tab: Tab) -> None:
    """Keep every text the first agent bubble shows (window.seen), to catch a duplicate on the way."""
    tab.page.evaluate(
        """() => {
        window.seen = [];
        new MutationObserver(() => {
          const turn = document.querySelector('.turn.agent');
          if (turn) window.seen.push(turn.querySelector('.text').textContent);
        }).observe(document.getElementById('log'), {subtree: true, childList: true, characterData: true});
    }"""
    )


def resume_frames(tab: Tab) -> list[dict[str, Any]]:
    return [frame for frame in tab.sent if frame.get("type") == "resume"]


# --- tests: a real server, a real TCP drop ------------------------------------------------------------


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "deflate"])
def test_reply_continues_in_place_after_a_tcp_drop(tab: Tab, proxied: Callable[..., Proxied], compress: bool) -> None:
    # Browsers always offer permessage-deflate: with compress on, every frame of this page is deflated.
    target = proxied(slow_echo(compress=compress, heartbeat=1))
    page = tab.page
    handshakes = Handshakes(page)
    sockets = Sockets(page)
    tab.open(f"{target.http}/?secret={SECRET}")
    assert page.text_content("#connector-url") == f"ws://127.0.0.1:{target.proxy.port}/ws"  # through the proxy
    session_id = tab.connect()
    connected = sockets.received[0][0]
    assert connected["type"] == "connected" and isinstance(connected.get("resume_token"), str), connected
    record_texts(tab)
    tab.say(WORDS)
    words_shown(tab, 5)
    assert target.cut() >= 1  # the WebSocket (and any idle HTTP connection) dropped, no close frame

    page.wait_for_selector('.turn.agent[data-state="done"]')
    reply = tab.reply("msg-001")
    assert reply.locator(".text").text_content() == WORDS
    assert page.locator(".turn.agent").count() == 1  # the same bubble, not a second one
    assert page.locator(".exchange").count() == 1
    # Every text shown on the way was a prefix of the reply: no word twice, none skipped.
    seen = [text for text in page.evaluate("window.seen") if text]
    assert seen and all(WORDS.startswith(text) for text in seen), [t for t in seen if not WORDS.startswith(t)]

    first, second = sockets.received[0], sockets.received[1]
    seqs = [frame["seq"] for frame in first if "seq" in frame]
    assert seqs == list(range(1, len(seqs) + 1)) and len(seqs) >= 5  # ack, stream_start, chunks
    assert not any(frame["type"] == "stream_end" for frame in first)  # the drop came mid-reply
    (resume,) = resume_frames(tab)
    assert resume == {
        "type": "resume",
        "session_id": session_id,
        "resume_token": connected["resume_token"],
        "last_seq": seqs[-1],
        "secret": SECRET,
    }
    assert second[0]["type"] == "connected"
    assert second[0]["session_id"] == session_id
    assert second[0]["resumed"] is True and second[0]["recovered"] is True
    later = [frame["seq"] for frame in second if "seq" in frame]
    assert later[0] == seqs[-1] + 1 and later == list(range(later[0], later[0] + len(later)))
    assert second[-1]["type"] == "stream_end" and second[-1]["full_response"] == WORDS
    assert page.text_content("#session-id") == session_id
    assert page.text_content("#status-text") == "Connected"
    assert any(n.startswith("Reconnected") for n in tab.notices())

    # The session goes on: the next message is the session's second.
    tab.say("and again")
    page.wait_for_selector('.exchange[data-id="msg-002"] .turn.agent[data-state="done"]')
    assert page.locator('.exchange[data-id="msg-002"] .turn.user .meta').inner_text() == "message #2"

    # Idle past 1.5 heartbeats (twice over): the browser answers the server's pings, so it stays.
    page.wait_for_timeout(3000)
    assert page.text_content("#status-text") == "Connected"
    assert len(sockets.received) == 2 and target.proxy.open_connections >= 1
    tab.say("still here")
    page.wait_for_selector('.exchange[data-id="msg-003"] .turn.agent[data-state="done"]')
    assert len(sockets.received) == 2
    handshakes.check(compress, 2)


def test_evicted_frames_rebuild_from_history(tab: Tab, proxied: Callable[..., Proxied]) -> None:
    # A replay log of one frame cannot bridge a break of several chunks: recovered is false.
    target = proxied(slow_echo(replay_buffer=1))
    page = tab.page
    sockets = Sockets(page)
    tab.open(f"{target.http}/?secret={SECRET}")
    tab.connect()
    tab.say("before the break")
    page.wait_for_selector('.exchange[data-id="msg-001"] .turn.agent[data-state="done"]')
    tab.say(LONG)
    words_shown(tab, 3)
    target.refuse(True)
    assert target.cut() >= 1
    page.wait_for_selector('#status[data-status="reconnecting"]')
    page.wait_for_timeout(1000)  # the reply streams on, past what a 1-frame log can replay
    target.refuse(False)

    page.wait_for_selector('.exchange[data-id="msg-002"] .turn.agent[data-state="done"]')
    resumed = next(frames for frames in sockets.received[1:] if frames and frames[0].get("resumed"))
    assert resumed[0]["recovered"] is False
    assert {"type": "history"} in tab.sent
    assert tab.reply("msg-002").locator(".text").text_content() == LONG
    assert tab.reply("msg-001").locator(".text").text_content() == "before the break"
    assert page.locator(".turn.agent").count() == 2
    assert [page.locator(".exchange").nth(i).get_attribute("data-id") for i in range(2)] == ["msg-001", "msg-002"]
    assert "Conversation reloaded from the server." in tab.notices()


def test_expired_session_starts_a_new_one(tab: Tab, proxied: Callable[..., Proxied]) -> None:
    target = proxied(slow_echo(resume_window=1))
    page = tab.page
    tab.open(f"{target.http}/?secret={SECRET}")
    first = tab.connect()
    tab.say("hello")
    page.wait_for_selector('.turn.agent[data-state="done"]')
    target.refuse(True)
    assert target.cut() >= 1
    page.wait_for_selector('#status[data-status="reconnecting"]')
    page.wait_for_timeout(2500)  # past the 1 s resume window
    target.refuse(False)

    page.wait_for_function("(first) => document.getElementById('session-id').textContent !== first", arg=first)
    second = str(page.text_content("#session-id"))
    assert second != first
    assert resume_frames(tab)[-1]["session_id"] == first
    assert f"The session could not be resumed: a new session {second} started." in tab.notices()
    page.wait_for_selector("#message:enabled")
    tab.say("fresh")
    page.wait_for_selector('.exchange[data-id="msg-002"] .turn.agent[data-state="done"]')
    assert page.locator('.exchange[data-id="msg-002"] .turn.user .meta').inner_text() == "message #1"


def test_disconnect_ends_the_session_without_resuming(tab: Tab, proxied: Callable[..., Proxied]) -> None:
    target = proxied(slow_echo())
    page = tab.page
    tab.open(f"{target.http}/?secret={SECRET}")
    tab.connect()
    page.click("#disconnect")
    page.wait_for_selector("#message:disabled")
    assert tab.notices()[-1] == "Disconnected. close 1000"
    page.wait_for_timeout(800)  # longer than the first backoff: nothing reconnects
    assert resume_frames(tab) == []
    assert page.text_content("#status-text") == "Not connected"


# --- tests: a scripted server -------------------------------------------------------------------------


class Script:
    """A scripted connector at /ws (Playwright's WebSocket routing): ``on(n, frame)`` answers frame of socket n."""

    def __init__(self, page: Any, answer: Callable[[Any, int, dict[str, Any]], None]) -> None:
        self.sockets = 0
        self.got: list[tuple[int, dict[str, Any]]] = []
        self._answer = answer
        page.route_web_socket(re.compile(r".*/ws$"), self._route)

    def _route(self, ws: Any) -> None:
        self.sockets += 1
        n = self.sockets

        def on_message(message: str | bytes) -> None:
            frame = json.loads(message)
            self.got.append((n, frame))
            self._answer(ws, n, frame)

        ws.on_message(on_message)


def send(ws: Any, **frame: Any) -> None:
    ws.send(json.dumps(frame))


def stream(ws: Any, first_seq: int, msg: str, pieces: list[str]) -> int:
    """stream_start and one chunk per piece from seq first_seq; returns the next seq."""
    seq = first_seq
    send(ws, type="stream_start", id=msg, agent="assistant", seq=seq)
    for piece in pieces:
        seq += 1
        send(ws, type="stream_chunk", id=msg, agent="assistant", chunk=piece, seq=seq)
    return seq + 1


def connected(ws: Any, session: str = "s1", **extra: Any) -> None:
    send(ws, type="connected", session_id=session, agents=["assistant"], resume_token=f"token-{session}", **extra)


@pytest.fixture(scope="module")
def served() -> Iterator[ThreadServer]:
    """A plain server for the page itself; the scripted tests answer its WebSocket."""
    server = ThreadServer(connic.create_app(make_config())).start()
    yield server
    server.stop()


def test_replayed_frames_already_seen_are_skipped(tab: Tab, served: ThreadServer) -> None:
    full = "one two three four five"

    def answer(ws: Any, n: int, frame: dict[str, Any]) -> None:
        if n == 1 and "secret" in frame:
            connected(ws)
        elif n == 1 and frame.get("type") == "message":
            send(ws, type="ack", id="msg-001", message_number=1, seq=1)
            stream(ws, 2, "msg-001", ["one ", "two "])  # seq 2, 3, 4
            ws.close(code=1011, reason="")  # a server failure: resumable
        elif n == 2 and frame.get("type") == "resume":
            connected(ws, resumed=True, recovered=True, last_seq=7)
            # Seq 3 and 4 again, as a replay from a stale last_seq would: the page must skip them.
            send(ws, type="stream_chunk", id="msg-001", agent="assistant", chunk="one ", seq=3)
            send(ws, type="stream_chunk", id="msg-001", agent="assistant", chunk="two ", seq=4)
            send(ws, type="stream_chunk", id="msg-001", agent="assistant", chunk="three ", seq=5)
            send(ws, type="stream_chunk", id="msg-001", agent="assistant", chunk="four ", seq=6)
            send(ws, type="stream_chunk", id="msg-001", agent="assistant", chunk="four ", seq=6)
            send(ws, type="stream_chunk", id="msg-001", agent="assistant", chunk="five", seq=7)
            # No stream_end yet: the text must be right before stream_end could fix it up.

    page = tab.page
    script = Script(page, answer)
    tab.open(f"{served.http}/?secret={SECRET}")
    tab.connect()
    tab.say(full)
    page.wait_for_function(
        "(full) => (document.querySelector('.turn.agent .text') || {}).textContent === full", arg=full
    )
    assert script.got[-1] == (
        2,
        {"type": "resume", "session_id": "s1", "resume_token": "token-s1", "last_seq": 4, "secret": SECRET},
    )
    assert page.locator(".turn.agent").count() == 1
    assert page.get_attribute(".turn.agent", "data-state") == "streaming"
    assert page.text_content("#session-id") == "s1"
    notices = tab.notices()
    assert "The server hit an internal error and closed the connection. Reconnecting… close 1011" in notices
    assert notices[-1] == "Reconnected: the session goes on."


def test_recovered_false_rerenders_from_history(tab: Tab, served: ThreadServer) -> None:
    def answer(ws: Any, n: int, frame: dict[str, Any]) -> None:
        kind = frame.get("type")
        if n == 1 and "secret" in frame:
            connected(ws)
        elif n == 1 and kind == "message" and frame["id"] == "msg-001":
            send(ws, type="ack", id="msg-001", message_number=1, seq=1)
            seq = stream(ws, 2, "msg-001", ["first ", "reply"])
            send(ws, type="stream_end", id="msg-001", agent="assistant", full_response="first reply", seq=seq)
        elif n == 1 and kind == "message":
            send(ws, type="ack", id="msg-002", message_number=2, seq=6)
            stream(ws, 7, "msg-002", ["a "])  # seq 7, 8
            ws.close(code=1001, reason="")  # a drain: resumable
        elif n == 2 and kind == "resume":
            connected(ws, resumed=True, recovered=False, last_seq=20)
        elif n == 2 and kind == "history":
            entries = [
                {"role": "user", "text": "first", "id": "msg-001", "message_number": 1, "agent": None},
                {"role": "agent", "text": "first reply", "id": "msg-001", "message_number": 1, "agent": "assistant"},
                {"role": "user", "text": "second", "id": "msg-002", "message_number": 2, "agent": None},
            ]
            send(ws, type="history", entries=entries, last_seq=20)
            send(ws, type="stream_chunk", id="msg-002", agent="assistant", chunk="d", seq=21)
            send(ws, type="stream_end", id="msg-002", agent="assistant", full_response="a b c d", seq=22)

    page = tab.page
    script = Script(page, answer)
    tab.open(f"{served.http}/?secret={SECRET}")
    tab.connect()
    tab.say("first")
    page.wait_for_selector('.exchange[data-id="msg-001"] .turn.agent[data-state="done"]')
    tab.say("second")
    page.wait_for_selector('.exchange[data-id="msg-002"] .turn.agent[data-state="done"]')
    assert (2, {"type": "history"}) in script.got
    assert [frame["last_seq"] for n, frame in script.got if frame.get("type") == "resume"] == [8]
    assert [page.locator(".exchange").nth(i).get_attribute("data-id") for i in range(2)] == ["msg-001", "msg-002"]
    assert page.locator(".turn.agent").count() == 2
    assert tab.reply("msg-001").locator(".text").text_content() == "first reply"
    assert tab.reply("msg-002").locator(".text").text_content() == "a b c d"
    assert page.locator('.exchange[data-id="msg-001"] .turn.user .bubble').text_content() == "first"
    assert page.locator('.exchange[data-id="msg-001"] .turn.user .meta').inner_text() == "message #1"
    assert "Conversation reloaded from the server." in tab.notices()
    page.wait_for_selector("#message:enabled")


def test_resumed_false_says_a_new_session_started(tab: Tab, served: ThreadServer) -> None:
    def answer(ws: Any, n: int, frame: dict[str, Any]) -> None:
        if n == 1 and "secret" in frame:
            connected(ws)
        elif n == 1 and frame.get("type") == "message":
            send(ws, type="ack", id="msg-001", message_number=1, seq=1)
            stream(ws, 2, "msg-001", ["half "])
            ws.close(code=4010, reason="")  # slow_consumer: resumable
        elif n == 2 and frame.get("type") == "resume":
            connected(ws, session="s2", resumed=False)

    page = tab.page
    Script(page, answer)
    tab.open(f"{served.http}/?secret={SECRET}")
    tab.connect()
    tab.say("hello")
    page.wait_for_function("() => document.getElementById('session-id').textContent === 's2'")
    assert tab.notices()[-1] == "The session could not be resumed: a new session s2 started."
    assert tab.reply("msg-001").get_attribute("data-state") == "interrupted"
    page.wait_for_selector("#message:enabled")
    assert page.text_content("#status-text") == "Connected"


def test_taken_over_does_not_fight_back(tab: Tab, served: ThreadServer) -> None:
    def answer(ws: Any, n: int, frame: dict[str, Any]) -> None:
        if "secret" in frame:
            connected(ws)
            send(ws, type="error", id=None, code="session_taken_over", message="another connection resumed it")
            ws.close(code=4011, reason="session_taken_over")

    page = tab.page
    script = Script(page, answer)
    tab.open(f"{served.http}/?secret={SECRET}")
    page.click("#connect")
    page.wait_for_selector("text=close 4011")
    assert tab.notices()[-1] == (
        "Another connection resumed this session (another tab?), so this one was closed. close 4011"
    )
    page.wait_for_timeout(800)  # past the first backoff: no resume follows
    assert script.sockets == 1
    assert page.text_content("#status-text") == "Disconnected"
