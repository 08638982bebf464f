"""MCP servers as a tool source: connic.agents.mcp against real MCP servers (tests/mcp_server.py).

The servers are real processes: over stdio, launched by the SDK, and over streamable HTTP,
started here on a free loopback port. Nothing is mocked.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import re
import select
import shlex
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from connic.agents.mcp import McpServers, McpToolError
from connic.agents.tools import Tool
from connic.errors import ConfigError

pytest.importorskip("mcp", reason="the mcp package is not installed (test extra)")

SERVER = str(Path(__file__).with_name("mcp_server.py"))


def children() -> set[int]:
    """This process's child processes, zombies included (Linux /proc)."""
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == os.getpid():
            found.add(int(entry))
    return found


def gone(pid: int) -> bool:
    """Whether ``pid`` no longer exists, not even as a zombie."""
    return not Path(f"/proc/{pid}").exists()


async def eventually(check: Any, timeout: float = 10.0) -> None:
    """Wait (bounded) until ``check()`` is true; fail if it does not."""
    for _ in range(int(timeout / 0.02)):
        if check():
            return
        await asyncio.sleep(0.02)
    assert check()


@pytest.fixture
def events(tmp_path: Path) -> Path:
    return tmp_path / "events"


@pytest.fixture
def stdio(events: Path) -> dict[str, Any]:
    """The ``mcp_servers`` entry of the stdio test server."""
    return {"command": sys.executable, "args": [SERVER], "env": {"MCP_TEST_EVENTS": str(events)}}


@pytest.fixture
async def source(stdio: dict[str, Any]) -> AsyncIterator[McpServers]:
    servers = McpServers.from_config([stdio], agent="bot")
    yield servers
    await servers.close()


@pytest.fixture
def http_server(events: Path) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """The streamable HTTP test server, as a subprocess: its ``/mcp`` URL and its process."""
    env = {**os.environ, "MCP_TEST_EVENTS": str(events)}
    proc = subprocess.Popen(
        [sys.executable, SERVER, "--http"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, text=True
    )
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 20)
        line = proc.stdout.readline() if ready else ""
        assert line.startswith("PORT "), f"the HTTP MCP server did not start: {line!r}"
        yield f"http://127.0.0.1:{int(line.split()[1])}/mcp", proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@pytest.fixture
def http_url(http_server: tuple[str, subprocess.Popen[str]]) -> str:
    return http_server[0]


def by_name(tools: Any) -> dict[str, Tool]:
    return {tool.name: tool for tool in tools}


async def test_lists_tools_with_their_schemas(source: McpServers) -> None:
    tools = by_name(await source.start())
    assert set(tools) == {"add", "greet", "fail", "slow", "info", "picture", "die"}
    assert all(isinstance(tool, Tool) for tool in tools.values())
    greet = tools["greet"]
    assert greet.description == "Greet someone by name."
    assert greet.parameters["type"] == "object"
    assert greet.parameters["properties"]["name"]["type"] == "string"
    assert greet.parameters["properties"]["polite"]["type"] == "boolean"
    assert greet.parameters["required"] == ["name"]


async def test_calls_with_arguments(source: McpServers) -> None:
    tools = by_name(await source.start())
    assert await tools["add"].call({"a": 2, "b": 40}) == {"result": 42}  # structuredContent
    assert await tools["greet"].call({"name": "Ann", "polite": True}) == "Good day, Ann."  # text content
    assert await tools["greet"].call({"name": "Bo"}) == "hi Bo"
    caption, image = await tools["picture"].call({})  # not all text: the content blocks, as JSON
    assert caption == {"type": "text", "text": "a red dot"}
    assert image["type"] == "image" and image["mimeType"] == "image/png"
    assert base64.b64decode(image["data"]).startswith(b"\x89PNG")


async def test_env_and_cwd_reach_the_server(stdio: dict[str, Any], tmp_path: Path) -> None:
    servers = McpServers.from_config(
        [{**stdio, "env": {"MCP_TEST_VALUE": "from config"}, "cwd": str(tmp_path)}], agent="bot"
    )
    try:
        info = await by_name(await servers.start())["info"].call({})
    finally:
        await servers.close()
    assert info["env"] == "from config"
    assert await asyncio.to_thread(os.path.samefile, info["cwd"], tmp_path)


