"""Helpers of the resume tests (PROTOCOL.md sections 7 and 8): a resuming client, a transcript of
sequenced frames kept by ``seq``, a TCP drop without a close frame, and a wait on the metrics.

Every test opens real ``websockets`` clients against a real server on loopback; every wait
is bounded (a timeout per frame). A session's frames are kept in one :class:`Transcript`
across its connections, so a test can check that what the client ends up with has no gap
and no duplicate, while each :class:`Conn` also keeps what arrived on it, in order.

The fixtures the resume and history tests share are here too (``store_url``, ``start_server``,
``clients``): a test module imports them, and every test in it runs against each session store.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import struct
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from typing import Any

import aiohttp
import pytest
import websockets
from redis_server import flush, running_redis, with_store
from websockets.asyncio.client import ClientConnection

from conftest import SECRET, Server, StartServer, make_config
from helpers import test_registry

__all__ = [
    "ENDS",
    "SEQUENCED",
    "Clients",
    "Conn",
    "ResumeSession",
    "Transcript",
    "clients_fixture",
    "is_sequenced",
    "serve",
    "start_server",
    "store_url",
    "wait_turns",
    "words",
]

Frame = dict[str, Any]

SEQUENCED = frozenset(
    {"ack", "stream_start", "stream_chunk", "stream_end", "response", "tool_call", "tool_result", "progress"}
)
"""Frame types that always belong to a message (an ``error`` does when its ``id`` is not null)."""
ENDS = frozenset({"stream_end", "response", "error"})
"""The frames that end one agent's reply."""


def is_sequenced(frame: Frame) -> bool:
    """Whether PROTOCOL.md section 7 says ``frame`` carries a ``seq``."""
    kind = frame.get("type")
    return kind in SEQUENCED or (kind == "error" and frame.get("id") is not None)


def words(count: int, prefix: str = "w") -> str:
    """``"w0 w1 ... w{count-1}"``: the echo agent streams it as ``count`` chunks."""
    return " ".join(f"{prefix}{i}" for i in range(count))


class Transcript:
    """A session's sequenced frames as the client holds them, by ``seq``.

    A frame whose ``seq`` is already held is not kept again but noted in
    :attr:`duplicates`, so a test can assert that the server never sent one twice.
    """

    def __init__(self) -> None:
        self.by_seq: dict[int, Frame] = {}
        self.duplicates: list[Frame] = []

    def add(self, frame: Frame) -> None:
        seq = frame["seq"]
        assert isinstance(seq, int) and not isinstance(seq, bool) and seq >= 1, frame
        if seq in self.by_seq:
            self.duplicates.append(frame)
        else:
            self.by_seq[seq] = frame

    @property
    def last_seq(self) -> int:
        """The highest ``seq`` held (0 when none)."""
        return max(self.by_seq, default=0)

    def keep_up_to(self, last_seq: int) -> None:
        """Forget the frames after ``last_seq`` (a client that lost them, or never stored them)."""
        self.by_seq = {seq: f for seq, f in self.by_seq.items() if seq <= last_seq}

    def ordered(self) -> list[Frame]:
        """The frames held, by ``seq``."""
        return [self.by_seq[seq] for seq in sorted(self.by_seq)]

    def assert_complete(self) -> None:
        """Held seqs are exactly 1..N and nothing arrived twice."""
        assert not self.duplicates, f"frames received twice: {self.duplicates}"
        seqs = sorted(self.by_seq)
        assert seqs == list(range(1, len(seqs) + 1)), f"gap in the sequence numbers: {seqs}"

    def of(self, message_id: Any, agent: str | None = None) -> list[Frame]:
        """The frames of one message (and, if given, one agent), by ``seq``."""
        return [
            f
            for f in self.ordered()
            if f.get("id") == message_id and (agent is None or f.get("agent") == agent or f["type"] == "ack")
        ]

    def chunks(self, message_id: Any, agent: str) -> list[str]:
        """One agent's chunk texts for one message, by ``seq``."""
        return [
            f["chunk"]
            for f in self.ordered()
            if f["type"] == "stream_chunk" and f["id"] == message_id and f["agent"] == agent
        ]

    def end(self, message_id: Any, agent: str) -> Frame | None:
        """The frame that ended one agent's reply to one message, if held."""
        for f in self.ordered():
            if f["type"] in ENDS and f.get("id") == message_id and f.get("agent") == agent:
                return f
        return None

    def ended(self, expected: Mapping[Any, Iterable[str]]) -> bool:
        """Whether every ``{message id: agents}`` reply has its ack and its end."""
        for message_id, agents in expected.items():
            if not any(f["type"] == "ack" and f["id"] == message_id for f in self.by_seq.values()):
                return False
            if any(self.end(message_id, agent) is None for agent in agents):
                return False
        return True


