"""The chain's error boundary: whatever agent or middleware code raises is that turn's error.

Pins: SystemExit, KeyboardInterrupt and any BaseException from an agent, its clean-up or a
user middleware end that turn with ``agent_error`` and the server goes on (they used to end
the whole server); bad ``connic.Usage`` numbers are an ``agent_error`` instead of breaking
``/metrics``; every ``agent_error`` and ``agent_timeout`` is logged on ``connic.agent``.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

import connic
from conftest import ROOT, Client, CliServer, Connect, Server, StartServer, make_config
from helpers import test_registry


class Boom(BaseException):
    """A BaseException of a library's own, neither Exception nor a cancellation."""


def _raise(kind: str) -> None:
    if kind == "sys.exit":
        sys.exit(3)
    if kind == "KeyboardInterrupt":
        raise KeyboardInterrupt
    if kind == "GeneratorExit":
        raise GeneratorExit
    if kind == "BaseException":
        raise Boom("library gave up")
    if kind == "CancelledError":  # raised by agent code, with no one cancelling the task
        raise asyncio.CancelledError
    raise AssertionError(kind)


class Raises(connic.Agent):
    """Streams a chunk, then raises what the message names."""

    async def respond(self, turn: connic.Turn) -> AsyncIterator[str | connic.Usage]:
        yield "partial "
        _raise(turn.message)


class ExitsOnClose(connic.Agent):
    """Yields something that is not text (an agent_error); its clean-up then calls sys.exit()."""

    async def respond(self, turn: connic.Turn) -> AsyncIterator[Any]:
        try:
            yield 42
        finally:
            sys.exit(4)


class BadUsage(connic.Agent):
    """Yields text, then the Usage the message names."""

    async def respond(self, turn: connic.Turn) -> AsyncIterator[str | connic.Usage]:
        yield "counted "
        prompt, candidates = {
            "huge": (10**400, 1),
            "negative": (-5, 0),
            "bool": (True, 1),
            "float": (1.5, 1),
            "over": (1, 2**53),
        }[turn.message]
        yield connic.Usage(prompt, candidates)  # type: ignore[arg-type]


class Refuses(connic.Agent):
    """Raises AgentError with a message of its own."""

    async def respond(self, turn: connic.Turn) -> AsyncIterator[str | connic.Usage]:
        if turn.message:
            raise connic.AgentError("the provider said no")
        yield ""


async def exits_in_middleware(turn: connic.Turn, emit: Any, call_next: Any) -> None:
    """User middleware that raises what the message names, before and after the agent."""
    if turn.message.startswith("before "):
        _raise(turn.message.removeprefix("before "))
    await call_next(turn, emit)


async def passes(turn: connic.Turn, emit: Any, call_next: Any) -> None:
    await call_next(turn, emit)


async def emits_garbage(turn: connic.Turn, emit: Any, call_next: Any) -> None:
    """User middleware that emits something that is neither text nor Usage, then goes on."""
    await emit({"not": "text"})
    await call_next(turn, emit)


def registry() -> Any:
    reg = test_registry()
    for name, cls in {"raises": Raises, "exitsonclose": ExitsOnClose, "badusage": BadUsage, "refuses": Refuses}.items():
        reg.register("agents", name, cls)
    reg.register("middleware", "exits", exits_in_middleware)
    reg.register("middleware", "passes", passes)
    reg.register("middleware", "garbage", emits_garbage)
    return reg


AGENTS = {"bad": {"use": "raises"}, "echo": {"use": "echo"}}
KINDS = ["sys.exit", "KeyboardInterrupt", "BaseException", "GeneratorExit", "CancelledError"]


def agent_error(frames: list[dict[str, Any]], agent: str, message_id: Any) -> dict[str, Any]:
    errors = [f for f in frames if f["type"] == "error"]
    assert len(errors) == 1, frames
    error = errors[0]
    assert error["code"] == "agent_error" and error["agent"] == agent and error["id"] == message_id, error
    return error


async def echo_works(client: Client, text: str = "still here") -> None:
    frames = await client.reply({"message": text, "agent": "echo"})
    assert frames[-1]["type"] == "stream_end" and frames[-1]["full_response"] == text, frames


async def metrics(server: Server) -> dict[str, float]:
    """Scrape /metrics: every sample line as ``{'name{labels}': value}``."""
    async with aiohttp.ClientSession() as http, http.get(server.http + "/metrics") as response:
        assert response.status == 200, await response.text()
        text = await response.text()
    samples = (line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))
    return {name: float(value) for name, value in samples}