async def test_an_error_result_raises_for_the_model_and_the_server_stays_usable(source: McpServers) -> None:
    tools = by_name(await source.start())
    with pytest.raises(McpToolError, match="the disk is full"):
        await tools["fail"].call({"reason": "the disk is full"})
    with pytest.raises(McpToolError, match="Field required"):
        await tools["add"].call({"a": 1})  # the server rejects the arguments
    assert await tools["add"].call({"a": 1, "b": 1}) == {"result": 2}


async def test_cancelling_a_slow_call_cancels_it_on_the_server(source: McpServers, events: Path) -> None:
    tools = by_name(await source.start())
    call = asyncio.create_task(tools["slow"].call({"seconds": 60}))
    await asyncio.sleep(0.3)  # let the request reach the server
    assert await tools["add"].call({"a": 1, "b": 1}) == {"result": 2}  # calls run side by side
    assert not call.done()
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(call, 5)
    await eventually(lambda: events.exists() and "slow cancelled" in events.read_text())
    assert await tools["add"].call({"a": 1, "b": 2}) == {"result": 3}


async def test_call_timeout_ends_a_call_with_a_clear_error(stdio: dict[str, Any], events: Path) -> None:
    servers = McpServers.from_config([{**stdio, "call_timeout": 0.5}], agent="bot")
    try:
        tools = by_name(await servers.start())
        with pytest.raises(McpToolError, match=r"tool 'slow' did not answer within 0\.5 s"):
            await tools["slow"].call({"seconds": 60})
        await eventually(lambda: events.exists() and "slow cancelled" in events.read_text())
        assert await tools["add"].call({"a": 1, "b": 2}) == {"result": 3}
    finally:
        await servers.close()


async def test_close_stops_the_process(source: McpServers) -> None:
    before, fds = children(), len(os.listdir("/proc/self/fd"))
    tools = by_name(await source.start())
    pid = (await tools["info"].call({}))["pid"]
    assert not gone(pid)
    await source.close()
    assert gone(pid)  # exited and reaped: no zombie
    assert children() == before
    assert len(os.listdir("/proc/self/fd")) == fds  # pipes closed
    with pytest.raises(McpToolError, match="is not running"):
        await tools["add"].call({"a": 1, "b": 2})
    await source.close()  # twice is fine


async def test_start_and_close_from_different_tasks(source: McpServers) -> None:
    # The SDK's contexts must be entered and exited in one task; connic's own task does both.
    before = children()
    tools = by_name(await asyncio.create_task(source.start()))
    assert await asyncio.create_task(tools["add"].call({"a": 1, "b": 1})) == {"result": 2}
    await asyncio.create_task(source.close())
    assert children() == before


async def test_start_again_after_close(source: McpServers) -> None:
    first = by_name(await source.start())
    await source.close()
    second = by_name(await source.start())
    assert await second["add"].call({"a": 3, "b": 4}) == {"result": 7}
    with pytest.raises(McpToolError, match="is not running"):
        await first["add"].call({"a": 3, "b": 4})


async def test_a_server_that_dies_fails_its_calls_at_once(source: McpServers) -> None:
    before = children()
    tools = by_name(await source.start())
    with pytest.raises(McpToolError, match=r'MCP server ".*mcp_server.py": the server closed the connection'):
        await asyncio.wait_for(tools["die"].call({}), 10)
    with pytest.raises(McpToolError, match=r"closed the connection|is not running"):
        await asyncio.wait_for(tools["add"].call({"a": 1, "b": 1}), 10)
    await source.close()
    assert children() == before  # reaped: no zombie


SILENT = {"command": sys.executable, "args": ["-c", "import time; time.sleep(60)"]}


async def test_a_cancelled_start_stops_at_once_and_leaves_nothing() -> None:
    servers = McpServers.from_config([SILENT], agent="bot")
    await servers.close()  # before any start: nothing to do
    before = children()
    start = asyncio.create_task(servers.start())
    await asyncio.sleep(0.3)  # the process is spawned, it never answers the handshake
    start.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(start, 10)  # not the 30 s start_timeout, nor the server's 60 s
    assert children() == before


