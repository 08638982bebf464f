"""The command line, black-box: ``python -m connic run | check`` in subprocesses, real clients."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest

import connic
from conftest import ROOT, CliServer, Connect, StartServer

Cli = Callable[..., CliServer]


def connic_cmd(*args: str, env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``python -m connic ARGS`` to completion (without the caller's CONNIC_* variables)."""
    proc_env = {k: v for k, v in os.environ.items() if not k.startswith("CONNIC_")}
    proc_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "connic", *args], capture_output=True, text=True, timeout=60, env=proc_env, cwd=ROOT
    )


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def one_error_line(done: subprocess.CompletedProcess[str]) -> str:
    """The process failed with exit 1 and exactly one line on stderr; return it."""
    assert done.returncode == 1, (done.returncode, done.stdout, done.stderr)
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("connic: error: "), lines[0]
    assert "Traceback" not in done.stderr
    return lines[0]


async def assert_echo(client, text: str = "hello cli world") -> None:  # type: ignore[no-untyped-def]
    frames = await client.reply({"message": text})
    assert [f["type"] for f in frames][:2] == ["ack", "stream_start"], frames
    assert frames[-1]["type"] == "stream_end" and frames[-1]["full_response"] == text, frames


# --- run ---------------------------------------------------------------------------


async def test_run_with_nothing(cli: Cli, connect: Connect) -> None:
    server = cli()
    banner = "\n".join(server.banner)
    assert f"listening on http://127.0.0.1:{server.port}" in banner
    assert f"websocket: ws://127.0.0.1:{server.port}/ws  agents: echo" in banner, banner
    assert server.secret, banner
    assert len(server.secret) >= 16

    client = await connect(server.url, secret=server.secret)
    assert client.connected["agents"] == ["echo"]  # type: ignore[attr-defined]
    assert client.connected["streaming"] is True  # type: ignore[attr-defined]
    assert client.connected["max_messages"] == 100  # type: ignore[attr-defined]
    await assert_echo(client)

    wrong = await connect(server.url, secret="not-" + server.secret, expect_connected=False)
    code, frames = await wrong.closed()
    assert code == 4001
    assert [f["code"] for f in frames] == ["unauthorized"]

    code, out = server.stop()
    assert code == 0, out


async def test_each_run_generates_a_new_secret(cli: Cli) -> None:
    first, second = cli(), cli()
    assert first.secret and second.secret and first.secret != second.secret


async def test_run_with_secret(cli: Cli, connect: Connect) -> None:
    server = cli("--secret", "my-secret", "--secret", "rotated")
    assert server.secret is None
    assert not any("generated" in line for line in server.banner), server.banner
    await assert_echo(await connect(server.url, secret="my-secret"))
    await assert_echo(await connect(server.url, secret="rotated"))
    wrong = await connect(server.url, secret="other", expect_connected=False)
    assert (await wrong.closed())[0] == 4001


async def test_run_with_connic_secret_env(cli: Cli, connect: Connect) -> None:
    server = cli(env={"CONNIC_SECRET": "from-env"})
    assert server.secret is None
    assert not any("generated" in line for line in server.banner), server.banner
    await assert_echo(await connect(server.url, secret="from-env"))
    wrong = await connect(server.url, secret="other", expect_connected=False)
    assert (await wrong.closed())[0] == 4001


async def test_connic_secret_env_adds_to_flag_secrets(cli: Cli, connect: Connect) -> None:
    server = cli("--secret", "flag", env={"CONNIC_SECRET": "env"})
    await assert_echo(await connect(server.url, secret="flag"))
    await assert_echo(await connect(server.url, secret="env"))


async def test_run_no_auth(cli: Cli, connect: Connect) -> None:
    server = cli("--no-auth")
    assert server.secret is None
    client = await connect(server.url, secret=None)
    await assert_echo(client)


async def test_run_no_streaming(cli: Cli, connect: Connect) -> None:
    server = cli("--no-streaming", "--secret", "s")
    client = await connect(server.url, secret="s")
    assert client.connected["streaming"] is False  # type: ignore[attr-defined]
    frames = await client.reply({"id": "m1", "message": "whole at once"})
    assert [f["type"] for f in frames] == ["ack", "response"]
    assert frames[1]["response"] == "whole at once" and frames[1]["id"] == "m1"
    assert frames[1]["token_usage"] == {"prompt_tokens": 3, "candidates_tokens": 3}


async def test_run_session_timeout(cli: Cli, connect: Connect) -> None:
    server = cli("--session-timeout", "0.5", "--secret", "s")
    client = await connect(server.url, secret="s")
    assert client.connected["session_timeout"] == 0.5  # type: ignore[attr-defined]
    code, frames = await client.closed(timeout=10)
    assert [f["code"] for f in frames] == ["session_expired"]
    assert code == 4008