class Conn:
    """One ``websockets`` connection; every frame received is kept, sequenced ones also in the transcript."""

    def __init__(self, ws: ClientConnection, transcript: Transcript, *, strict: bool = True) -> None:
        self.ws = ws
        self.transcript = transcript
        self.strict = strict  # check each frame's seq on arrival: a missing one fails at once, not by a timeout
        self.frames: list[Frame] = []  # every frame received on this connection, in order
        self.seqs: list[int] = []  # the seqs received on this connection, in order
        self.connected: Frame = {}

    async def send(self, frame: Any) -> None:
        await self.ws.send(frame if isinstance(frame, str | bytes) else json.dumps(frame))

    async def recv(self, timeout: float = 10.0) -> Frame:
        frame: Frame = json.loads(await asyncio.wait_for(self.ws.recv(), timeout))
        self.frames.append(frame)
        if self.strict:
            assert ("seq" in frame) == is_sequenced(frame), f"seq wrongly present or missing: {frame}"
        if "seq" in frame:
            self.seqs.append(frame["seq"])
            self.transcript.add(frame)
        return frame

    async def until(self, predicate: Callable[[Frame], bool], timeout: float = 10.0) -> list[Frame]:
        """Frames up to and including the first for which ``predicate`` holds."""
        got = []
        while True:
            frame = await self.recv(timeout)
            got.append(frame)
            if predicate(frame):
                return got

    async def until_type(self, kind: str, timeout: float = 10.0) -> list[Frame]:
        return await self.until(lambda f: f.get("type") == kind, timeout)

    async def until_ended(self, expected: Mapping[Any, Iterable[str]], timeout: float = 10.0) -> None:
        """Read until the transcript holds every expected reply's ack and end."""
        while not self.transcript.ended(expected):
            await self.recv(timeout)

    async def barrier(self, timeout: float = 10.0) -> list[Frame]:
        """Send ``ping`` and read up to its ``pong``: the frames that came before it."""
        await self.send({"type": "ping"})
        got = await self.until_type("pong", timeout)
        return got[:-1]

    def assert_seqs_follow(self, last_seq: int) -> None:
        """The seqs on this connection run last_seq+1, last_seq+2, ... in arrival order."""
        assert self.seqs == list(range(last_seq + 1, last_seq + 1 + len(self.seqs))), (last_seq, self.seqs)

    def drop(self) -> None:
        """Vanish: abort the TCP connection with a reset; no close frame is sent."""
        sock = self.ws.transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.ws.transport.abort()

    async def closed(self, timeout: float = 10.0) -> tuple[int | None, list[Frame]]:
        """Read until the server closes; the close code and the frames before it."""
        got: list[Frame] = []
        try:
            async with asyncio.timeout(timeout):
                while True:
                    got.append(await self.recv(timeout))
        except websockets.ConnectionClosed:
            pass
        return self.ws.close_code, got


class Clients:
    """Opens client connections and closes whatever is left open at the end (``async with``)."""

    def __init__(self) -> None:
        self.opened: list[ClientConnection] = []

    async def open(self, url: str, transcript: Transcript | None = None, *, strict: bool = True, **kwargs: Any) -> Conn:
        ws = await websockets.connect(url, open_timeout=10, proxy=None, **kwargs)
        self.opened.append(ws)
        return Conn(ws, transcript if transcript is not None else Transcript(), strict=strict)

    async def __aenter__(self) -> Clients:
        return self

    async def __aexit__(self, *exc: object) -> None:
        for ws in self.opened:
            await ws.close()


