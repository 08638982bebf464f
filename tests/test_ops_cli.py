"""An operator's slips on the command line: each is one line naming what to fix, never a traceback.

Black-box: ``python -m connic run | check`` in subprocesses (tests/test_cli.py's helpers).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from test_cli import connic_cmd, one_error_line, write

from connic.metrics import MULTIPROC_ENV

CONFIG = '[agents.echo]\nuse = "echo"\n[[connectors]]\npath = "/ws"\nsecrets = ["s"]\nresume_window = 0\n'


@pytest.mark.parametrize(
    "command",
    [["run", "--port", "0"], ["run", "--port", "0", "--workers", "2"], ["check"]],
    ids=["run", "workers", "check"],
)
def test_a_multiprocess_dir_that_is_not_a_directory_is_one_line(tmp_path: Path, command: list[str]) -> None:
    config = write(tmp_path / "connic.toml", CONFIG)
    missing = tmp_path / "no-such-dir"
    done = connic_cmd(*command, "--config", str(config), env={MULTIPROC_ENV: str(missing)})
    line = one_error_line(done)
    assert MULTIPROC_ENV in line and str(missing) in line, line


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--session-timeout", "-1"], "--session-timeout: session_timeout must be a positive number"),
        (["--session-timeout", "nan"], "--session-timeout: session_timeout must be a finite number"),
        (["--max-messages", "0"], "--max-messages: max_messages must be between 1 and 10000"),
        (["--max-messages", "20000"], "--max-messages: max_messages must be between 1 and 10000"),
    ],
)
def test_a_bad_flag_value_is_blamed_on_the_flag_not_the_file(tmp_path: Path, flags: list[str], needle: str) -> None:
    # The file is fine: an error naming it (and a key it does not hold) sends the operator to the wrong place.
    config = write(tmp_path / "connic.toml", CONFIG)
    line = one_error_line(connic_cmd("run", "--port", "0", "--config", str(config), *flags))
    assert needle in line, line
    assert str(config) not in line, line


# "bad host name" fails in the C library without a DNS query (tests/test_config_edges.py);
# 192.0.2.1 (TEST-NET-1) is no address of this machine's.
@pytest.mark.parametrize(
    ("host", "problem"),
    [("bad host name", "cannot resolve 'bad host name'"), ("192.0.2.1", "cannot listen on '192.0.2.1'")],
)
def test_reload_with_port_0_and_a_bad_host_names_the_host(tmp_path: Path, host: str, problem: str) -> None:
    pytest.importorskip("watchfiles", reason="--reload needs watchfiles")
    # --port 0 under --reload: the watching parent picks the port first, before any child says it better.
    line = one_error_line(connic_cmd("run", "--reload", "--port", "0", "--host", host))
    assert line.startswith(f"connic: error: --host: {problem}"), line
    config = write(tmp_path / "connic.toml", f'[server]\nhost = "{host}"\n' + CONFIG)
    line = one_error_line(connic_cmd("run", "--reload", "--port", "0", "--config", str(config)))
    assert line.startswith(f"connic: error: {config}: server.host: {problem}"), line