async def test_run_max_messages(cli: Cli, connect: Connect) -> None:
    server = cli("--max-messages", "1", "--secret", "s")
    client = await connect(server.url, secret="s")
    assert client.connected["max_messages"] == 1  # type: ignore[attr-defined]
    await assert_echo(client, "only one")
    await client.send({"id": "two", "message": "one too many"})
    code, frames = await client.closed(timeout=10)
    assert [(f["type"], f["code"], f["id"]) for f in frames] == [("error", "message_limit_reached", "two")]
    assert code == 4009


async def test_run_config_file_with_flags_overriding(tmp_path: Path, cli: Cli, connect: Connect) -> None:
    config = write(
        tmp_path / "app.toml",
        """
[server]
port = 1
shutdown_grace = 2

[agents.parrot]
use = "echo"

[[connectors]]
path = "/chat"
secrets = ["file-secret"]
max_messages = 5
session_timeout = 600
""",
    )
    # From the file alone: its path, secret and limits.
    server = cli("--config", str(config))
    assert server.port != 1
    assert server.secret is None
    assert any(f"ws://127.0.0.1:{server.port}/chat  agents: parrot" in line for line in server.banner), server.banner
    client = await connect(f"ws://127.0.0.1:{server.port}/chat", secret="file-secret")
    assert client.connected["agents"] == ["parrot"]  # type: ignore[attr-defined]
    assert client.connected["max_messages"] == 5  # type: ignore[attr-defined]
    assert client.connected["session_timeout"] == 600  # type: ignore[attr-defined]
    await assert_echo(client)

    # Flags win over the file; what they do not name stays as the file says.
    server = cli("--config", str(config), "--secret", "flag-secret", "--no-streaming", "--max-messages", "2")
    url = f"ws://127.0.0.1:{server.port}/chat"
    refused = await connect(url, secret="file-secret", expect_connected=False)
    assert (await refused.closed())[0] == 4001
    client = await connect(url, secret="flag-secret")
    assert client.connected["streaming"] is False  # type: ignore[attr-defined]
    assert client.connected["max_messages"] == 2  # type: ignore[attr-defined]
    assert client.connected["session_timeout"] == 600  # type: ignore[attr-defined]
    frames = await client.reply({"message": "flagged"})
    assert [f["type"] for f in frames] == ["ack", "response"]

    # --agent replaces the configured agents.
    server = cli("--config", str(config), "--agent", "echo")
    client = await connect(f"ws://127.0.0.1:{server.port}/chat", secret="file-secret")
    assert client.connected["agents"] == ["echo"]  # type: ignore[attr-defined]


async def test_run_config_from_environment(tmp_path: Path, cli: Cli, connect: Connect) -> None:
    config = write(
        tmp_path / "env.toml",
        '[agents.fromenv]\nuse = "echo"\n\n[[connectors]]\nsecrets = ["s"]\n',
    )
    server = cli(env={"CONNIC_CONFIG": str(config)})
    client = await connect(server.url, secret="s")
    assert client.connected["agents"] == ["fromenv"]  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--max-messages", "0"], "max_messages"),
        (["--session-timeout", "-1"], "session_timeout"),
        (["--agent", "nosuch"], "'nosuch'"),
        (["--port", "70000"], "--port: port must be between 0 and 65535"),
        (["--log-level", "bogus"], "--log-level: unknown level 'bogus'"),
    ],
)
def test_run_with_bad_flags_exits_1(flags: list[str], needle: str) -> None:
    line = one_error_line(connic_cmd("run", "--port", "0", *flags))
    assert needle in line, line


def test_run_with_bad_config_file_exits_1(tmp_path: Path) -> None:
    config = write(tmp_path / "bad.toml", "[[connectors]]\nmax_messages = 0\n[agents.a]\nuse = 'echo'\n")
    line = one_error_line(connic_cmd("run", "--port", "0", "--config", str(config)))
    assert str(config) in line and "max_messages" in line


# --- check -------------------------------------------------------------------------

GOOD = """
[server]
host = "127.0.0.1"
port = 8080
shutdown_grace = 5

[agents.bot]
use = "echo"
delay = 0.01

[[connectors]]
path = "/ws"
secrets = ["s"]
max_messages = 10000
session_timeout = 60
streaming = false
"""


def test_check_ok(tmp_path: Path) -> None:
    config = write(tmp_path / "good.toml", GOOD)
    done = connic_cmd("check", "--config", str(config))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"{config}: ok"), done.stdout
    assert done.stderr == ""


def test_check_ok_without_secret_as_run_would_generate_one(tmp_path: Path) -> None:
    config = write(tmp_path / "nosecret.toml", '[agents.bot]\nuse = "echo"\n\n[[connectors]]\n')
    done = connic_cmd("check", "--config", str(config))
    assert done.returncode == 0, done.stderr
    assert "note: a connector requires auth but has no secret" in done.stdout


