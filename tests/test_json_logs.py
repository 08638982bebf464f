"""JSON logs: one object per line, with the ids of the turn; no secret and no message text at any level."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import websockets

import connic
from conftest import CliServer, Connect, StartServer, make_config
from connic import telemetry
from connic.config import ServerConfig
from connic.logs import JsonFormatter, configure_logging
from connic.metrics import Metrics
from helpers import test_registry

TEXT = "purple-walrus-sonata"


class Talker(connic.Agent):
    """Logs a line of its own inside the turn (no message text), then answers."""

    async def respond(self, turn: connic.Turn) -> AsyncIterator[str]:
        logging.getLogger("test.talker").info("answering a message of %d characters", len(turn.message))
        yield "ok"


@pytest.fixture
def json_lines() -> Iterator[io.StringIO]:
    """Every record of the root logger, as JSON lines, while the test runs."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    yield stream
    root.removeHandler(handler)
    root.setLevel(level)
    telemetry.configure(ServerConfig(), Metrics())  # a test below turns it off


@pytest.mark.parametrize("mode", ["off", "auto"])
async def test_lines_inside_a_turn_carry_its_ids(
    start_server: StartServer, connect: Connect, json_lines: io.StringIO, mode: str
) -> None:
    registry = test_registry()
    registry.register("agents", "talker", Talker)
    config = make_config({"path": "/logged"}, agents={"talker": {"use": "talker"}, "broken": {"use": "fail"}})
    config["server"] = {"telemetry": mode}
    srv = await start_server(config, registry=registry)
    client = await connect(srv.url("/logged"))
    await client.send({"type": "message", "id": "m-7", "payload": {"message": TEXT}})
    ends = 0
    while ends < 2:
        ends += (await client.recv())["type"] in ("stream_end", "error")
    logging.getLogger("test.outside").warning("outside any turn")
    lines = [json.loads(line) for line in json_lines.getvalue().splitlines()]
    session = client.connected["session_id"]  # type: ignore[attr-defined]
    (talker,) = [line for line in lines if line["logger"] == "test.talker"]
    assert talker["message"] == f"answering a message of {len(TEXT)} characters"
    assert talker["level"] == "INFO" and talker["time"].endswith("Z")
    assert (talker["session_id"], talker["message_id"], talker["message_number"]) == (session, "m-7", 1)
    assert (talker["connector"], talker["agent"]) == ("/logged", "talker")
    (failure,) = [line for line in lines if line["logger"] == "connic.agent"]
    assert (failure["session_id"], failure["agent"], failure["level"]) == (session, "broken", "ERROR")
    assert "RuntimeError: boom" in failure["exception"]
    (outside,) = [line for line in lines if line["logger"] == "test.outside"]
    assert not {"session_id", "message_id", "agent", "trace_id"} & set(outside)
    assert TEXT not in json_lines.getvalue()


def test_configure_logging_refuses_an_unknown_format() -> None:
    with pytest.raises(ValueError, match="log format must be one of text, json, got 'xml'"):
        configure_logging("INFO", "xml")


AGENT = """
import logging
import connic


class Talker(connic.Agent):
    async def respond(self, turn):
        logging.getLogger("talker").debug("answering a message of %d characters", len(turn.message))
        yield "ok "
        yield connic.Usage(1, 1)
"""


def after_banner(server: CliServer) -> tuple[int, list[str]]:
    code, out = server.stop(signal.SIGTERM)
    return code, [line for line in out.splitlines() if line and not line.startswith("connic:")]


async def malformed(port: int, secret: str) -> None:
    """Requests aiohttp cannot parse, carrying the secret: aiohttp logs them (redacted by connic.redact)."""
    for request in (
        f"GET /ws?secret={secret} x HTTP/1.1\r\nHost: x\r\n\r\n",
        f"GET /ws HTTP/1.1\r\nX-Connic-Secret: {secret}\r\nBad Header\r\n\r\n",
    ):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request.encode())
        await writer.drain()
        assert b" 400 " in await asyncio.wait_for(reader.read(), 5)
        writer.close()