@pytest.mark.parametrize("delay", [0, 0.3])
async def test_close_during_start_from_another_task(delay: float) -> None:
    servers = McpServers.from_config([SILENT, SILENT], agent="bot")
    before = children()
    start = asyncio.create_task(servers.start())
    await asyncio.sleep(delay)  # 0: the servers' tasks not yet running; 0.3: mid-handshake
    await asyncio.wait_for(servers.close(), 10)
    with pytest.raises(ConfigError, match=r"mcp_servers\[0\]\) failed to start: closed before it was ready"):
        await asyncio.wait_for(start, 10)
    assert children() == before


async def test_several_servers_start_together_and_offer_all_their_tools(stdio: dict[str, Any]) -> None:
    second = {**stdio, "env": {**stdio["env"], "MCP_TEST_PREFIX": "b_"}}
    servers = McpServers.from_config([stdio, second], agent="bot")
    try:
        tools = by_name(await servers.start())
        assert {"add", "b_add", "greet", "b_greet"} <= set(tools)
        assert await tools["b_add"].call({"a": 5, "b": 5}) == {"result": 10}
    finally:
        await servers.close()


async def test_a_tool_name_on_two_servers_is_a_config_error(stdio: dict[str, Any]) -> None:
    before = children()
    servers = McpServers.from_config([stdio, {**stdio, "args": [SERVER, "again"]}], agent="bot")
    with pytest.raises(ConfigError) as caught:
        await servers.start()
    message = str(caught.value)
    assert "\n" not in message
    assert "is offered by two MCP servers" in message
    assert "agents.bot.mcp_servers[0]" in message and "agents.bot.mcp_servers[1]" in message
    assert "mcp_server.py again" in message
    assert children() == before


@pytest.mark.parametrize(
    ("prefix", "problem"),
    [
        ("files.", "the tool name 'files.add' has '.': only letters, digits, _ and - are allowed"),
        ("x" * 62, f"the tool name {'x' * 62 + 'add'!r} is longer than 64 characters"),
        ("1", "the tool name '1add' does not start with a letter or _"),
    ],
    ids=["dot", "too-long", "digit-first"],
)
async def test_a_tool_name_no_provider_accepts_is_a_config_error(
    stdio: dict[str, Any], prefix: str, problem: str
) -> None:
    """OpenAI refuses every request that offers a tool named otherwise than ^[a-zA-Z0-9_-]{1,64}$."""
    before = children()
    entry = {**stdio, "env": {**stdio["env"], "MCP_TEST_PREFIX": prefix}}
    servers = McpServers.from_config([entry], agent="bot")
    with pytest.raises(ConfigError) as caught:
        await servers.start()
    assert str(caught.value) == (
        f'MCP server "{sys.executable} {SERVER}" (agents.bot.mcp_servers[0]): {problem}, so no model can be offered it'
    )
    assert children() == before  # the server was stopped again


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ({"command": "/nonexistent/mcp-server"}, 'MCP server "/nonexistent/mcp-server" .* command not found'),
        (
            {"command": sys.executable, "args": ["-c", "import sys; sys.exit('missing API token')"]},
            "the server closed the connection .*its stderr said: missing API token",
        ),
        ({"command": sys.executable, "args": ["-c", "print('not json')"]}, "failed to start: "),
        ({"command": sys.executable, "cwd": "/nonexistent/dir"}, "cwd does not exist"),
        ({"command": SERVER}, r"cannot run the command \(Permission denied\)"),  # not executable
    ],
)
async def test_a_server_that_cannot_start_is_one_clear_line(entry: dict[str, Any], expected: str) -> None:
    before = children()
    servers = McpServers.from_config([entry], agent="bot")
    with pytest.raises(ConfigError, match=r"\(agents\.bot\.mcp_servers\[0\]\) failed to start: ") as caught:
        await servers.start()
    assert "\n" not in str(caught.value)
    assert "Traceback" not in str(caught.value)
    assert re.search(expected, str(caught.value)), str(caught.value)
    assert children() == before