BASE = '[agents.bot]\nuse = "echo"\n\n'


@pytest.mark.parametrize(
    ("name", "text", "needles"),
    [
        ("top_level_key", BASE + "[[connectors]]\n\n[extra]\nx = 1\n", ["unknown top-level key", "'extra'"]),
        ("agent_option", '[agents.bot]\nuse = "echo"\nspeed = 2\n\n[[connectors]]\n', ["agents.bot", "'speed'"]),
        ("ill_typed", BASE + '[[connectors]]\nmax_messages = "x"\n', ["connectors[0].max_messages", "expected int"]),
        ("out_of_range", BASE + "[[connectors]]\nmax_messages = 0\n", ["connectors[0]", "max_messages", "10000"]),
        ("bool_for_int", BASE + "[[connectors]]\nmax_messages = true\n", ["connectors[0].max_messages"]),
        ("agent_option_type", '[agents.bot]\nuse = "echo"\ndelay = "fast"\n\n[[connectors]]\n', ["agents.bot.delay"]),
        ("agent_option_range", '[agents.bot]\nuse = "echo"\ndelay = -1\n\n[[connectors]]\n', ["agents.bot", "delay"]),
        ("connector_key", BASE + "[[connectors]]\nstreeming = true\n", ["connectors[0]", "'streeming'"]),
        ("server_key", BASE + "[server]\nprot = 1\n\n[[connectors]]\n", ["server", "'prot'"]),
        ("server_type", BASE + '[server]\nport = "80"\n\n[[connectors]]\n', ["server.port", "expected int"]),
        ("unknown_plugin", '[agents.bot]\nuse = "nosuch"\n\n[[connectors]]\n', ["agents.bot.use", "'nosuch'", "echo"]),
        (
            "unknown_transport",
            BASE + '[[connectors]]\ntransport = "pigeon"\n',
            ["connectors[0].transport", "websocket"],
        ),
        ("missing_use", "[agents.bot]\ndelay = 1\n\n[[connectors]]\n", ["agents.bot.use"]),
        ("no_connector", BASE, ["connectors"]),
        ("unknown_agent", BASE + '[[connectors]]\nagents = ["nobody"]\n', ["connectors[0].agents", "'nobody'"]),
        ("invalid_toml", "[agents.bot\nuse = 'echo'\n", ["not valid TOML", "line 1"]),
    ],
)
def test_check_bad_file(tmp_path: Path, name: str, text: str, needles: list[str]) -> None:
    config = write(tmp_path / f"{name}.toml", text)
    line = one_error_line(connic_cmd("check", "--config", str(config)))
    assert f"connic: error: {config}: " in line, line
    for needle in needles:
        assert needle in line, (needle, line)


def test_check_unknown_plugin_lists_available(tmp_path: Path) -> None:
    config = write(tmp_path / "plugin.toml", '[agents.bot]\nuse = "nosuch"\n\n[[connectors]]\n')
    line = one_error_line(connic_cmd("check", "--config", str(config)))
    assert "(available: " in line and "echo" in line.split("(available: ")[1], line


def test_check_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    line = one_error_line(connic_cmd("check", "--config", str(missing)))
    assert line == f"connic: error: {missing}: no such file"


def test_check_not_utf8(tmp_path: Path) -> None:
    config = tmp_path / "latin1.toml"
    config.write_bytes(b"# caf\xe9\n[agents.bot]\nuse = 'echo'\n")
    line = one_error_line(connic_cmd("check", "--config", str(config)))
    assert str(config) in line


def test_check_string_for_a_list_of_secrets(tmp_path: Path) -> None:
    config = write(tmp_path / "secrets.toml", BASE + '[[connectors]]\nsecrets = "abc"\n')
    line = one_error_line(connic_cmd("check", "--config", str(config)))
    assert "connectors[0].secrets" in line, line


async def test_string_secrets_do_not_become_one_letter_secrets(
    tmp_path: Path, start_server: StartServer, connect: Connect
) -> None:
    config = write(tmp_path / "secrets.toml", BASE + '[[connectors]]\nsecrets = "abc"\n')
    try:
        server = await start_server(config)
    except connic.ConfigError:
        return  # refused at start-up: fine
    client = await connect(server.url(), secret="a", expect_connected=False)
    frame = await client.recv()
    assert frame["type"] == "error" and frame["code"] == "unauthorized", frame


# --- the console script ------------------------------------------------------------


