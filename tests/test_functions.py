"""``tools = [...]``: functions named by reference, described by pydantic, and bad entries refused at load.

A relative ``FILE.py:NAME`` starts from the configuration file's folder (like an agent or
middleware reference), else from the current directory. Every bad entry is one
ConfigError naming the file, the agent's key, the entry's index and the entry.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import textwrap
import threading
from pathlib import Path
from typing import Any

import pytest
import tool_functions
from tool_functions import State

import connic
from connic.app import build_runtime
from connic.config import load_config

TOOLS_PY = '''
import threading
from typing import Annotated
from pydantic import Field
from helper_module import PREFIX  # a sibling module, found next to this file

LIMIT = 3


def search(query: Annotated[str, Field(description="What to look for")], limit: int = 5) -> list[str]:
    """Search the knowledge base.

    Returns the titles of the best matches.
    """
    return [f"{PREFIX}{query} #{i}" for i in range(limit)] + [threading.current_thread().name]


def positional_and_keyword_only(a: int, /, *, b: int) -> int:
    return a + b


def a_function_whose_name_is_far_too_long_for_any_model_provider_to_take(x: int) -> int:
    return x
'''


def write_config(folder: Path, tools: list[str], **options: Any) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tools.py").write_text(TOOLS_PY)
    (folder / "helper_module.py").write_text('PREFIX = "hit: "\n')
    extra = "".join(f"{k} = {v!r}\n" for k, v in options.items())
    entries = ", ".join(f'"{t}"' for t in tools)
    config = f"""
        [agents.bot]
        use = "openai"
        base_url = "http://127.0.0.1:9/v1"
        tools = [{entries}]
        {extra}
        [[connectors]]
        secrets = ["s"]
    """
    path = folder / "app.toml"
    path.write_text(textwrap.dedent(config))
    return path


async def test_a_relative_file_starts_from_the_config_files_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_config(tmp_path / "conf", ["tools.py:search", "tool_functions:word_count"])
    monkeypatch.chdir(tmp_path)  # not the config's folder: the file is still found
    agent = build_runtime(load_config(path)).agents["bot"]
    await agent.start()
    try:
        tools = agent.toolbox.tools  # type: ignore[attr-defined]
        search = tools["search"]
        assert search.description == "Search the knowledge base.\n\nReturns the titles of the best matches."
        assert search.parameters == {
            "type": "object",
            "properties": {
                "query": {"type": "string", "title": "Query", "description": "What to look for"},
                "limit": {"type": "integer", "title": "Limit", "default": 5},
            },
            "required": ["query"],
            "additionalProperties": False,
        }
        *hits, thread = await search.call({"query": "cats", "limit": "2"})  # validated: "2" becomes 2
        assert hits == ["hit: cats #0", "hit: cats #1"]
        assert thread != threading.main_thread().name  # a sync function runs in a worker thread
        tool_functions.reset()
        assert await tools["word_count"].call({"text": "a b c"}) == 3
    finally:
        await agent.close()


async def test_without_a_config_file_a_relative_file_starts_from_the_current_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_config(tmp_path, [])
    monkeypatch.chdir(tmp_path)
    config = {"agents": {"bot": {"use": "openai", "tools": ["tools.py:search"]}}, "connectors": [{"secrets": ["s"]}]}
    agent = build_runtime(connic.config.parse_config(config)).agents["bot"]
    await agent.start()
    try:
        assert list(agent.toolbox.tools) == ["search"]  # type: ignore[attr-defined]
    finally:
        await agent.close()


async def test_invalid_arguments_are_refused_before_the_call() -> None:
    tool_functions.reset()
    from connic.agents.functions import FunctionTool

    tool = FunctionTool("get_weather", tool_functions.get_weather)
    with pytest.raises(ValueError, match=r"^invalid arguments: unit: Input should be 'C' or 'F'$"):
        await tool.call({"city": "Oslo", "unit": "K"})
    assert tool_functions.State.calls == []


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        ("no_colon", "expected MODULE:FUNCTION or FILE.py:FUNCTION"),
        ("no_such_module_xyz:f", "importing module no_such_module_xyz failed: ModuleNotFoundError"),
        ("tool_functions:nope", "module tool_functions has no attribute 'nope'"),
        ("missing.py:f", "file not found: "),
        ("tools.py:nope", "tools.py has no attribute 'nope'"),
        ("tools.py:LIMIT", "LIMIT is int, not a function"),
        ("tool_functions:State", "State is a class, not a function"),
        ("tools.py:positional_and_keyword_only", "cannot describe the arguments of positional_and_keyword_only: "),
        (
            "tools.py:a_function_whose_name_is_far_too_long_for_any_model_provider_to_take",
            "is longer than 64 characters",
        ),
    ],
)
def test_a_bad_entry_is_a_config_error_naming_the_key_and_the_entry(tmp_path: Path, entry: str, problem: str) -> None:
    path = write_config(tmp_path, ["tool_functions:word_count", entry])
    with pytest.raises(connic.ConfigError) as caught:
        build_runtime(load_config(path))
    message = str(caught.value)
    assert message.startswith(f"{path}: agents.bot: tools[1] {entry!r}: ")
    assert problem in message
    assert "\n" not in message


def test_two_tools_of_the_same_name_are_a_config_error(tmp_path: Path) -> None:
    path = write_config(tmp_path, ["tool_functions:word_count", "tools.py:search", "tool_functions:word_count"])
    with pytest.raises(connic.ConfigError) as caught:
        build_runtime(load_config(path))
    assert str(caught.value) == (
        f"{path}: agents.bot: tools[2] 'tool_functions:word_count': "
        "a tool named 'word_count' is already given by tools[0] 'tool_functions:word_count'"
    )


@pytest.mark.parametrize(
    ("options", "problem"),
    [
        ({"max_tool_rounds": 0}, "max_tool_rounds must be at least 1, got 0"),
        ({"tool_timeout": 0}, "tool_timeout must be a positive number, got 0"),
        ({"tool_threads": 0}, "tool_threads must be a positive number, got 0"),
    ],
)
def test_bad_loop_options_are_config_errors(tmp_path: Path, options: dict[str, Any], problem: str) -> None:
    path = write_config(tmp_path, [], **options)
    with pytest.raises(connic.ConfigError, match=problem):
        build_runtime(load_config(path))


def test_connic_check_reports_a_bad_entry(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from connic.cli import main

    path = write_config(tmp_path, ["tools.py:nope"])
    assert main(["check", "--config", str(path)]) != 0
    assert (
        f"agents.bot: tools[0] 'tools.py:nope': {tmp_path / 'tools.py'} has no attribute 'nope'"
        in capsys.readouterr().err
    )


def test_sync_tools_do_not_block_the_event_loop() -> None:
    """Two sync calls at once finish together: each in its own worker thread."""
    from connic.agents.functions import FunctionTool

    barrier = threading.Barrier(2, timeout=10)

    def wait_for_the_other() -> bool:
        barrier.wait()
        return True

    tool = FunctionTool("wait_for_the_other", wait_for_the_other)

    async def both() -> list[Any]:
        return await asyncio.gather(tool.call({}), tool.call({}))

    assert asyncio.run(both()) == [True, True]


async def test_two_sources_giving_one_tool_name_stop_start_up_and_close_what_started() -> None:
    from connic.agents.functions import FunctionTools
    from connic.agents.tool_loop import Toolbox

    closed: list[str] = []

    class Recording(FunctionTools):
        async def close(self) -> None:
            closed.append("first")

    toolbox = Toolbox([Recording(["tool_functions:word_count"]), FunctionTools(["tool_functions:word_count"])])
    with pytest.raises(connic.ConfigError, match=r"^two of the agent's tools are named 'word_count'$"):
        await toolbox.start()
    assert closed == ["first"] and toolbox.tools == {}


def test_hung_sync_tools_starve_neither_dns_nor_other_threads(caplog: pytest.LogCaptureFixture) -> None:
    """Sync tools stuck for good do not take the event loop's default executor.

    aiohttp resolves host names there (``loop.getaddrinfo``), and ``asyncio.to_thread`` runs
    there: with its workers all held by hung tools, no provider could be reached any more.
    The default executor is made small (2 workers) so that 3 hung calls would fill it.
    """
    from connic.agents.functions import FunctionTools

    tool_functions.reset()
    caplog.set_level(logging.WARNING, logger="connic.agents.tools")

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        loop.set_default_executor(concurrent.futures.ThreadPoolExecutor(max_workers=2))
        source = FunctionTools(["tool_functions:hang"], agent="bot")
        (hang,) = await source.start()
        calls = [asyncio.create_task(hang.call({})) for _ in range(3)]
        try:
            await hanging(2)  # at least the two a 2-worker executor could take: it would be full now
            assert await asyncio.wait_for(loop.getaddrinfo("localhost", 80), 10)
            assert await asyncio.wait_for(asyncio.to_thread(sum, [1, 2]), 10) == 3
            await hanging(1)  # the third too: not queued behind the others
            for call in calls:
                call.cancel()
            await asyncio.gather(*calls, return_exceptions=True)
            await asyncio.wait_for(source.close(), 10)  # abandons the three threads, waits for none
        finally:
            State.release.set()

    asyncio.run(scenario())
    assert "agent bot: 3 sync tool call(s) still running abandoned" in caplog.text
    assert len(State.threads) == 3 and all(name.startswith("connic-tool-bot-") for name in State.threads)


async def hanging(count: int) -> None:
    """Wait (bounded, on the event loop: no thread may be free) until ``count`` more hang() calls run."""
    for _ in range(count):
        async with asyncio.timeout(10):
            # Polled: hang() runs in a thread and knows no event loop to notify.
            while not State.hanging.acquire(blocking=False):  # noqa: ASYNC110
                await asyncio.sleep(0.01)