async def test_start_timeout(stdio: dict[str, Any]) -> None:
    before = children()
    silent = {**SILENT, "start_timeout": 0.5}
    servers = McpServers.from_config([stdio, silent], agent="bot")
    with pytest.raises(ConfigError) as caught:
        await servers.start()
    assert str(caught.value).endswith(
        "(agents.bot.mcp_servers[1]) failed to start: no answer within 0.5 s (start_timeout)"
    )
    assert children() == before  # the silent one killed, the good one closed


async def test_http_server(http_url: str, events: Path) -> None:
    servers = McpServers.from_config([{"url": http_url, "headers": {"X-Test-Token": "t0ken"}}], agent="bot")
    try:
        tools = by_name(await servers.start())
        assert set(tools) == {"add", "greet", "fail", "slow", "info", "picture", "die"}
        assert tools["add"].parameters["required"] == ["a", "b"]
        assert await tools["add"].call({"a": 20, "b": 22}) == {"result": 42}
        assert (await tools["info"].call({}))["header"] == "t0ken"
        with pytest.raises(McpToolError, match="no such file"):
            await tools["fail"].call({"reason": "no such file"})
        call = asyncio.create_task(tools["slow"].call({"seconds": 60}))
        await asyncio.sleep(0.3)  # let the request reach the server
        assert await tools["add"].call({"a": 1, "b": 1}) == {"result": 2}  # calls run side by side
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(call, 5)
        await eventually(lambda: events.exists() and "slow cancelled" in events.read_text())
        assert await tools["greet"].call({"name": "Cy"}) == "hi Cy"
    finally:
        await servers.close()


async def test_an_http_server_that_goes_away_fails_calls_at_once(
    http_server: tuple[str, subprocess.Popen[str]],
) -> None:
    url, proc = http_server
    servers = McpServers.from_config([{"url": url}], agent="bot")
    try:
        tools = by_name(await servers.start())
        assert await tools["add"].call({"a": 1, "b": 1}) == {"result": 2}
        proc.terminate()
        await asyncio.to_thread(proc.wait, 10)
        for _ in range(2):
            with pytest.raises(McpToolError, match=rf'^MCP server "{url}": '):
                await asyncio.wait_for(tools["add"].call({"a": 1, "b": 1}), 10)
    finally:
        await asyncio.wait_for(servers.close(), 10)


async def test_http_url_unreachable_or_wrong(http_url: str) -> None:
    wrong_path = http_url.removesuffix("/mcp") + "/nope"
    for url, reason in [
        ("http://127.0.0.1:9/mcp", "cannot connect (All connection attempts failed)"),
        (wrong_path, "Not Found"),
    ]:
        servers = McpServers.from_config([{"url": url}], agent="bot")
        with pytest.raises(ConfigError) as caught:
            await servers.start()
        message = str(caught.value)
        assert message.startswith(f'MCP server "{url}" (agents.bot.mcp_servers[0]) failed to start: ')
        assert reason in message and "\n" not in message


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("npx server", "agents.bot.mcp_servers: expected an array of tables, got str"),
        (["npx"], r"agents.bot.mcp_servers\[0\]: expected a table, got str"),
        ([{"comand": "x"}], r"agents.bot.mcp_servers\[0\].comand: unknown key \(expected one of command, args"),
        ([{"args": ["x"]}], r"mcp_servers\[0\]: needs exactly one of command .* or url"),
        ([{"command": "x", "url": "http://h/mcp"}], r"mcp_servers\[0\]: needs exactly one of command"),
        ([{"command": ""}], r"mcp_servers\[0\].command: expected a non-empty string"),
        ([{"command": ["npx", "x"]}], r"mcp_servers\[0\].command: expected a non-empty string"),
        ([{"command": "x", "args": "-v"}], r"mcp_servers\[0\].args: expected an array of strings"),
        ([{"command": "x", "args": [1]}], r"mcp_servers\[0\].args: expected an array of strings"),
        ([{"command": "x", "env": {"A": 1}}], r"mcp_servers\[0\].env: expected a table of strings"),
        ([{"command": "x", "cwd": 3}], r"mcp_servers\[0\].cwd: expected a directory path"),
        ([{"command": "x", "headers": {}}], r"mcp_servers\[0\].headers: not allowed with command"),
        ([{"url": "http://h/mcp", "args": []}], r"mcp_servers\[0\].args: not allowed with url"),
        ([{"url": "ftp://h/mcp"}], r"mcp_servers\[0\].url: expected an http:// or https:// URL"),
        ([{"url": "http://h/mcp", "headers": ["x"]}], r"mcp_servers\[0\].headers: expected a table of strings"),
        ([{"command": "x", "start_timeout": 0}], r"mcp_servers\[0\].start_timeout: expected a positive number"),
        ([{"command": "x", "call_timeout": "5"}], r"mcp_servers\[0\].call_timeout: expected a positive number"),
        ([{"command": "x", "call_timeout": True}], r"mcp_servers\[0\].call_timeout: expected a positive number"),
        ([{"command": "x"}, {"url": "x"}], r"mcp_servers\[1\].url: expected an http"),
    ],
)
def test_bad_config_is_one_line_naming_agent_index_and_key(value: object, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected) as caught:
        McpServers.from_config(value, agent="bot")
    assert "\n" not in str(caught.value)
    assert str(caught.value).startswith("agents.bot.mcp_servers")