def test_console_script_version() -> None:
    script = shutil.which("connic") or str(Path(sys.executable).with_name("connic"))
    assert Path(script).exists(), "the connic console script is not installed"
    done = subprocess.run([script, "--version"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"connic {connic.__version__}"


def test_module_version_and_help() -> None:
    done = connic_cmd("--version")
    assert done.returncode == 0 and done.stdout.strip() == f"connic {connic.__version__}"
    done = connic_cmd("--help")
    assert done.returncode == 0
    for command in ("run", "plugins", "check"):
        assert command in done.stdout


def test_no_command_is_a_usage_error() -> None:
    done = connic_cmd()
    assert done.returncode == 2
    assert "usage:" in done.stderr


# --- a second signal while draining --------------------------------------------------


def read_until(server: CliServer, needle: str) -> list[str]:
    """Read the server's output up to the line containing ``needle`` (bounded by the process ending)."""
    assert server.proc.stdout is not None
    lines = []
    for line in server.proc.stdout:
        lines.append(line.rstrip("\n"))
        if needle in line:
            return lines
    raise AssertionError(f"the server ended before printing {needle!r}:\n" + "\n".join(lines))


@pytest.mark.parametrize("sig", [pytest.param(signal.SIGTERM, id="SIGTERM"), pytest.param(signal.SIGINT, id="SIGINT")])
async def test_second_signal_during_the_drain_stops_at_once(
    tmp_path: Path, cli: Cli, connect: Connect, sig: signal.Signals
) -> None:
    # A reply of 60 words at 0.5 s each: the drain would wait 30 s for it (grace is 60 s).
    text = (
        '[server]\nshutdown_grace = 60\n\n[agents.echo]\nuse = "echo"\ndelay = 0.5\n\n[[connectors]]\nsecrets = ["s"]\n'
    )
    config = write(tmp_path / "slow.toml", text)
    server = cli("--config", str(config))
    client = await connect(server.url, secret="s")
    await client.send({"id": "m1", "message": " ".join(["w"] * 60)})
    await client.until("stream_chunk")

    server.proc.send_signal(sig)
    await asyncio.wait_for(asyncio.to_thread(read_until, server, "connic: shutting down"), 20)  # draining now
    server.proc.send_signal(sig)
    try:
        out, _ = server.proc.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        pytest.fail("the second signal did not stop the server: it kept draining")
    assert server.proc.returncode == 128 + sig, out
    assert f"connic: {sig.name} again, stopping at once" in out, out
    assert "Traceback" not in out, out
    # The in-flight reply was cut off, not finished.
    _, frames = await client.closed(timeout=10)
    assert not [f for f in frames if f["type"] == "stream_end"], frames


# --- --debug: asyncio's slow-callback warning ----------------------------------------

BLOCKING_AGENT = '''
import time

import connic


class Blocking(connic.Agent):
    """Calls time.sleep in respond(), as a careless agent would: every client waits."""

    async def respond(self, turn):
        time.sleep(0.3)
        yield "woke up"
'''


def blocking_agent_site(tmp_path: Path) -> dict[str, str]:
    """A directory holding the agent module and the entry point that names it, for PYTHONPATH."""
    site = tmp_path / "site"
    (site / "blocking_agent-0.1.dist-info").mkdir(parents=True)
    write(site / "blocking_agent.py", BLOCKING_AGENT)
    write(
        site / "blocking_agent-0.1.dist-info" / "METADATA",
        "Metadata-Version: 2.1\nName: blocking-agent\nVersion: 0.1\n",
    )
    write(
        site / "blocking_agent-0.1.dist-info" / "entry_points.txt",
        "[connic.agents]\nblocking = blocking_agent:Blocking\n",
    )
    path = os.environ.get("PYTHONPATH")
    return {"PYTHONPATH": str(site) + (os.pathsep + path if path else "")}


@pytest.mark.parametrize("debug", [True, False], ids=["debug", "plain"])
async def test_debug_logs_an_agent_that_blocks_the_loop(
    tmp_path: Path, cli: Cli, connect: Connect, debug: bool
) -> None:
    flags = ["--debug"] if debug else []
    server = cli(*flags, "--agent", "blocking", "--no-auth", env=blocking_agent_site(tmp_path))
    client = await connect(server.url, secret=None)
    frames = await client.reply({"id": "b1", "message": "hello"})
    assert frames[-1]["type"] == "stream_end" and frames[-1]["full_response"] == "woke up", frames
    code, out = server.stop()
    assert code == 0, out
    slow = [line for line in out.splitlines() if "WARNING asyncio: Executing <" in line]
    if not debug:
        assert not slow, out
        return
    assert slow, out
    # A line names the callback (the task and the coroutine it ran), its duration, and what it means.
    # (On a loaded machine another callback may be slow too: look for the task's line among them.)
    named = r"Executing <Task .*coro=<\S+\(\) .*> took \d+\.\d+ seconds: the event loop was blocked"
    assert any(re.search(named, line) for line in slow), slow
    assert all("'Blocking calls' in docs/writing-agents.md" in line for line in slow), slow
