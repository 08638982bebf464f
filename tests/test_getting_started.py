"""docs/getting-started.md, followed literally in an empty folder: nothing packaged, nothing installed.

The page marks each block this test runs with ``<!-- getting-started: NAME -->``: files are
written under their NAME, commands run as written (``python`` is this interpreter; ``run`` gets
``--port 0`` so that tests never collide), and the client's output is compared with the
page's. The client's placeholders are the only substitutions: the printed secret and port.
The helpers here are also used by tests/test_readme.py and tests/test_starter.py.
"""

from __future__ import annotations

import os
import queue
import re
import shlex
import signal
import subprocess
import sys
import threading
from pathlib import Path

import attrs

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "getting-started.md"
WAIT = 60.0
"""Seconds any one step may take (a start, a client's whole conversation)."""


def marked_blocks(text: str, marker: str) -> dict[str, str]:
    """The fenced blocks preceded by ``<!-- MARKER: NAME -->``, by NAME."""
    found = re.findall(rf"^<!-- {marker}: (\S+) -->\n```\w*\n(.*?)^```", text, re.M | re.S)
    blocks = dict(found)
    assert len(blocks) == len(found), f"a {marker} marker is used twice"
    return blocks


def command(line: str) -> list[str]:
    """A ``python -m connic ...`` line from a page, as this interpreter runs it."""
    argv = shlex.split(line)
    assert argv[:3] == ["python", "-m", "connic"], line
    return [sys.executable, *argv[1:]]


def environment() -> dict[str, str]:
    """The caller's environment (PYTHONPATH finds this connic) without any CONNIC_ setting."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONNIC_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


@attrs.define
class Server:
    """A ``python -m connic run`` started from a page, with what its banner said."""

    proc: subprocess.Popen[str]
    banner: list[str]
    port: int
    secret: str | None

    def stop(self) -> str:
        """SIGTERM, and the rest of its output; it must exit 0."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        out, _ = self.proc.communicate(timeout=WAIT)
        assert self.proc.returncode == 0, (self.proc.returncode, out)
        return out


def start(argv: list[str], cwd: Path) -> Server:
    """Start ``argv`` (a ``run`` command) in ``cwd`` on a free port; wait, bounded, for its banner."""
    assert "run" in argv, argv
    proc = subprocess.Popen(
        [*argv, "--port", "0"],
        cwd=cwd,
        env=environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line.rstrip("\n"))
            if line.startswith("Press Ctrl+C"):
                return
        lines.put(None)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    banner: list[str] = []
    try:
        while not banner or not banner[-1].startswith("Press Ctrl+C"):
            line = lines.get(timeout=WAIT)
            if line is None:
                raise AssertionError("connic exited before it listened:\n" + "\n".join(banner))
            banner.append(line)
    except BaseException:
        proc.kill()
        proc.communicate()
        raise
    reader.join(WAIT)
    text = "\n".join(banner)
    port = re.search(r"listening on http://[^:]+:(\d+)", text)
    secret = re.search(r"secret \(generated.*\): (\S+)", text)
    assert port, text
    return Server(proc, banner, int(port.group(1)), secret.group(1) if secret else None)


def run_client(source: str, server: Server, placeholder: str, cwd: Path, name: str = "client.py") -> list[str]:
    """Save a page's client with the server's secret and port in place, run it; its output lines."""
    assert placeholder in source and "ws://127.0.0.1:8080/" in source
    assert server.secret is not None
    path = cwd / name
    path.write_text(
        source.replace(placeholder, server.secret).replace("ws://127.0.0.1:8080/", f"ws://127.0.0.1:{server.port}/"),
        encoding="utf-8",
    )
    done = subprocess.run(
        [sys.executable, name], cwd=cwd, env=environment(), capture_output=True, text=True, timeout=WAIT
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout.splitlines()


# --- the page ------------------------------------------------------------------------------


BLOCKS = marked_blocks(PAGE.read_text(encoding="utf-8"), "getting-started")


def test_the_page_marks_every_step() -> None:
    assert list(BLOCKS) == ["agents.py", "run-agent", "client.py", "output", "connic.toml", "run-config"]


def talk(server: Server, cwd: Path) -> None:
    """Step 4: the client's output after its ``connected`` line is the page's."""
    out = run_client(BLOCKS["client.py"], server, "<the secret>", cwd)
    assert out[0].startswith("{") and "'type': 'connected'" in out[0], out
    assert out[1:] == BLOCKS["output"].splitlines(), out


def test_getting_started_step_by_step(tmp_path: Path) -> None:
    # Step 2: the agent file, and nothing else: no package, no setup.cfg, no pip install.
    (tmp_path / "agents.py").write_text(BLOCKS["agents.py"], encoding="utf-8")

    # Step 3: serve it by file reference, from its folder.
    (line,) = BLOCKS["run-agent"].splitlines()
    server = start(command(line), tmp_path)
    try:
        assert f"  websocket: ws://127.0.0.1:{server.port}/ws  agents: shouter" in server.banner, server.banner
        talk(server, tmp_path)  # step 4
    finally:
        server.stop()

    # Step 5: the same agent from a configuration file, which names it by the same reference.
    (tmp_path / "connic.toml").write_text(BLOCKS["connic.toml"], encoding="utf-8")
    (line,) = BLOCKS["run-config"].splitlines()
    *checks, run = line.split(" && ")
    for check in checks:
        done = subprocess.run(
            command(check), cwd=tmp_path, env=environment(), capture_output=True, text=True, timeout=WAIT
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith("connic.toml: ok (1 agent(s); connectors at /ws)"), done.stdout
    server = start(command(run), tmp_path)
    try:
        assert f"  websocket: ws://127.0.0.1:{server.port}/ws  agents: shouter" in server.banner, server.banner
        talk(server, tmp_path)
    finally:
        server.stop()


def test_the_configuration_finds_the_agent_from_another_folder(tmp_path: Path) -> None:
    """Step 5's ``use = "agents.py:..."`` is relative to connic.toml, not to where connic runs."""
    project = tmp_path / "project"
    project.mkdir()
    (project / "agents.py").write_text(BLOCKS["agents.py"], encoding="utf-8")
    (project / "connic.toml").write_text(BLOCKS["connic.toml"], encoding="utf-8")
    (line,) = BLOCKS["run-config"].splitlines()
    run = line.split(" && ")[-1].replace("connic.toml", "project/connic.toml")
    server = start(command(run), tmp_path)
    try:
        talk(server, tmp_path)
    finally:
        server.stop()
