"""A secret that is not UTF-8 text, from ``CONNIC_SECRET``, ``--secret`` or a Python config:
Python decodes such environment and argv bytes to lone surrogates, which ``str.encode`` refused
with a traceback from ``run`` and ``check``. Each is one line naming where the secret came from."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_cli import connic_cmd, one_error_line, write

import connic
from conftest import ROOT, make_config

CONFIG = '[agents.bot]\nuse = "echo"\n\n[[connectors]]\npath = "/ws"\n'


def connic_bytes(*args: bytes, env: dict[bytes, bytes]) -> subprocess.CompletedProcess[str]:
    """``python -m connic ARGS`` with arguments and environment given as bytes (not UTF-8 text)."""
    base = {k: v for k, v in os.environb.items() if not k.startswith(b"CONNIC_")}
    return subprocess.run(
        [sys.executable.encode(), b"-m", b"connic", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**base, **env},
        cwd=ROOT,
    )


@pytest.mark.parametrize("command", [b"check", b"run"])
def test_a_connic_secret_that_is_not_utf8_is_one_line(tmp_path: Path, command: bytes) -> None:
    config = write(tmp_path / "secret.toml", CONFIG)
    args = (command, b"--port", b"0") if command == b"run" else (command,)
    done = connic_bytes(*args, b"--config", os.fsencode(config), env={b"CONNIC_SECRET": b"ab\xffcd"})
    line = one_error_line(done)
    assert (
        line == "connic: error: CONNIC_SECRET: the environment variable is not valid UTF-8 text (connectors[0].secrets)"
    )


def test_a_secret_flag_that_is_not_utf8_is_one_line(tmp_path: Path) -> None:
    config = write(tmp_path / "secret.toml", CONFIG)
    done = connic_bytes(b"run", b"--port", b"0", b"--config", os.fsencode(config), b"--secret", b"ab\xffcd", env={})
    assert one_error_line(done) == "connic: error: --secret: not valid UTF-8 text"


def test_a_secret_with_a_lone_surrogate_in_a_python_config_is_a_config_error() -> None:
    with pytest.raises(connic.ConfigError, match=r"connectors\[0\]\.secrets: a secret must be valid Unicode text"):
        connic.create_app(make_config({"secrets": ["ab\udcffcd"]}))


def test_a_utf8_secret_still_starts(tmp_path: Path) -> None:
    config = write(tmp_path / "secret.toml", CONFIG)
    done = connic_cmd("check", "--config", str(config), env={"CONNIC_SECRET": "clé-secrète"})
    assert done.returncode == 0, done.stderr
