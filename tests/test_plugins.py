"""Third-party plugins: a separately built distribution, found through its entry points.

``tests/plugins/connic-history-agent`` is installed with pip into a private
directory (never into the test environment), and connic runs in a subprocess
with that directory on ``PYTHONPATH``, exactly as a user would install a plugin.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest

from conftest import ROOT, CliServer, Connect

PLUGIN_SRC = Path(__file__).resolve().parent / "plugins" / "connic-history-agent"
DIST = "connic-history-agent"
VERSION = "1.2.3"


def _pip_install_flags() -> list[str]:
    # Building without isolation needs a setuptools that can build wheels by itself
    # (>= 70.1) or the wheel package; otherwise let pip build in an isolated env.
    can_build = importlib.util.find_spec("wheel") is not None
    if not can_build:
        try:
            can_build = importlib.util.find_spec("setuptools.command.bdist_wheel") is not None
        except ImportError:
            can_build = False
    return ["--no-build-isolation"] if can_build else []


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The plugin distribution, pip-installed into its own directory."""
    base = tmp_path_factory.mktemp("plugin")
    # Build from a copy: setuptools writes build/ and *.egg-info next to the sources.
    src = shutil.copytree(PLUGIN_SRC, base / "src", ignore=shutil.ignore_patterns("build", "*.egg-info"))
    target = base / "site"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--no-deps",
            *_pip_install_flags(),
            "--target",
            str(target),
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert list(target.glob("connic_history_agent-*.dist-info")), list(target.iterdir())
    return target


def plugin_env(site: Path) -> dict[str, str]:
    path = os.environ.get("PYTHONPATH")
    return {"PYTHONPATH": str(site) + (os.pathsep + path if path else "")}


