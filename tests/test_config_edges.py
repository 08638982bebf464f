"""Configuration edge cases: non-finite numbers, absurdly nested TOML, a host that does not resolve.

Each must end ``python -m connic run`` / ``check`` with one line naming the file (or the flag)
and the key, never a traceback, and never a server that dies later.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from aiohttp import web
from test_cli import connic_cmd, one_error_line, write

import connic
from conftest import Connect, StartServer, make_config

BASE = '[agents.bot]\nuse = "echo"\n\n'


# --- inf and nan ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "where"),
    [
        # positive: inf passed, then the token bucket divided by zero on a session's second message.
        (BASE + "[[connectors]]\nrate_limit = { messages = 1, per = inf }\n", "connectors[0].rate_limit: per"),
        (BASE + "[server]\nhandshake_timeout = inf\n\n[[connectors]]\n", "server: handshake_timeout"),
        (BASE + "[[connectors]]\nagent_timeout = nan\n", "connectors[0]: agent_timeout"),
        # non_negative
        (BASE + "[server]\nshutdown_grace = inf\n\n[[connectors]]\n", "server: shutdown_grace"),
        (BASE + "[[connectors]]\nheartbeat = -inf\n", "connectors[0]: heartbeat"),
        ('[agents.bot]\nuse = "echo"\ndelay = inf\n\n[[connectors]]\n', "agents.bot: delay"),
        # in_range
        (BASE + "[[connectors]]\nsession_timeout = nan\n", "connectors[0]: session_timeout"),
    ],
    ids=["rate_limit.per", "handshake_timeout", "agent_timeout", "shutdown_grace", "heartbeat", "delay", "session"],
)
def test_check_refuses_non_finite_numbers(tmp_path: Path, text: str, where: str) -> None:
    config = write(tmp_path / "nonfinite.toml", text)
    line = one_error_line(connic_cmd("check", "--config", str(config)))
    assert line.startswith(f"connic: error: {config}: {where} must be a finite number, got "), line


def test_run_refuses_an_infinite_rate_limit_window(tmp_path: Path) -> None:
    text = BASE + '[[connectors]]\nsecrets = ["s"]\nrate_limit = {messages = 1, per = inf}\n'
    config = write(tmp_path / "rate.toml", text)
    line = one_error_line(connic_cmd("run", "--port", "0", "--config", str(config)))
    assert f"{config}: connectors[0].rate_limit: per must be a finite number, got inf" in line, line


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_setup_refuses_non_finite_numbers_from_python(value: float) -> None:
    with pytest.raises(connic.ConfigError, match=r"connectors\[0\]\.rate_limit: per must be a finite number"):
        connic.create_app(make_config({"rate_limit": {"messages": 2, "per": value}}))


async def test_large_finite_rate_limit_window_still_serves(start_server: StartServer, connect: Connect) -> None:
    # The finite-number check must not refuse what used to work: a huge but finite window.
    server = await start_server(make_config({"rate_limit": {"messages": 1, "per": 1e300}}))
    client = await connect(server.url())
    first = await client.reply({"id": "a", "message": "one"})
    assert first[-1]["type"] == "stream_end", first
    second = await client.reply({"id": "b", "message": "two"})
    assert second[-1]["type"] == "error" and second[-1]["code"] == "rate_limited", second


# --- deeply nested TOML ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "key", "line_number"),
    [
        ("a = " + "[" * 10_000 + "\n", "a", 1),
        (BASE + "[[connectors]]\npath = '/ws'\nsecrets = " + "[" * 10_000 + "\n", "connectors.secrets", 6),
        ("[server]\nx.y = " + "{ z = " * 5_000 + "\n", "server.x.y", 2),
        ("[agents.bot]\nuse = 'echo'\ndelay = " + "[\n" * 5_000, "agents.bot.delay", 3),
    ],
    ids=["array", "array_in_table", "inline_tables", "multiline"],
)
@pytest.mark.parametrize("command", ["check", "run"])
def test_deeply_nested_toml_is_one_line(tmp_path: Path, text: str, key: str, line_number: int, command: str) -> None:
    config = write(tmp_path / "deep.toml", text)
    args = ("run", "--port", "0") if command == "run" else ("check",)
    line = one_error_line(connic_cmd(*args, "--config", str(config)))
    problem = f"not valid TOML: arrays or inline tables nested too deeply (line {line_number})"
    assert line == f"connic: error: {config}: {key}: {problem}"


def test_load_config_deeply_nested(tmp_path: Path) -> None:
    config = write(tmp_path / "deep.toml", "a = " + "[" * 10_000)
    with pytest.raises(connic.ConfigError, match=r"deep\.toml: a: not valid TOML: .*nested too deeply"):
        connic.load_config(config)


def test_moderately_nested_toml_still_parses(tmp_path: Path) -> None:
    # Nesting a real file could use stays a normal type error, about the key.
    config = write(tmp_path / "nested.toml", BASE + "[[connectors]]\nsecrets = " + "[" * 20 + "]" * 20 + "\n")
    line = one_error_line(connic_cmd("check", "--config", str(config)))
    assert f"{config}: connectors[0].secrets: expected a list of strings" in line, line


# --- a host that does not resolve ------------------------------------------------------

# "bad host name" fails in the C library without a DNS query (a name with spaces), so the
# test stays on loopback; a name such as no.such.host.invalid takes the same path after
# asking the resolver. A label over 63 characters fails in Python's idna codec instead.
UNRESOLVABLE = "bad host name"
TOO_LONG = "x" * 64 + ".example"


def test_run_unresolvable_host_from_the_file(tmp_path: Path) -> None:
    config = write(tmp_path / "host.toml", f'[server]\nhost = "{UNRESOLVABLE}"\n\n' + BASE + "[[connectors]]\n")
    line = one_error_line(connic_cmd("run", "--port", "0", "--config", str(config)))
    assert line.startswith(f"connic: error: {config}: server.host: cannot resolve '{UNRESOLVABLE}'"), line


def test_run_unresolvable_host_from_the_flag(tmp_path: Path) -> None:
    line = one_error_line(connic_cmd("run", "--port", "0", "--host", UNRESOLVABLE))
    assert line.startswith(f"connic: error: --host: cannot resolve '{UNRESOLVABLE}'"), line
    # The flag wins over the file, so the flag is what the message names.
    config = write(tmp_path / "good.toml", '[server]\nhost = "127.0.0.1"\n\n' + BASE + "[[connectors]]\n")
    line = one_error_line(connic_cmd("run", "--port", "0", "--config", str(config), "--host", UNRESOLVABLE))
    assert line.startswith("connic: error: --host: cannot resolve"), line


def test_run_malformed_host_name(tmp_path: Path) -> None:
    config = write(tmp_path / "long.toml", f'[server]\nhost = "{TOO_LONG}"\n\n' + BASE + "[[connectors]]\n")
    line = one_error_line(connic_cmd("run", "--port", "0", "--config", str(config)))
    assert line.startswith(f"connic: error: {config}: server.host: '{TOO_LONG}' is not a valid host name"), line
    line = one_error_line(connic_cmd("run", "--port", "0", "--host", TOO_LONG))
    assert line.startswith(f"connic: error: --host: '{TOO_LONG}' is not a valid host name"), line


def test_run_unresolvable_host_with_the_config_from_the_environment(tmp_path: Path) -> None:
    config = write(tmp_path / "env.toml", f'[server]\nhost = "{UNRESOLVABLE}"\n\n' + BASE + "[[connectors]]\n")
    line = one_error_line(connic_cmd("run", "--port", "0", env={"CONNIC_CONFIG": str(config)}))
    assert line.startswith(f"connic: error: {config}: server.host: cannot resolve"), line


async def test_embedded_metrics_listener_names_the_host_key(tmp_path: Path) -> None:
    # Embedded, the host is only used for a separate metrics listener (metrics_port).
    config = write(
        tmp_path / "metrics.toml",
        f'[server]\nhost = "{UNRESOLVABLE}"\nmetrics_port = 1\n\n' + BASE + '[[connectors]]\nsecrets = ["s"]\n',
    )
    runner = web.AppRunner(connic.create_app(config))
    with pytest.raises(connic.ConfigError, match=rf"{config.name}: server\.host: cannot resolve '{UNRESOLVABLE}'"):
        await runner.setup()
    await runner.cleanup()
