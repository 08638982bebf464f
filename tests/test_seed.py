"""The seed page's examples, verbatim but for the URL and secret, against a real server."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import CliServer

DATA = Path(__file__).parent / "data"
SEED_PAGE = Path(__file__).resolve().parents[2] / "shared" / "seed" / "websocket-connector.txt"
# The seed page's Python example, copied byte for byte (trailing spaces included).
SEED_PYTHON = (DATA / "seed_python_example.txt").read_text()


@pytest.mark.skipif(not SEED_PAGE.exists(), reason="the seed page is not beside this checkout")
def test_copy_is_the_seed_example_verbatim() -> None:
    assert SEED_PYTHON.rstrip("\n") in SEED_PAGE.read_text()


def test_seed_python_example_against_cli(cli: Callable[..., CliServer], tmp_path: Path) -> None:
    server = cli()
    assert server.secret, server.banner
    script = SEED_PYTHON.replace("<websocket-url>", server.url).replace("<your-secret-key>", server.secret)
    path = tmp_path / "chat.py"
    path.write_text(script)
    done = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("Connected: {'type': 'connected', 'session_id': ")
    assert "'agents': ['echo']" in lines[0]
    assert lines[1] == "Hello!"
    assert lines[2] == "Done! Tokens: {'prompt_tokens': 1, 'candidates_tokens': 1}"
    code, out = server.stop()
    assert code == 0, out
