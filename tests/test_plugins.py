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


# --- plugins that are not what their group expects ---------------------------------------


@pytest.fixture(scope="module")
def misfits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A distribution whose entry points name objects that are no agent and no middleware.

    Installed the way pip leaves a distribution (a package and its ``.dist-info``), written
    by hand: importlib.metadata reads nothing else, and no build is needed.
    """
    site = tmp_path_factory.mktemp("misfits")
    package = site / "misfits"
    package.mkdir()
    write(
        package / "__init__.py",
        '''
class Helper:
    """Takes an agent's constructor arguments, but is no connic.Agent: it has no respond()."""

    def __init__(self, name, options=None):
        self.name = name


class Plain:
    """A class that is no connic.Middleware."""

    def __init__(self, options=None):
        pass


LIMIT = 3
''',
    )
    info = site / "misfits-0.1.dist-info"
    info.mkdir()
    write(info / "METADATA", "Metadata-Version: 2.1\nName: misfits\nVersion: 0.1\n")
    write(
        info / "entry_points.txt",
        "[connic.agents]\nhelper = misfits:Helper\n\n"
        "[connic.middleware]\nplain = misfits:Plain\nlimit = misfits:LIMIT\n",
    )
    return site


def test_an_entry_point_agent_that_is_not_an_agent_is_refused(misfits: Path, tmp_path: Path) -> None:
    """Before: accepted at start-up, then every turn failed with agent_error."""
    config = write(tmp_path / "helper.toml", '[agents.bot]\nuse = "helper"\n\n[[connectors]]\nsecrets = ["s"]\n')
    done = connic("check", "--config", str(config), env=plugin_env(misfits))
    assert done.returncode == 1, done.stdout
    (line,) = done.stderr.splitlines()
    assert line == (
        f"connic: error: {config}: agents.bot.use: agent plugin 'helper' from distribution misfits 0.1 "
        "(misfits:Helper): it is the class Helper, not a connic.Agent subclass"
    )
    done = connic("run", "--agent", "helper", "--port", "0", "--secret", "s", env=plugin_env(misfits))
    assert done.returncode == 1
    assert "not a connic.Agent subclass" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("use", "problem"),
    [
        ("plain", "(misfits:Plain): it is the class Plain, not a connic.Middleware subclass"),
        ("limit", "(misfits:LIMIT): it is an int, neither a connic.Middleware subclass nor a callable"),
    ],
)
def test_an_entry_point_middleware_that_is_not_a_middleware_is_refused(
    misfits: Path, tmp_path: Path, use: str, problem: str
) -> None:
    config = write(
        tmp_path / "mw.toml",
        f'[agents.bot]\nuse = "echo"\n\n[[connectors]]\nsecrets = ["s"]\nmiddleware = [{{ use = "{use}" }}]\n',
    )
    done = connic("check", "--config", str(config), env=plugin_env(misfits))
    assert done.returncode == 1, done.stdout
    (line,) = done.stderr.splitlines()
    assert line.startswith(f"connic: error: {config}: connectors[0].middleware[0].use: middleware plugin '{use}'")
    assert line.endswith(problem), line


# --- agents and middleware without packaging ------------------------------------------------

SHOUTER = '''
import connic
from shouting import loud  # a module next to this file


class Shouter(connic.Agent):
    """Answers in capitals."""

    async def respond(self, turn):
        yield loud(turn.message)


async def exclaim(turn, emit, call_next):
    """A middleware function: appends "!" to every chunk."""

    async def emit_loud(item):
        await emit(item + "!" if isinstance(item, str) else item)

    await call_next(turn, emit_loud)


class Bracket(connic.Middleware):
    """A middleware class: brackets every chunk."""

    async def __call__(self, turn, emit, call_next):
        async def emit_bracketed(item):
            await emit(f"[{item}]" if isinstance(item, str) else item)

        await call_next(turn, emit_bracketed)


def helper():
    pass