async def converse(server: CliServer, secret: str) -> None:
    await malformed(server.port, secret)
    # A wrong secret (logged as a refusal, never quoted), then a turn with the right one in the query.
    async with websockets.connect(f"{server.url}?secret=wrong-{secret}") as ws:
        with pytest.raises(websockets.ConnectionClosed):  # 4001, as soon as the server has read the handshake
            await ws.send(json.dumps({"type": "message", "payload": {"message": TEXT}}))
            while True:
                await ws.recv()
    async with websockets.connect(f"{server.url}?secret={secret}") as ws:
        assert json.loads(await ws.recv())["type"] == "connected"
        await ws.send(json.dumps({"type": "message", "id": "m-1", "payload": {"message": TEXT}}))
        while json.loads(await ws.recv())["type"] != "stream_end":
            pass


def parsed(lines: list[str]) -> list[dict[str, Any]]:
    out = []
    for line in lines:
        value = json.loads(line)  # every line a JSON object
        assert isinstance(value, dict) and {"time", "level", "logger", "message"} <= set(value), line
        out.append(value)
    return out


async def test_connic_run_json_at_debug_has_no_secret_and_no_text(cli: Any, tmp_path: Path) -> None:
    secret = "s3cret-aardvark-9"
    (tmp_path / "talker.py").write_text(AGENT)
    env = {"OTEL_PYTHON_TRACER_PROVIDER": "sdk_tracer_provider"}  # a recording SDK tracer: spans have ids
    server = cli(
        "--log-format", "json", "--log-level", "DEBUG", "--secret", secret,
        "--agent", f"{tmp_path / 'talker.py'}:Talker", env=env,
    )  # fmt: skip
    await converse(server, secret)
    code, lines = after_banner(server)
    assert code == 0
    records = parsed(lines)
    assert any(r["logger"] == "connic.websocket" for r in records)  # the connection lines are there
    assert sum("malformed HTTP request" in r["message"] for r in records if r["logger"] == "aiohttp.server") == 2
    (talker,) = [r for r in records if r["logger"] == "talker"]
    assert (talker["message_id"], talker["connector"], talker["agent"], talker["level"]) == (
        "m-1",
        "/ws",
        "talker",
        "DEBUG",
    )
    assert len(talker["trace_id"]) == 32 and len(talker["span_id"]) == 16
    everything = "\n".join(lines)
    assert secret not in everything and TEXT not in everything


async def test_server_log_format_in_the_configuration(cli: Any, tmp_path: Path) -> None:
    config = tmp_path / "connic.toml"
    config.write_text(
        '[server]\nlog_format = "json"\n[agents.echo]\nuse = "echo"\n[[connectors]]\npath = "/ws"\nsecrets = ["k"]\n'
    )
    server = cli("--config", str(config), "--log-level", "DEBUG")
    await converse(server, "k")
    code, lines = after_banner(server)
    assert code == 0 and parsed(lines)
    assert TEXT not in "\n".join(lines)


async def test_workers_write_json_lines_with_their_number(cli: Any, tmp_path: Path) -> None:
    config = tmp_path / "connic.toml"
    config.write_text('[agents.echo]\nuse = "echo"\n[[connectors]]\npath = "/ws"\nsecrets = ["k"]\nresume_window = 0\n')
    server = cli("--config", str(config), "--workers", "2", "--log-format", "json")
    async with websockets.connect(f"{server.url}?secret=k") as ws:
        assert json.loads(await ws.recv())["type"] == "connected"
    code, lines = after_banner(server)
    assert code == 0
    opened = [r for r in parsed(lines) if r["message"].startswith("open session=")]
    assert len(opened) == 1 and opened[0]["worker"] in (1, 2) and isinstance(opened[0]["pid"], int)
