"""A connector's or the metrics' path with a brace: aiohttp reads braces as a route pattern, so
``"/a/{x}"`` would serve every ``/a/...`` and ``"/a/{x"`` made the server's start raise a traceback
where ``check`` said ok. Both ``check`` and ``run`` refuse it in one line naming the file and the key.
So does a route that another connector's (or ``/metrics``) would hide: aiohttp serves the first that matches."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from test_agui_support import agui_registry
from test_cli import connic_cmd, one_error_line, write

import connic
from connic.config import parse_config

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


AGUI_A = '[[connectors]]\nsecrets = ["s"]\ntransport = "agui"\npath = "/a"\n'
WS_A_WS = '[[connectors]]\nsecrets = ["s"]\npath = "/a/ws"\n'
HIDDEN = [
    # An agui connector at /a serves GET /a/ws (its WebSocket binding) and /a/page.js: a websocket
    # connector at /a/ws after it was never reached (its clients got AG-UI's RUN_ERROR), the banner
    # showing it all the same; before it, it hid the binding.
    (BASE + AGUI_A + WS_A_WS, "connectors[1].path: GET /a/ws is already served by connectors[0] (agui at '/a')"),
    (
        BASE + WS_A_WS + AGUI_A,
        "connectors[1].path: GET /a/ws is already served by connectors[0] (websocket at '/a/ws')",
    ),
    (
        BASE + '[server]\nmetrics_path = "/a/ws"\n\n' + AGUI_A,
        "server.metrics_path: GET /a/ws is already served by connectors[0] (agui at '/a')",
    ),
    # The same path as the route added just before: aiohttp's RuntimeError, a traceback from run.
    (
        BASE + '[server]\nmetrics_path = "/a/page.js"\n\n' + AGUI_A,
        "server.metrics_path: GET /a/page.js is already served by connectors[0] (agui at '/a')",
    ),
]
HIDDEN_IDS = ["agui-then-websocket", "websocket-then-agui", "metrics-binding", "metrics-page"]


@pytest.mark.parametrize(("text", "problem"), HIDDEN, ids=HIDDEN_IDS)
def test_check_refuses_a_route_another_connector_would_hide(tmp_path: Path, text: str, problem: str) -> None:
    config = write(tmp_path / "hidden.toml", text)
    line = one_error_line(connic_cmd("check", "--config", str(config)))
    assert line == f"connic: error: {config}: {problem}"


@pytest.mark.parametrize(("text", "problem"), HIDDEN, ids=HIDDEN_IDS)
def test_create_app_refuses_a_route_another_connector_would_hide(text: str, problem: str) -> None:
    with pytest.raises(connic.ConfigError) as caught:
        connic.create_app(parse_config(tomllib.loads(text), source="hidden.toml"), registry=agui_registry())
    assert caught.value.message == f"hidden.toml: {problem}"


def test_run_refuses_a_route_another_connector_would_hide(tmp_path: Path) -> None:
    config = write(tmp_path / "hidden.toml", HIDDEN[3][0])
    line = one_error_line(connic_cmd("run", "--port", "0", "--config", str(config)))
    assert line == f"connic: error: {config}: {HIDDEN[3][1]}"
