"""``telemetry = "off"`` and ``"auto"`` (with the OpenTelemetry SDK set) send the client the same frames.

Tracing wraps each agent's turn (its span, its frames noted on the way to the session): the
client must not see it. One scenario runs against a server built with each setting (telemetry
is process-wide: the last application built decides): a turn of two agents (one fails), a
cancel mid-stream, a drop and a resume replaying the whole log, a message naming the failing
agent, ``history`` and ``ping``. The frames compared leave out what differs between any two
sessions (ids, tokens) and the chunks of the cancelled reply (how many came before the cancel
is timing).
"""

from __future__ import annotations

import asyncio
from typing import Any

from otel_helpers import Sdk, finished, sdk_fixture  # noqa: F401  (a fixture)
from resume_helpers import Clients, ResumeSession, clients_fixture, words  # noqa: F401  (a fixture)

from conftest import StartServer, make_config
from helpers import test_registry

Frame = dict[str, Any]
AGENTS = ["assistant", "failer"]


def comparable(frames: list[Frame]) -> list[Frame]:
    """``frames`` without what differs between two sessions, and without the cancelled reply's chunks."""
    kept = []
    for frame in frames:
        frame = dict(frame)
        for key in ("session_id", "connector_run_id", "resume_token"):
            if key in frame:
                frame[key] = "*"
        if frame.get("finish_reason") == "cancelled":
            frame["full_response"] = "*"
        if not (frame["type"] == "stream_chunk" and frame["id"] == "m2"):
            kept.append(frame)
    return kept


async def scenario(url: str, clients: Clients) -> tuple[list[Frame], list[Frame]]:
    """The session's sequenced frames and the resumed connection's other frames."""
    session = ResumeSession(clients, url)
    conn = await session.start()
    await conn.send({"type": "message", "id": "m1", "payload": {"message": "hello there"}})
    await conn.until_ended({"m1": AGENTS})
    await conn.send({"type": "message", "id": "m2", "payload": {"message": words(200)}})
    await conn.until(lambda f: f["type"] == "stream_chunk" and f.get("agent") == "assistant")
    await conn.send({"type": "cancel", "id": "m2"})
    await conn.until_ended({"m2": AGENTS})
    await conn.send({"type": "message", "id": "m3", "payload": {"message": words(60)}})
    await conn.until(lambda f: f["type"] == "stream_chunk" and f.get("agent") == "assistant")
    session.drop()
    await asyncio.sleep(0.5)  # the reply goes on into the log
    conn = await session.resume(last_seq=0)  # the whole log again
    await conn.until_ended({"m3": AGENTS})
    await conn.send({"type": "message", "id": "m4", "payload": {"message": "x", "agent": "failer"}})
    await conn.until_ended({"m4": ["failer"]})
    await conn.send({"type": "history"})
    await conn.until_type("history")
    await conn.barrier()
    replayed = [f for f in conn.frames if "seq" in f]
    assert [f["seq"] for f in replayed] == list(range(1, len(replayed) + 1))  # replayed from 1, no gap
    assert replayed == session.transcript.ordered()  # each frame as it first came (the transcript keeps those)
    return comparable(session.transcript.ordered()), comparable([f for f in conn.frames if "seq" not in f])


async def test_telemetry_changes_no_frame(start_server: StartServer, clients: Clients, sdk: Sdk) -> None:
    got = {}
    for mode in ("off", "auto"):
        config = make_config(agents={"assistant": {"use": "echo", "delay": 0.02}, "failer": {"use": "fail"}})
        config["server"] = {"telemetry": mode, "playground": False}
        server = await start_server(config, registry=test_registry())
        got[mode] = await scenario(server.url(), clients)
    assert await finished(sdk, "invoke_agent failer", 4)  # "auto" traced the turns: the SDK is live
    assert got["auto"] == got["off"]