NUMBER = 7
'''


def project(folder: Path, answer: str = "loud") -> Path:
    """``folder/agents.py`` (the Shouter, with middleware) and the sibling module it imports."""
    folder.mkdir(parents=True, exist_ok=True)
    write(folder / "shouting.py", f"def loud(text):\n    return {answer!r} + ': ' + text.upper()\n")
    return write(folder / "agents.py", SHOUTER)


async def test_agent_and_middleware_from_files_relative_to_the_config(
    tmp_path: Path, cli: Callable[..., CliServer], connect: Connect
) -> None:
    # connic runs in the repository (cli's cwd): the references are relative to the file's folder.
    project(tmp_path / "bot")
    config = write(
        tmp_path / "bot" / "connic.toml",
        """
[agents.shouter]
use = "agents.py:Shouter"

[[connectors]]
secrets = ["s"]
middleware = [{ use = "agents.py:Bracket" }, { use = "./agents.py:exclaim" }]
""",
    )
    server = cli("--config", str(config))
    assert any(line.endswith("agents: shouter") for line in server.banner), server.banner
    client = await connect(server.url, secret="s")
    frames = await client.reply({"message": "hi there"})
    assert frames[-1]["type"] == "stream_end" and frames[-1]["agent"] == "shouter", frames
    assert frames[-1]["full_response"] == "[loud: HI THERE!]"
    code, out = server.stop()
    assert code == 0, out


async def test_agent_from_a_module_in_config_and_on_the_command_line(
    tmp_path: Path, cli: Callable[..., CliServer], connect: Connect
) -> None:
    package = tmp_path / "site" / "mypkg"
    project(package)
    write(package / "__init__.py", "")
    # The module imports `shouting` as a top-level module: make it one, beside mypkg.
    (package / "shouting.py").rename(tmp_path / "site" / "shouting.py")
    env = plugin_env(tmp_path / "site")
    config = write(
        tmp_path / "mod.toml", '[agents.big]\nuse = "mypkg.agents:Shouter"\n\n[[connectors]]\nsecrets = ["s"]\n'
    )
    server = cli("--config", str(config), env=env)
    client = await connect(server.url, secret="s")
    assert (await client.reply({"message": "a"}))[-1]["full_response"] == "loud: A"

    server = cli("--agent", "mypkg.agents:Shouter", "--secret", "s", env=env)
    assert any(line.endswith("agents: shouter") for line in server.banner), server.banner
    client = await connect(server.url, secret="s")
    assert client.connected["agents"] == ["shouter"]  # type: ignore[attr-defined]
    assert (await client.reply({"message": "b"}))[-1]["full_response"] == "loud: B"


async def test_two_files_of_the_same_name_stay_apart(
    tmp_path: Path, cli: Callable[..., CliServer], connect: Connect
) -> None:
    project(tmp_path / "a", answer="from a")
    project(tmp_path / "b", answer="from b")
    config = write(
        tmp_path / "two.toml",
        '[agents.one]\nuse = "a/agents.py:Shouter"\n\n[agents.two]\nuse = "b/agents.py:Shouter"\n\n'
        '[[connectors]]\nsecrets = ["s"]\n',
    )
    server = cli("--config", str(config))
    client = await connect(server.url, secret="s")
    one = await client.reply({"message": "x", "agent": "one"})
    two = await client.reply({"message": "x", "agent": "two"})
    assert one[-1]["full_response"] == "from a: X"
    # b's `import shouting` is b's own shouting.py, not a's, loaded first under the same name.
    assert two[-1]["full_response"] == "from b: X"


def test_agent_flag_with_a_file_serves_the_class_name_lower_cased(
    tmp_path: Path, cli: Callable[..., CliServer]
) -> None:
    agents = project(tmp_path / "bot")
    server = cli("--agent", f"{agents}:Shouter", "--agent", "echo", "--secret", "s")
    assert any(line.endswith("agents: shouter, echo") for line in server.banner), server.banner


def test_agent_flag_refuses_two_classes_of_one_name(tmp_path: Path) -> None:
    a, b = project(tmp_path / "a"), project(tmp_path / "b")
    done = connic("run", "--agent", f"{a}:Shouter", "--agent", f"{b}:Shouter", "--port", "0")
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        f"connic: error: --agent {b}:Shouter: the name 'shouter' is already served by --agent {a}:Shouter"
    ]


def reference_error(tmp_path: Path, use: str, kind: str = "agent") -> str:
    """The one error line of ``check`` for a configuration naming ``use``, as an agent or a middleware."""
    if kind == "agent":
        text = f'[agents.bot]\nuse = "{use}"\n\n[[connectors]]\nsecrets = ["s"]\n'
    else:
        text = f'[agents.bot]\nuse = "echo"\n\n[[connectors]]\nsecrets = ["s"]\nmiddleware = [{{ use = "{use}" }}]\n'
    config = write(tmp_path / "bot" / "connic.toml", text)
    done = connic("check", "--config", str(config))
    assert done.returncode == 1, done.stdout
    assert "Traceback" not in done.stderr
    (line,) = done.stderr.splitlines()
    key = "agents.bot.use" if kind == "agent" else "connectors[0].middleware[0].use"
    prefix = f"connic: error: {config}: {key}: {kind} '{use}': "
    assert line.startswith(prefix), line
    return line.removeprefix(prefix)


def test_reference_errors_are_one_line_naming_file_and_attribute(tmp_path: Path) -> None:
    agents = project(tmp_path / "bot")
    assert reference_error(tmp_path, "agent.py:Shouter") == f"file not found: {agents.parent / 'agent.py'}"
    assert reference_error(tmp_path, "agents.py:Shoutr") == f"{agents} has no attribute 'Shoutr' (it has: Shouter)"
    assert reference_error(tmp_path, "agents.py:helper") == "helper is a function, not a connic.Agent subclass"
    assert reference_error(tmp_path, "agents.py:exclaim") == "exclaim is a function, not a connic.Agent subclass"
    assert reference_error(tmp_path, "agents.py:Bracket") == "Bracket is the class Bracket, not a connic.Agent subclass"
    assert reference_error(tmp_path, "agents.py:") == "expected FILE.py:NAME or MODULE:NAME"
    assert reference_error(tmp_path, "no-such.module:X") == "'no-such.module' is neither a .py file nor a module name"
    assert reference_error(tmp_path, "nosuchmodule_xyz:X") == (
        "importing module nosuchmodule_xyz failed: ModuleNotFoundError: No module named 'nosuchmodule_xyz'"
    )
    assert reference_error(tmp_path, "json:loads") == "loads is a function, not a connic.Agent subclass"
    assert reference_error(tmp_path, "agents.py:NUMBER", "middleware") == (
        "NUMBER is an int, neither a connic.Middleware subclass nor a callable"
    )
    assert reference_error(tmp_path, "agents.py:Shouter", "middleware") == (
        "Shouter is the class Shouter, not a connic.Middleware subclass"
    )
    write(tmp_path / "bot" / "broken.py", "import connic\n\nx = (\n")
    assert reference_error(tmp_path, "broken.py:X") == (
        f"importing {tmp_path / 'bot' / 'broken.py'} failed: SyntaxError: '(' was never closed (broken.py, line 3)"
    )
    write(tmp_path / "bot" / "raises.py", "raise RuntimeError('no API key\\nsecond line')\n")
    assert reference_error(tmp_path, "raises.py:X") == (
        f"importing {tmp_path / 'bot' / 'raises.py'} failed: RuntimeError: no API key"
    )


def test_agent_flag_errors_name_the_flag(tmp_path: Path) -> None:
    project(tmp_path)
    done = subprocess.run(
        [sys.executable, "-m", "connic", "run", "--agent", "agents.py:Shoutr", "--port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env={k: v for k, v in os.environ.items() if not k.startswith("CONNIC_")},
    )
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        f"connic: error: --agent: agent 'agents.py:Shoutr': {tmp_path / 'agents.py'} has no attribute 'Shoutr' "
        "(it has: Shouter)"
    ]


def test_loading_a_file_leaves_sys_path_as_it_was(tmp_path: Path) -> None:
    """The file's folder is on sys.path only while it runs (its sibling imports work)."""
    from connic.agent import Agent
    from connic.registry import load_reference

    project(tmp_path / "p")
    before = list(sys.path)
    cls = load_reference("agents", "p/agents.py:Shouter", tmp_path)
    assert issubclass(cls, Agent) and cls.__name__ == "Shouter"
    assert sys.path == before
    # Loaded once: the middleware of the same file comes from the same module.
    assert load_reference("middleware", "p/agents.py:exclaim", tmp_path).__module__ == cls.__module__
    assert "shouting" not in sys.modules  # the sibling module is the file's, not everyone's
