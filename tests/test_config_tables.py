"""A table key (``rate_limit``) given a value that is not a table: one line a TOML user can act on.

It read ``invalid value, expected connic.transports.websocket.RateLimit | None``, a Python path."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_cli import connic_cmd, one_error_line, write

BASE = '[agents.bot]\nuse = "echo"\n\n[[connectors]]\nsecrets = ["s"]\n'


@pytest.mark.parametrize("transport", ["websocket", "agui"])
@pytest.mark.parametrize("value", ["5", '"10/60"', "[10, 60]"])
def test_rate_limit_that_is_not_a_table_says_a_table_is_expected(tmp_path: Path, transport: str, value: str) -> None:
    config = write(tmp_path / "table.toml", BASE + f'transport = "{transport}"\nrate_limit = {value}\n')
    line = one_error_line(connic_cmd("check", "--config", str(config)))
    assert line == f"connic: error: {config}: connectors[0].rate_limit: expected a table ({{ key = value, ... }})"