# --- BaseException from agent code (in-process) --------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
async def test_base_exception_from_an_agent_is_that_turns_agent_error(
    start_server: StartServer, connect: Connect, caplog: pytest.LogCaptureFixture, kind: str
) -> None:
    server = await start_server(make_config(agents=AGENTS), registry=registry())
    client = await connect(server.url())
    other = await connect(server.url())
    # One agent, answered in the connection's own task.
    frames = await client.reply({"id": "one", "message": kind, "agent": "bad"})
    error = agent_error(frames, "bad", "one")
    name = {"sys.exit": "SystemExit", "BaseException": "Boom"}.get(kind, kind)
    assert error["message"].startswith(f"agent 'bad' failed: {name}"), error
    await echo_works(client)
    # Every agent, each in a task of its own: the other answers.
    await client.send({"id": "all", "message": kind})
    frames = await client.until("stream_end")
    frames += await client.until("error") if not any(f["type"] == "error" for f in frames) else []
    agent_error(frames, "bad", "all")
    ends = [f for f in frames if f["type"] == "stream_end"]
    assert [(f["agent"], f["full_response"]) for f in ends] == [("echo", kind)], frames
    await echo_works(client)
    await echo_works(other, "the other session")
    # The failure is in the log with its traceback.
    failures = [r for r in caplog.records if r.name == "connic.agent" and r.levelno == logging.ERROR]
    assert len(failures) == 2 and all(r.exc_info for r in failures), caplog.text
    assert name in failures[0].getMessage() and "'one'" in failures[0].getMessage()


@pytest.mark.parametrize("kind", ["sys.exit", "KeyboardInterrupt", "BaseException"])
async def test_base_exception_from_user_middleware_is_that_turns_agent_error(
    start_server: StartServer, connect: Connect, kind: str
) -> None:
    config = make_config({"middleware": [{"use": "exits"}]}, AGENTS)
    server = await start_server(config, registry=registry())
    client = await connect(server.url())
    agent_error(await client.reply({"id": 1, "message": f"before {kind}", "agent": "echo"}), "echo", 1)
    # The agent itself raising, under a middleware.
    agent_error(await client.reply({"id": 2, "message": kind, "agent": "bad"}), "bad", 2)
    await echo_works(client)


@pytest.mark.parametrize("streaming", [True, False])
async def test_middleware_emitting_a_non_item_is_that_turns_agent_error(
    start_server: StartServer, connect: Connect, streaming: bool
) -> None:
    config = make_config({"middleware": [{"use": "garbage"}], "streaming": streaming}, AGENTS)
    server = await start_server(config, registry=registry())
    client = await connect(server.url())
    for message_id in (1, 2):  # the session goes on
        frames = await client.reply({"id": message_id, "message": "x", "agent": "echo"})
        error = agent_error(frames, "echo", message_id)
        assert error["message"].startswith("a middleware emitted dict; expected str or connic.Usage"), error
        assert [f["type"] for f in frames] == ["ack", "error"], frames


@pytest.mark.parametrize("middleware", [[], [{"use": "passes"}]], ids=["bare", "with-middleware"])
async def test_sys_exit_in_an_agents_clean_up_is_logged_and_the_first_error_stands(
    start_server: StartServer, connect: Connect, caplog: pytest.LogCaptureFixture, middleware: list[Any]
) -> None:
    agents = {"closer": {"use": "exitsonclose"}, "echo": {"use": "echo"}}
    server = await start_server(make_config({"middleware": middleware}, agents), registry=registry())
    client = await connect(server.url())
    error = agent_error(await client.reply({"id": "c", "message": "x", "agent": "closer"}), "closer", "c")
    assert "yielded int" in error["message"], error
    await echo_works(client)
    closing = [r for r in caplog.records if "closing its stream" in r.getMessage()]
    assert len(closing) == 1 and closing[0].exc_info and closing[0].exc_info[0] is SystemExit, caplog.text


# --- BaseException from agent code: `python -m connic run` -----------------------------------

AGENT_MODULE = '''
import sys
import connic
from connic.metrics import Metrics


class Exits(connic.Agent):
    """Calls sys.exit(), as a library might."""

    async def respond(self, turn):
        yield "bye "
        sys.exit(3)


class Interrupts(connic.Agent):
    """Raises KeyboardInterrupt."""

    async def respond(self, turn):
        raise KeyboardInterrupt
        yield ""
'''


def plugin_dir(tmp_path: Path) -> Path:
    """A distribution with the agents above, importable from ``tmp_path/site`` (no pip needed)."""
    site = tmp_path / "site"
    (site / "chain_test_agents-1.0.dist-info").mkdir(parents=True)
    (site / "chain_test_agents.py").write_text(AGENT_MODULE, encoding="utf-8")
    info = site / "chain_test_agents-1.0.dist-info"
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: chain-test-agents\nVersion: 1.0\n", encoding="utf-8")
    (info / "entry_points.txt").write_text(
        "[connic.agents]\nexits = chain_test_agents:Exits\ninterrupts = chain_test_agents:Interrupts\n",
        encoding="utf-8",
    )
    return site


