"""README.md's examples work when copied: run verbatim (extracted from the README, not copied here).

The README marks them with ``<!-- readme: NAME -->``. The client's only substitutions are the
printed secret and port.
"""

from __future__ import annotations

import ast
import configparser
import re
import sys
from pathlib import Path

from test_getting_started import ROOT, command, marked_blocks, run_client, start

README = (ROOT / "README.md").read_text(encoding="utf-8")
BLOCKS = marked_blocks(README, "readme")
PLACEHOLDER = "<the printed secret>"


def installed_by_connic() -> set[str]:
    """The import names of connic's install_requires (what ``pip install -e .`` brings)."""
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg", encoding="utf-8")
    names = set()
    for requirement in setup["options"]["install_requires"].split():
        name = re.match(r"[A-Za-z0-9_.-]+", requirement)
        assert name is not None
        names.add(name.group(0).lower().replace("-", "_"))
    return names


def test_the_readme_marks_its_examples() -> None:
    assert set(BLOCKS) == {"client.py", "agents.py", "run-agent"}


def test_the_client_imports_only_what_connic_installs() -> None:
    """``websockets`` is only in the test extra: a copied client must not need it."""
    imported = set()
    for node in ast.walk(ast.parse(BLOCKS["client.py"])):
        if isinstance(node, ast.Import):
            imported |= {alias.name.partition(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.partition(".")[0])
    outside = imported - set(sys.stdlib_module_names) - installed_by_connic()
    assert not outside, f"the README's client imports {sorted(outside)}, which `pip install -e .` does not install"


def test_the_client_talks_to_connic_run(tmp_path: Path) -> None:
    """The first thing the README says to run, and its client, copied as they are."""
    assert "python -m connic run " in README
    server = start(command("python -m connic run"), tmp_path)
    try:
        out = run_client(BLOCKS["client.py"], server, PLACEHOLDER, tmp_path)
    finally:
        server.stop()
    assert "'type': 'connected'" in out[0], out
    assert "'type': 'ack'" in out[1], out
    assert out[-1] == "Hello! {'prompt_tokens': 1, 'candidates_tokens': 1}", out


def test_writing_an_agent_without_packaging(tmp_path: Path) -> None:
    """The README's agent, saved as it says and served by ``--agent agents.py:Weather``."""
    (tmp_path / "agents.py").write_text(BLOCKS["agents.py"], encoding="utf-8")
    (line,) = BLOCKS["run-agent"].splitlines()
    server = start(command(line), tmp_path)
    try:
        assert any(line.endswith("agents: weather") for line in server.banner), server.banner
        out = run_client(BLOCKS["client.py"], server, PLACEHOLDER, tmp_path)
    finally:
        server.stop()
    # What the README says the client then prints.
    assert f"prints `{out[-1]}`" in README, out


def test_the_license_the_metadata_names_is_there() -> None:
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg", encoding="utf-8")
    assert setup["metadata"]["license"] == "MIT"
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert text.startswith("MIT License\n\nCopyright (c) 2026 the connic authors\n"), text[:80]
    assert 'THE SOFTWARE IS PROVIDED "AS IS"' in text


def test_every_setup_cfg_example_in_the_readme_parses() -> None:
    """An ``[options.entry_points]`` snippet must be setup.cfg that setuptools could read."""
    for block in re.findall(r"^```ini\n(.*?)^```", README, re.M | re.S):
        parser = configparser.ConfigParser()
        parser.read_string(block)
    assert "[options.entry_points] connic.agents =" not in README
