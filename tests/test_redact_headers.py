"""connic.redact.safe_command: a header option's secret value is hidden, its name kept.

Programs such as ``mcp-remote`` and ``curl`` take a header as ``--header "Name: value"`` (one
argument, tests/test_redact_command.py) or as the name and the value in two arguments
(``--header Authorization "Bearer ..."``): the second form showed the value.
"""

from __future__ import annotations

import shlex

import pytest

from connic.redact import REDACTED, command_secrets, safe_command

R = REDACTED

HIDDEN = [
    (
        ["mcp-remote", "--header", "Authorization", "Bearer sk-abc"],
        f"mcp-remote --header Authorization {R}",
        "Bearer sk-abc",
    ),
    (["srv", "--headers", "Authorization", "Bearer abc"], f"srv --headers Authorization {R}", "Bearer abc"),
    (["srv", "-H", "X-Api-Key", "k"], f"srv -H X-Api-Key {R}", "k"),
    (["srv", "--HEADER", "cookie", "sid=1"], f"srv --HEADER cookie {R}", "sid=1"),
    (["srv", "--Headers", "Proxy-Authorization", "Basic dTpw"], f"srv --Headers Proxy-Authorization {R}", "Basic dTpw"),
    (["srv", "-H", "X-Auth-Token", "t0k"], f"srv -H X-Auth-Token {R}", "t0k"),
    (["srv", "--header=Authorization", "Bearer abc"], f"srv --header=Authorization {R}", "Bearer abc"),
    (["srv", "--headers=X-API-KEY", "k", "--port", "1"], f"srv --headers=X-API-KEY {R} --port 1", "k"),
    (["srv", "-H=Cookie", "a=b"], f"srv -H=Cookie {R}", "a=b"),
    # The one-argument forms, with these options too (already hidden: pinned here with the rest).
    (["srv", "--headers", "Authorization: Bearer abc"], f"srv --headers 'Authorization: {R}'", "Bearer abc"),
    (["srv", "-H", "Cookie:sid=1"], f"srv -H Cookie:{R}", "sid=1"),
    (["srv", "--HEADER=X-Api-Key: k"], f"srv '--HEADER=X-Api-Key: {R}'", "k"),
]


@pytest.mark.parametrize(("argv", "label", "secret"), HIDDEN, ids=lambda value: str(value)[:48])
def test_a_secret_named_headers_value_is_hidden_and_its_name_kept(argv: list[str], label: str, secret: str) -> None:
    assert safe_command(argv) == label
    assert command_secrets(argv) == [secret]  # and scrubbed from the server's stderr


def test_two_headers_in_a_row_each_lose_a_secret_value() -> None:
    argv = ["srv", "-H", "Authorization", "Bearer a", "-H", "X-Request-Id", "42", "--header", "Cookie", "c=1"]
    assert safe_command(argv) == f"srv -H Authorization {R} -H X-Request-Id 42 --header Cookie {R}"
    assert command_secrets(argv) == ["Bearer a", "c=1"]


KEPT = [
    ["mcp-remote", "--header", "Content-Type", "application/json"],
    ["srv", "-H", "X-Request-Id", "42", "/srv/data"],
    ["srv", "--headers=Accept", "text/plain"],
    ["srv", "--header", "Authorization"],  # no value follows
    ["srv", "--header", "Authorization", "--verbose"],  # an option is not the value, as for --token
    ["srv", "--header", "--verbose", "x"],
    ["srv", "--header-file", "Authorization", "x"],  # not a header option
    ["srv", "--token-file", "/run/t", "Authorization", "x"],  # a header name with no header option before it
]


@pytest.mark.parametrize("argv", KEPT, ids=lambda argv: " ".join(argv)[:48])
def test_other_headers_and_arguments_are_kept(argv: list[str]) -> None:
    assert safe_command(argv) == shlex.join(argv)
    assert command_secrets(argv) == []