class ResumeSession:
    """The client side of one session: who it is, what it has seen, its current connection."""

    def __init__(self, clients: Clients, url: str, secret: str | None = SECRET, *, strict: bool = True) -> None:
        self.clients = clients
        self.url = url
        self.secret = secret
        self.strict = strict
        self.transcript = Transcript()
        self.session_id = ""
        self.resume_token = ""
        self.conn: Conn | None = None

    async def start(self, **kwargs: Any) -> Conn:
        """Open a fresh session as a seed client does (``{"secret"}`` first) and read ``connected``."""
        conn = await self.clients.open(self.url, self.transcript, strict=self.strict, **kwargs)
        if self.secret is not None:
            await conn.send({"secret": self.secret})
        connected = await conn.recv()
        assert connected["type"] == "connected", connected
        conn.connected = connected
        self.session_id = connected["session_id"]
        self.resume_token = connected.get("resume_token", "")
        self.conn = conn
        return conn

    def resume_frame(self, last_seq: int | None = None, *, secret: str | None = None) -> Frame:
        """The ``resume`` frame for this session (a test may change its fields before sending it)."""
        frame: Frame = {
            "type": "resume",
            "session_id": self.session_id,
            "resume_token": self.resume_token,
            "last_seq": self.transcript.last_seq if last_seq is None else last_seq,
        }
        if secret is not None:
            frame["secret"] = secret
        return frame

    async def resume(
        self,
        last_seq: int | None = None,
        *,
        secret: str | None = None,
        with_secret: bool = True,
        url: str | None = None,
        **kwargs: Any,
    ) -> Conn:
        """Open a connection that resumes this session from ``last_seq`` (default: the last seq held).

        The frame carries ``secret`` if given, else the session's secret unless ``with_secret``
        is false (the handshake carries it, or auth is off). Returns once ``connected``
        came, whatever it says. A successful resume makes the new connection the session's
        and adds its frames to the session's transcript; a fresh session gets a transcript
        of its own (see :meth:`fresh`).
        """
        if secret is None and with_secret:
            secret = self.secret
        frame = self.resume_frame(last_seq, secret=secret)
        conn = await self.clients.open(url or self.url, Transcript(), strict=self.strict, **kwargs)
        await conn.send(frame)
        if "resumed" not in await self.read_connected(conn):
            # The handshake authenticated (or auth is off): a fresh session was announced as
            # the socket opened, and the answer to the resume frame follows it.
            await self.read_connected(conn)
        return conn

    async def read_connected(self, conn: Conn, timeout: float = 10.0) -> Frame:
        """Read ``connected`` on a resuming connection and adopt the connection if it resumed."""
        connected = await conn.recv(timeout)
        assert connected["type"] == "connected", connected
        assert "seq" not in connected, connected
        conn.connected = connected
        if connected.get("resumed") is True:
            conn.transcript = self.transcript
            self.conn = conn
        return connected

    def fresh(self, conn: Conn) -> ResumeSession:
        """The fresh session a failed resume opened on ``conn``."""
        session = ResumeSession(self.clients, self.url, self.secret, strict=self.strict)
        session.transcript = conn.transcript
        session.session_id = conn.connected["session_id"]
        session.resume_token = conn.connected.get("resume_token", "")
        session.conn = conn
        return session

    def drop(self) -> None:
        """Drop the current connection without a close frame."""
        assert self.conn is not None
        self.conn.drop()


# --- waiting on the server's own accounting -------------------------------------------

_TURNS = re.compile(r'^connic_turns_total\{agent="([^"]*)",reason="([^"]*)"\} (\S+)$', re.MULTILINE)


async def turns(http: str) -> dict[tuple[str, str], float]:
    """``connic_turns_total`` by (agent, finish reason), scraped from ``http``/metrics."""
    async with aiohttp.ClientSession() as session, session.get(http + "/metrics") as response:
        assert response.status == 200
        text = await response.text()
    return {(m.group(1), m.group(2)): float(m.group(3)) for m in _TURNS.finditer(text)}


async def wait_turns(http: str, agent: str, count: int, reason: str = "stop", timeout: float = 15.0) -> None:
    """Wait until ``agent`` finished ``count`` turns with ``reason``: a reply ended with no client attached."""
    deadline = time.monotonic() + timeout
    while True:
        seen = (await turns(http)).get((agent, reason), 0)
        if seen >= count:
            return
        assert time.monotonic() < deadline, f"{agent} finished {seen} turns ({reason}), expected {count}"
        await asyncio.sleep(0.02)


# --- fixtures (imported by the test modules) -------------------------------------------------


@pytest.fixture(scope="module", params=["memory", "redis"])
def store_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str | None]:
    """Every test runs against each session store: None for ``memory``, else the URL of one
    ``redis-server`` per module (tests/redis_server.py)."""
    if request.param == "memory":
        yield None
        return
    with running_redis(tmp_path_factory.mktemp("redis")) as redis:
        yield redis.url


@pytest.fixture
def start_server(start_server: StartServer, store_url: str | None) -> StartServer:
    """conftest's ``start_server``, the apps keeping their sessions in the store under test (Redis emptied first)."""
    if store_url is None:
        return start_server
    flush(store_url)
    return with_store(start_server, store_url)


@pytest.fixture(name="clients")
async def clients_fixture() -> AsyncIterator[Clients]:
    """A :class:`Clients`, every connection closed at the end."""
    async with Clients() as opened:
        yield opened


async def serve(
    start_server: StartServer,
    connector: dict[str, Any] | None = None,
    agents: dict[str, Any] | None = None,
) -> Server:
    """A server with the test agents (inspect, slow, fail ...) registered too."""
    return await start_server(make_config(connector, agents), registry=test_registry())
