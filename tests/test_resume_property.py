"""PROTOCOL.md section 7 as a property (hypothesis): a client that drops and resumes ends up
with what an undisturbed client gets.

Each example is a small conversation: 1-3 messages, on a connector with one or two echo
agents (small delays, so replies interleave and are in flight when the drop comes),
streaming on or off; later messages may be sent only after the first resume. The same
conversation is first run undisturbed on a session of its own (the reference), then on a
session whose connection is dropped (TCP reset, no close frame) once or twice, after a
drawn number of frames; each time the client keeps only its frames up to a drawn
``last_seq`` (as if the rest were lost on the way) and resumes from there. Before a drop
the client has seen the ack of every message it sent, as a real client knows which of its
messages the server took (a message that never reached the server is not the server's to
replay).

The property: ordered by ``seq``, the resuming client's frames are 1..N with no gap and no
duplicate, N is the reference's, and per (message id, agent) the chunk texts, the final
text, the finish reason and the frame types are the reference's; each connection got its
frames in ascending order from ``last_seq + 1``.

The servers (one per connector variant, shared by all examples of the test) run on an event
loop in a background thread, so the hypothesis test itself is synchronous code; every
example opens sessions of its own and ends them with a close 1000.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

import attrs
import pytest
from aiohttp.test_utils import TestServer
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from resume_helpers import Clients, Conn, ResumeSession, Transcript

import connic
from conftest import make_config

T = TypeVar("T")
WAIT = 3.0  # seconds per frame: a whole reply takes well under a second here

AGENTS = {"a": {"use": "echo", "delay": 0.004}, "b": {"use": "echo", "delay": 0.009}}
WORDS = ["hi", "you", "x", "yes", "abc", "ok"]
RAW = st.integers(0, 10**6)  # a raw draw for a drop point, see Plan


@attrs.frozen
class Message:
    id: str
    text: str
    agent: str | None  # payload.agent, or None: every agent of the connector answers
    late: bool  # sent only after the first resume

    def frame(self) -> dict[str, Any]:
        payload: dict[str, Any] = {"message": self.text}
        if self.agent is not None:
            payload["agent"] = self.agent
        return {"type": "message", "id": self.id, "payload": payload}


@attrs.frozen
class Conversation:
    agents: int  # 1: agent a only; 2: agents a and b
    streaming: bool
    messages: tuple[Message, ...]

    def answering(self, message: Message) -> list[str]:
        return [message.agent] if message.agent is not None else ["a", "b"][: self.agents]

    def expected(self, messages: tuple[Message, ...] | None = None) -> dict[Any, list[str]]:
        return {m.id: self.answering(m) for m in (self.messages if messages is None else messages)}


@st.composite
def conversations(draw: st.DrawFn) -> Conversation:
    agents = draw(st.sampled_from([1, 2]))
    streaming = draw(st.booleans())
    count = draw(st.integers(1, 3))
    early = draw(st.integers(1, count))  # messages[:early] are sent at once, the rest after the first resume
    names = [None, "a", "b"][: agents + 1]
    messages = tuple(
        Message(
            id=f"m{i}",
            text=" ".join(draw(st.lists(st.sampled_from(WORDS), min_size=1, max_size=6))),
            agent=draw(st.sampled_from(names)),
            late=i >= early,
        )
        for i in range(count)
    )
    return Conversation(agents, streaming, messages)


class Harness:
    """One server per connector variant and the clients, on a loop in a background thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.servers: dict[tuple[int, bool], TestServer] = {}
        for agents in (1, 2):
            for streaming in (True, False):
                linked = {name: AGENTS[name] for name in ["a", "b"][:agents]}
                config = make_config({"streaming": streaming, "max_messages": 10_000, "send_timeout": 2}, linked)
                server = TestServer(connic.create_app(config), host="127.0.0.1")
                self.run(server.start_server())
                self.servers[agents, streaming] = server

    def url(self, conversation: Conversation) -> str:
        return f"ws://127.0.0.1:{self.servers[conversation.agents, conversation.streaming].port}/ws"

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        async def stop() -> None:
            for server in self.servers.values():
                await server.close()

        try:
            self.run(stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()


@pytest.fixture
def harness() -> Iterator[Harness]:
    h = Harness()
    yield h
    h.close()


# --- one example ----------------------------------------------------------------------


async def undisturbed(clients: Clients, url: str, conversation: Conversation) -> Transcript:
    """The reference: every message sent at once, every frame read on one connection."""
    session = ResumeSession(clients, url)
    conn = await session.start()
    for message in conversation.messages:
        await conn.send(message.frame())
    await conn.until_ended(conversation.expected(), WAIT)
    assert await conn.barrier(WAIT) == []
    conn.assert_seqs_follow(0)
    session.transcript.assert_complete()
    await conn.ws.close(1000)
    return session.transcript


class Plan:
    """Where the drops come: per drop, two raw draws, mapped onto what is possible when the drop comes.

    The ranges depend on what has arrived by then, so the draws are taken beforehand and
    reduced modulo the range (hypothesis shrinks them to 0: drop at once, resume from 0).
    """

    def __init__(self, drops: list[tuple[int, int]]) -> None:
        self.drops = drops

    @staticmethod
    def pick(raw: int, high: int) -> int:
        """A value in 0..high from a raw draw."""
        return raw % (max(high, 0) + 1)


async def disturbed(clients: Clients, url: str, conversation: Conversation, reference: Transcript, plan: Plan) -> Any:
    session = ResumeSession(clients, url)
    conn = await session.start()
    accepted: set[str] = set()  # messages whose ack the client has seen, on any connection
    checks: list[tuple[Conn, int]] = [(conn, 0)]  # each connection and the last_seq it started after

    async def read_one(on: Conn) -> None:
        frame = await on.recv(WAIT)
        if frame.get("type") == "ack":
            accepted.add(frame["id"])

    early = tuple(m for m in conversation.messages if not m.late)
    sent = list(early)
    for message in early:
        await conn.send(message.frame())
    for drop, (raw_k, raw_last) in enumerate(plan.drops):
        sent_ids = {m.id for m in sent}
        total = sum(1 for f in reference.ordered() if f["id"] in sent_ids)  # frames the sent messages cause
        k = plan.pick(raw_k, total - session.transcript.last_seq)  # after 0..all of the frames still to come
        before = len(conn.seqs)
        while len(conn.seqs) - before < k:
            await read_one(conn)
        while not sent_ids <= accepted:
            await read_one(conn)
        conn.drop()
        last_seq = plan.pick(raw_last, session.transcript.last_seq)  # any seq up to the highest seen
        session.transcript.keep_up_to(last_seq)
        conn = await session.resume(last_seq)
        connected = conn.connected
        assert connected["resumed"] is True, connected
        assert connected["recovered"] is True, connected
        assert connected["session_id"] == session.session_id, connected
        assert last_seq <= connected["last_seq"] <= reference.last_seq, connected
        checks.append((conn, last_seq))
        if drop == 0:
            for message in conversation.messages:
                if message.late:
                    await conn.send(message.frame())
                    sent.append(message)
    await conn.until_ended(conversation.expected(), WAIT)
    assert [f for f in await conn.barrier(WAIT) if "seq" in f] == []  # nothing after the end
    for on, after in checks:
        on.assert_seqs_follow(after)
    await conn.ws.close(1000)
    return session.transcript


def summary(transcript: Transcript, conversation: Conversation) -> dict[tuple[str, str], dict[str, Any]]:
    """Per (message id, agent): the chunk texts, the end frame without seq, the frame types."""
    out = {}
    for message in conversation.messages:
        ack = [f for f in transcript.of(message.id) if f["type"] == "ack"]
        for name in conversation.answering(message):
            frames = [f for f in transcript.of(message.id, name) if f["type"] != "ack"]
            end = transcript.end(message.id, name)
            assert end is not None
            out[message.id, name] = {
                "ack": [{k: v for k, v in f.items() if k != "seq"} for f in ack],
                "chunks": transcript.chunks(message.id, name),
                "end": {k: v for k, v in end.items() if k != "seq"},
                "types": sorted({f["type"] for f in frames}),
            }
    return out


# --- the property -------------------------------------------------------------------


def test_resumed_client_ends_up_with_what_an_undisturbed_one_gets(harness: Harness) -> None:
    @settings(
        max_examples=25,
        deadline=None,
        database=None,
        # The examples are small already; without shrinking a failing run stays bounded too
        # (a missing frame costs a receive timeout per example tried).
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(conversation=conversations(), drops=st.lists(st.tuples(RAW, RAW), min_size=1, max_size=2))
    def check(conversation: Conversation, drops: list[tuple[int, int]]) -> None:
        url = harness.url(conversation)

        async def run() -> tuple[Transcript, Transcript]:
            async with Clients() as clients:
                reference = await undisturbed(clients, url, conversation)
                got = await disturbed(clients, url, conversation, reference, Plan(drops))
            return reference, got

        reference, got = harness.run(run())
        got.assert_complete()
        assert got.last_seq == reference.last_seq
        assert summary(got, conversation) == summary(reference, conversation)
        for transcript in (reference, got):
            for (message_id, name), reply in summary(transcript, conversation).items():
                text = next(m.text for m in conversation.messages if m.id == message_id)
                if conversation.streaming:
                    assert reply["end"]["full_response"] == "".join(reply["chunks"]) == text, (message_id, name)
                else:
                    assert reply["end"]["response"] == text and reply["chunks"] == [], (message_id, name)

    check()