def test_a_good_config_is_accepted() -> None:
    servers = McpServers.from_config(
        [
            {"command": "npx", "args": ["-y", "srv"], "env": {"K": "v"}, "cwd": "~/x", "start_timeout": 5},
            {"url": "https://h.example/mcp", "headers": {"Authorization": "Bearer t"}, "call_timeout": 2.5},
        ],
        agent="bot",
    )
    stdio, http = servers.specs
    assert stdio.label == "npx -y srv" and stdio.start_timeout == 5.0 and stdio.call_timeout == 120.0
    assert stdio.cwd == os.path.expanduser("~/x")
    assert http.label == "https://h.example/mcp" and http.call_timeout == 2.5 and http.start_timeout == 30.0
    hidden = McpServers.from_config([{"url": "https://me:s3cret@h.example/mcp?x=1"}], agent="bot").specs[0]
    assert hidden.label == "https://***@h.example/mcp"


SECRET_VALUE = "sk-live-456"


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        (
            {"command": "x", "env": {"API_KEY": SECRET_VALUE, "DEBUG": 1}},
            "agents.bot.mcp_servers[0].env: expected a table of strings, but DEBUG is int",
        ),
        (
            {"url": "http://h/mcp", "headers": {"Authorization": f"Bearer {SECRET_VALUE}", "X-Retries": 3}},
            "agents.bot.mcp_servers[0].headers: expected a table of strings, but X-Retries is int",
        ),
        (
            {"command": "x", "args": ["--token", SECRET_VALUE, 5]},
            "agents.bot.mcp_servers[0].args: expected an array of strings, but item 2 is int",
        ),
        (
            {"command": ["npx", "--token", SECRET_VALUE]},
            "agents.bot.mcp_servers[0].command: expected a non-empty string, got list",
        ),
        (
            {"url": f"ftp://me:{SECRET_VALUE}@h/mcp?api_key={SECRET_VALUE}"},
            "agents.bot.mcp_servers[0].url: expected an http:// or https:// URL, got 'ftp://***@h/mcp'",
        ),
    ],
)
def test_a_config_error_names_the_key_and_the_type_never_the_value(entry: dict[str, Any], expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        McpServers.from_config([entry], agent="bot")
    assert str(caught.value) == expected


async def test_a_urls_query_and_fragment_stay_out_of_errors_and_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("DEBUG", logger="connic.agents.mcp")
    url = f"http://127.0.0.1:9/mcp?api_key={SECRET_VALUE}#token={SECRET_VALUE}"
    servers = McpServers.from_config([{"url": url}], agent="bot")
    assert servers.specs[0].label == "http://127.0.0.1:9/mcp"
    with pytest.raises(ConfigError) as caught:
        await servers.start()
    assert str(caught.value).startswith('MCP server "http://127.0.0.1:9/mcp" (agents.bot.mcp_servers[0]) failed')
    assert SECRET_VALUE not in str(caught.value)
    assert all(SECRET_VALUE not in record.getMessage() for record in caplog.records)


def test_without_the_sdk_mcp_servers_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "mcp", None)  # what `import mcp` sees when the package is missing
    with pytest.raises(ConfigError, match=r"^agents.bot.mcp_servers: .*pip install 'connic\[mcp\]'$"):
        McpServers.from_config([{"command": "x"}], agent="bot")
    assert McpServers.from_config([], agent="bot").specs == ()  # no servers, no SDK needed


