"""``python -m connic new NAME``: a starter that runs as written, and never overwrites."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from test_getting_started import WAIT, command, environment, start

from conftest import Connect


def new(name: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "connic", "new", name],
        cwd=cwd,
        env=environment(),
        capture_output=True,
        text=True,
        timeout=WAIT,
    )


async def test_new_then_the_printed_command_serves_the_starter(tmp_path: Path, connect: Connect) -> None:
    done = new("mybot", tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert done.stdout.splitlines() == [
        "wrote mybot/agent.py and mybot/connic.toml",
        "next: python -m connic run --config mybot/connic.toml",
    ]
    assert sorted(p.name for p in (tmp_path / "mybot").iterdir()) == ["agent.py", "connic.toml"]
    assert 'use = "agent.py:Assistant"' in (tmp_path / "mybot" / "connic.toml").read_text(encoding="utf-8")

    # The command it printed, as printed, from where `new` ran.
    server = start(command(done.stdout.splitlines()[-1].removeprefix("next: ")), tmp_path)
    try:
        assert f"  websocket: ws://127.0.0.1:{server.port}/ws  agents: mybot" in server.banner, server.banner
        client = await connect(f"ws://127.0.0.1:{server.port}/ws", secret=server.secret)
        assert client.connected["agents"] == ["mybot"]  # type: ignore[attr-defined]

        # turn.context, the history and Usage, as the starter's docstrings say.
        first = await client.reply({"message": "hi", "context": {"name": "Ada"}})
        end = first[-1]
        assert end["type"] == "stream_end" and end["agent"] == "mybot", first
        assert end["full_response"] == "Hello, Ada! You said: hi"
        assert end["token_usage"] == {"prompt_tokens": 1, "candidates_tokens": 5}
        second = await client.reply({"message": "and again"})
        assert second[-1]["full_response"] == "Hello, there! You said: and again (message 2; before that: hi)"
        assert second[-1]["token_usage"] == {"prompt_tokens": 2, "candidates_tokens": 11}
    finally:
        server.stop()


def test_the_starter_agent_also_runs_with_agent_flag(tmp_path: Path) -> None:
    """agent.py's docstring: ``python -m connic run --agent agent.py:Assistant`` next to it."""
    assert new("bot", tmp_path).returncode == 0
    server = start(command("python -m connic run --agent agent.py:Assistant"), tmp_path / "bot")
    try:
        assert any(line.endswith("agents: assistant") for line in server.banner), server.banner
    finally:
        server.stop()


def test_new_refuses_to_overwrite(tmp_path: Path) -> None:
    assert new("mybot", tmp_path).returncode == 0
    agent = tmp_path / "mybot" / "agent.py"
    agent.write_text("# my edits\n", encoding="utf-8")
    config = tmp_path / "mybot" / "connic.toml"
    before = config.read_text(encoding="utf-8")

    done = new("mybot", tmp_path)
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr.splitlines() == [
        "connic: error: new: mybot/agent.py already exists; not overwriting it (choose another NAME)"
    ]
    assert agent.read_text(encoding="utf-8") == "# my edits\n"
    assert config.read_text(encoding="utf-8") == before

    # Either file is enough to refuse, and nothing is written then.
    other = tmp_path / "other"
    other.mkdir()
    (other / "connic.toml").write_text("# mine\n", encoding="utf-8")
    done = new("other", tmp_path)
    assert done.returncode == 1
    assert "other/connic.toml already exists" in done.stderr
    assert sorted(p.name for p in other.iterdir()) == ["connic.toml"]


def test_a_folder_name_toml_cannot_take_bare_names_the_agent_assistant(tmp_path: Path) -> None:
    done = new("my bot", tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "next: python -m connic run --config 'my bot/connic.toml'"
    assert "[agents.assistant]" in (tmp_path / "my bot" / "connic.toml").read_text(encoding="utf-8")
    checked = subprocess.run(
        [*command("python -m connic check --config"), "my bot/connic.toml"],
        cwd=tmp_path,
        env=environment(),
        capture_output=True,
        text=True,
        timeout=WAIT,
    )
    assert checked.returncode == 0, checked.stderr
