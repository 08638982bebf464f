"""A connector's or the metrics' path with a brace: aiohttp reads braces as a route pattern, so
``"/a/{x}"`` would serve every ``/a/...`` and ``"/a/{x"`` made the server's start raise a traceback
where ``check`` said ok. Both ``check`` and ``run`` refuse it in one line naming the file and the key."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_cli import connic_cmd, one_error_line, write

BASE = '[agents.bot]\nuse = "echo"\n\n'


@pytest.mark.parametrize("command", ["check", "run"])
@pytest.mark.parametrize(
    ("text", "key", "value"),
    [
        (BASE + '[[connectors]]\nsecrets = ["s"]\npath = "/a/{x"\n', "connectors[0].path", "'/a/{x'"),
        (BASE + '[[connectors]]\nsecrets = ["s"]\npath = "/a/{x}"\n', "connectors[0].path", "'/a/{x}'"),
        (
            BASE + '[[connectors]]\nsecrets = ["s"]\ntransport = "agui"\npath = "/agui/}"\n',
            "connectors[0].path",
            "'/agui/}'",
        ),
        (
            BASE + '[server]\nmetrics_path = "/m/{n}"\n\n[[connectors]]\nsecrets = ["s"]\n',
            "server.metrics_path",
            "'/m/{n}'",
        ),
    ],
    ids=["unclosed", "pattern", "agui", "metrics"],
)
def test_a_path_with_a_brace_is_one_line_naming_the_key(
    tmp_path: Path, command: str, text: str, key: str, value: str
) -> None:
    config = write(tmp_path / "paths.toml", text)
    args = ("run", "--port", "0") if command == "run" else ("check",)
    line = one_error_line(connic_cmd(*args, "--config", str(config)))
    problem = "must not contain '{' or '}' (aiohttp would read a route pattern)"
    assert line == f"connic: error: {config}: {key}: {problem}, got {value}"