async def test_cli_server_survives_sys_exit_and_keyboard_interrupt_in_agents(
    tmp_path: Path, cli: Callable[..., CliServer], connect: Connect
) -> None:
    config = tmp_path / "connic.toml"
    config.write_text(
        '[agents.exits]\nuse = "exits"\n\n[agents.interrupts]\nuse = "interrupts"\n\n'
        '[agents.echo]\nuse = "echo"\n\n[[connectors]]\npath = "/ws"\nsecrets = ["s"]\n',
        encoding="utf-8",
    )
    path = [str(plugin_dir(tmp_path)), *sys.path]
    server = cli("--config", str(config), env={"PYTHONPATH": ":".join(p for p in path if p) or str(ROOT)})
    client = await connect(server.url, secret="s")
    other = await connect(server.url, secret="s")
    for message_id, agent, name in [(1, "exits", "SystemExit: 3"), (2, "interrupts", "KeyboardInterrupt")]:
        error = agent_error(await client.reply({"id": message_id, "message": "hi", "agent": agent}), agent, message_id)
        assert error["message"] == f"agent {agent!r} failed: {name}", error
        await echo_works(client)
        await echo_works(other, "the other session")
        assert server.proc.poll() is None
    code, out = server.stop()
    assert code == 0, out  # a clean drain on SIGTERM, not exit 3 or an interrupt
    assert "Traceback" in out and "SystemExit: 3" in out and "KeyboardInterrupt" in out, out


# --- bad usage numbers -----------------------------------------------------------------------


@pytest.mark.parametrize("case", ["huge", "negative", "bool", "float", "over"])
async def test_bad_usage_is_agent_error_and_metrics_stay_up(
    start_server: StartServer, connect: Connect, case: str
) -> None:
    agents = {"bad": {"use": "badusage"}, "echo": {"use": "echo"}}
    server = await start_server(make_config(agents=agents), registry=registry())
    client = await connect(server.url())
    error = agent_error(await client.reply({"id": "u", "message": case, "agent": "bad"}), "bad", "u")
    assert "Usage." in error["message"], error
    await echo_works(client, "two words")
    samples = await metrics(server)
    tokens = {k: v for k, v in samples.items() if k.startswith("connic_tokens_total")}
    assert tokens == {
        'connic_tokens_total{agent="echo",kind="candidates"}': 2,
        'connic_tokens_total{agent="echo",kind="prompt"}': 2,
    }, tokens
    assert samples['connic_turns_total{agent="bad",reason="error"}'] == 1


def test_usage_validates_its_counts() -> None:
    assert connic.Usage(0, 2**53 - 1).as_dict() == {"prompt_tokens": 0, "candidates_tokens": 2**53 - 1}
    for bad in (-1, 2**53, 10**400):
        with pytest.raises(ValueError, match=r"Usage\.prompt_tokens"):
            connic.Usage(bad, 0)
    for wrong in (True, 1.0, "1", None):
        with pytest.raises(TypeError, match=r"Usage\.candidates_tokens"):
            connic.Usage(0, wrong)  # type: ignore[arg-type]


# --- agent failures in the server log --------------------------------------------------------


def agent_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "connic.agent"]


async def test_agent_error_is_logged_once_with_its_ids(
    start_server: StartServer, connect: Connect, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    server = await start_server(make_config(agents={"picky": {"use": "refuses"}}), registry=registry())
    client = await connect(server.url())
    session = client.connected["session_id"]  # type: ignore[attr-defined]
    agent_error(await client.reply({"id": "m-7", "message": "top secret text"}), "picky", "m-7")
    [record] = agent_records(caplog)
    line = record.getMessage()
    assert record.levelno == logging.WARNING and not record.exc_info
    assert "picky" in line and session in line and "'m-7'" in line and "the provider said no" in line, line
    assert "top secret text" not in caplog.text


async def test_agent_timeout_is_logged_once_with_its_ids(
    start_server: StartServer, connect: Connect, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    config = make_config({"agent_timeout": 0.2}, {"sleepy": {"use": "slow", "seconds": 30}})
    server = await start_server(config, registry=test_registry())
    client = await connect(server.url())
    session = client.connected["session_id"]  # type: ignore[attr-defined]
    frames = await client.reply({"id": 42, "message": "private words"})
    assert frames[-1]["code"] == "agent_timeout", frames
    [record] = agent_records(caplog)
    line = record.getMessage()
    assert record.levelno == logging.WARNING
    assert "sleepy" in line and "timed out" in line and session in line and "42" in line, line
    assert "private words" not in caplog.text


async def test_unreachable_provider_is_logged(
    start_server: StartServer, connect: Connect, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    with socket.socket() as sock:  # a loopback port with nothing listening
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    agents = {"gpt": {"use": "openai", "base_url": f"http://127.0.0.1:{port}/v1", "api_key": "sk-do-not-log"}}
    server = await start_server(make_config(agents=agents))
    client = await connect(server.url())
    session = client.connected["session_id"]  # type: ignore[attr-defined]
    error = agent_error(await client.reply({"id": "p", "message": "hello provider"}), "gpt", "p")
    assert "could not reach the provider" in error["message"]
    [record] = agent_records(caplog)
    line = record.getMessage()
    assert "gpt" in line and session in line and "'p'" in line and "could not reach the provider" in line, line
    assert "sk-do-not-log" not in caplog.text and "hello provider" not in caplog.text