def test_the_core_and_the_agents_never_import_the_sdk() -> None:
    code = (
        "import sys, connic, connic.agents.openai, connic.agents.gemini, connic.agents.mcp as m\n"
        "m.McpServers.from_config([], agent='a')\n"
        "loaded = sorted(n for n in sys.modules if n == 'mcp' or n.startswith(('mcp.', 'mcp_types')))\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


async def test_failed_starts_leak_no_file_descriptor() -> None:
    fds = len(os.listdir("/proc/self/fd"))
    for entry in [{"command": "/nonexistent/mcp-server"}, {"command": sys.executable, "args": ["-c", "pass"]}]:
        with pytest.raises(ConfigError):
            await McpServers.from_config([entry], agent="bot").start()
    assert len(os.listdir("/proc/self/fd")) == fds


async def test_a_stdio_servers_stderr_is_logged_at_debug_only(caplog: pytest.LogCaptureFixture) -> None:
    """A server's stderr may echo the arguments of a call (message text): DEBUG, never INFO or above."""
    caplog.set_level("DEBUG", logger="connic.agents.mcp")
    code = "import sys; print('line one', file=sys.stderr); sys.exit('line two')"
    servers = McpServers.from_config([{"command": sys.executable, "args": ["-c", code]}], agent="bot")
    with pytest.raises(ConfigError, match=r"its stderr said: line two$"):
        await servers.start()
    records = [r for r in caplog.records if r.name == "connic.agents.mcp"]
    debug = [r.getMessage() for r in records if r.levelno == logging.DEBUG]
    assert any(m.endswith('" stderr: line one') for m in debug), debug
    assert any(m.endswith('" stderr: line two') for m in debug), debug
    above = [r.getMessage() for r in records if r.levelno > logging.DEBUG]
    assert not any("line one" in m or "line two" in m for m in above), above


ARG_SECRET = "sk-test-SECRET123"


async def test_a_token_in_args_stays_out_of_errors_logs_and_task_names(caplog: pytest.LogCaptureFixture) -> None:
    """A stdio server is named by its command line, the value of a secret option hidden, its stderr too."""
    caplog.set_level("DEBUG", logger="connic.agents.mcp")
    label = f"{sys.executable} {SERVER} --api-key [redacted]"
    servers = McpServers.from_config(
        [{"command": sys.executable, "args": [SERVER, "--api-key", ARG_SECRET]}], agent="bot"
    )
    try:
        tools = by_name(await servers.start())
        task_names = [task.get_name() for task in asyncio.all_tasks()]
        with pytest.raises(McpToolError) as died:
            await asyncio.wait_for(tools["die"].call({}), 10)
    finally:
        await servers.close()
    # A server that fails to start, saying why with the key it was given (its stderr is quoted).
    echo = ["-c", "import sys; sys.exit('invalid API key: ' + sys.argv[-1])", "--api-key", ARG_SECRET]
    with pytest.raises(ConfigError) as failed:
        await McpServers.from_config([{"command": sys.executable, "args": echo}], agent="bot").start()
    shown = [str(died.value), str(failed.value), caplog.text, *task_names]
    assert not [text for text in shown if ARG_SECRET in text], shown
    # The command is still there to tell servers apart.
    assert f'MCP server "{label}": 7 tools: ' in caplog.text
    assert str(died.value).startswith(f'MCP server "{label}": the server closed the connection')
    assert f"mcp server {label}" in task_names
    assert str(failed.value) == (
        f'MCP server "{sys.executable} -c {shlex.quote(echo[1])} --api-key [redacted]" (agents.bot.mcp_servers[0]) '
        "failed to start: the server closed the connection (it exited); its stderr said: invalid API key: [redacted]"
    )