def connic(*args: str, env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``python -m connic ARGS`` to completion."""
    proc_env = {**os.environ, **(env or {})}
    proc_env.pop("CONNIC_SECRET", None)
    proc_env.pop("CONNIC_CONFIG", None)
    return subprocess.run(
        [sys.executable, "-m", "connic", *args], capture_output=True, text=True, timeout=60, env=proc_env, cwd=ROOT
    )


def plugin_rows(output: str) -> dict[tuple[str, str], tuple[str, str, str]]:
    """``connic plugins`` output as {(kind, name): (distribution, version, description)}."""
    lines = output.splitlines()
    assert lines[0].split() == ["KIND", "NAME", "DISTRIBUTION", "VERSION", "DESCRIPTION"], output
    rows = {}
    for line in lines[1:]:
        kind, name, dist, version, description = re.split(r"\s{2,}", line.strip(), maxsplit=4)
        rows[(kind, name)] = (dist, version, description)
    return rows


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# --- connic plugins --------------------------------------------------------------


def test_plugins_lists_the_third_party_distribution(site: Path) -> None:
    done = connic("plugins", env=plugin_env(site))
    assert done.returncode == 0, done.stderr
    rows = plugin_rows(done.stdout)
    assert rows[("agents", "history")] == (DIST, VERSION, "Answers with what it remembers of the conversation.")
    assert rows[("middleware", "shout")] == (
        DIST,
        VERSION,
        "Upper-cases every text chunk and appends ``suffix`` to the answer's last chunk.",
    )
    # The built-ins are plugins like any other.
    assert rows[("agents", "echo")][0] == "connic"
    assert rows[("agents", "echo")][2] == "Streams the message back word by word."
    assert rows[("transports", "websocket")][0] == "connic"


def test_plugins_shows_a_broken_plugin_without_crashing(site: Path) -> None:
    done = connic("plugins", env=plugin_env(site))
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    dist, version, description = plugin_rows(done.stdout)[("agents", "broken")]
    assert (dist, version) == (DIST, VERSION)
    assert description.startswith("(failed to load:"), description
    assert "ImportError" in description and "unobtainium" in description
    # The plugins after the broken one are still listed.
    assert ("agents", "history") in plugin_rows(done.stdout)


def test_plugins_without_the_distribution() -> None:
    done = connic("plugins")
    assert done.returncode == 0, done.stderr
    rows = plugin_rows(done.stdout)
    assert ("agents", "echo") in rows and ("transports", "websocket") in rows
    assert ("agents", "history") not in rows


# --- running a third-party agent ---------------------------------------------------


async def test_run_history_agent_remembers(site: Path, cli: Callable[..., CliServer], connect: Connect) -> None:
    server = cli("--agent", "history", "--secret", "s", env=plugin_env(site))
    assert any("agents: history" in line for line in server.banner), server.banner
    client = await connect(server.url, secret="s")
    assert client.connected["agents"] == ["history"]  # type: ignore[attr-defined]

    first = await client.reply({"message": "hello there"})
    assert [f["type"] for f in first][:2] == ["ack", "stream_start"]
    end = first[-1]
    assert end["type"] == "stream_end" and end["agent"] == "history", first
    assert end["full_response"] == "You said nothing before. Turn 1: hello there"
    assert end["full_response"] == "".join(f["chunk"] for f in first if f["type"] == "stream_chunk")
    assert end["token_usage"] == {"prompt_tokens": 1, "candidates_tokens": 1}

    second = await client.reply({"message": "again"})
    assert second[-1]["full_response"] == (
        "You said 1 things before; last: hello there. "
        "I answered: You said nothing before. Turn 1: hello there "
        "Turn 2: again"
    )
    assert second[-1]["token_usage"] == {"prompt_tokens": 2, "candidates_tokens": 2}

    # A new connection is a new session: no history, fresh state.
    other = await connect(server.url, secret="s")
    third = await other.reply({"message": "who am I?"})
    assert third[-1]["full_response"] == "You said nothing before. Turn 1: who am I?"

    code, out = server.stop()
    assert code == 0, out


async def test_run_with_third_party_middleware_from_config(
    site: Path, tmp_path: Path, cli: Callable[..., CliServer], connect: Connect
) -> None:
    config = write(
        tmp_path / "shout.toml",
        """
[agents.bot]
use = "echo"

[agents.memory]
use = "history"

[[connectors]]
path = "/ws"
agents = ["bot"]
secrets = ["s"]
middleware = [{ use = "shout", suffix = "?" }]

[[connectors]]
path = "/plain"
agents = ["memory"]
secrets = ["s"]
middleware = [{ use = "shout" }]
""",
    )
    server = cli("--config", str(config), env=plugin_env(site))
    client = await connect(server.url, secret="s")
    frames = await client.reply({"message": "hello quiet world"})
    chunks = [f["chunk"] for f in frames if f["type"] == "stream_chunk"]
    assert chunks == ["HELLO ", "QUIET ", "WORLD?"]
    assert frames[-1]["full_response"] == "HELLO QUIET WORLD?"
    assert frames[-1]["token_usage"] == {"prompt_tokens": 3, "candidates_tokens": 3}

    # The default suffix, and the middleware wrapping a third-party agent.
    other = await connect(f"ws://127.0.0.1:{server.port}/plain", secret="s")
    frames = await other.reply({"message": "hi"})
    assert frames[-1]["full_response"] == "YOU SAID NOTHING BEFORE. TURN 1: HI!"
    code, out = server.stop()
    assert code == 0, out


# --- errors ------------------------------------------------------------------------


def test_check_ok_with_third_party_plugins(site: Path, tmp_path: Path) -> None:
    config = write(
        tmp_path / "ok.toml",
        """
[agents.memory]
use = "history"

[[connectors]]
secrets = ["s"]
middleware = [{ use = "shout", suffix = "..." }]
""",
    )
    done = connic("check", "--config", str(config), env=plugin_env(site))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"{config}: ok"), done.stdout


def test_unknown_plugin_lists_the_available_ones(site: Path, tmp_path: Path) -> None:
    config = write(tmp_path / "unknown.toml", '[agents.bot]\nuse = "nosuch"\n\n[[connectors]]\nsecrets = ["s"]\n')
    done = connic("check", "--config", str(config), env=plugin_env(site))
    assert done.returncode == 1
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert str(config) in lines[0] and "agents.bot.use" in lines[0] and "'nosuch'" in lines[0], lines[0]
    available = re.search(r"available: ([^)]*)\)", lines[0])
    assert available, lines[0]
    names = available.group(1).split(", ")
    assert {"echo", "history", "broken"} <= set(names), names


def test_unknown_middleware_plugin(site: Path, tmp_path: Path) -> None:
    config = write(
        tmp_path / "mw.toml",
        '[agents.bot]\nuse = "echo"\n\n[[connectors]]\nsecrets = ["s"]\nmiddleware = [{ use = "whisper" }]\n',
    )
    done = connic("check", "--config", str(config), env=plugin_env(site))
    assert done.returncode == 1
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert "connectors[0].middleware[0].use" in lines[0] and "'whisper'" in lines[0] and "shout" in lines[0]


def test_bad_middleware_option_names_the_key(site: Path, tmp_path: Path) -> None:
    config = write(
        tmp_path / "mwopt.toml",
        '[agents.bot]\nuse = "echo"\n\n[[connectors]]\nsecrets = ["s"]\n'
        'middleware = [{ use = "shout", suffix = 1 }, { use = "shout", volume = 11 }]\n',
    )
    done = connic("check", "--config", str(config), env=plugin_env(site))
    assert done.returncode == 1
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert str(config) in lines[0] and "connectors[0].middleware[0].suffix" in lines[0], lines[0]


def test_plugin_that_fails_to_import_names_plugin_and_distribution(site: Path, tmp_path: Path) -> None:
    config = write(tmp_path / "broken.toml", '[agents.bot]\nuse = "broken"\n\n[[connectors]]\nsecrets = ["s"]\n')
    done = connic("check", "--config", str(config), env=plugin_env(site))
    assert done.returncode == 1
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    line = lines[0]
    assert "Traceback" not in line
    assert str(config) in line and "agents.bot.use" in line
    assert "'broken'" in line and DIST in line and VERSION in line and "ImportError" in line, line


def test_run_with_a_plugin_that_fails_to_import_exits_1(site: Path) -> None:
    done = connic("run", "--agent", "broken", "--port", "0", "--secret", "s", env=plugin_env(site))
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("connic: error:")
    assert "'broken'" in done.stderr and DIST in done.stderr


def test_a_broken_plugin_does_not_stop_the_others(site: Path, cli: Callable[..., CliServer]) -> None:
    # Plugins are imported only when used: the broken one is installed but never loaded.
    server = cli("--agent", "history", "--agent", "echo", "--secret", "s", env=plugin_env(site))
    assert any("agents: history, echo" in line for line in server.banner), server.banner
    code, out = server.stop()
    assert code == 0, out
