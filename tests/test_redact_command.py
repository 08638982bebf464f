"""connic.redact.safe_command: a command line for errors and logs, secrets hidden, the rest kept.

An MCP server run over stdio is named by its command line (McpServerSpec.label), and its
args are where tokens go; tests/test_mcp.py checks the label end to end, in errors and logs.
"""

from __future__ import annotations

import shlex
import subprocess
import sys

import pytest

from connic.agents.mcp import McpServers
from connic.redact import REDACTED, command_secrets, safe_command, safe_url, scrub, secret_name

R = REDACTED

KEPT = [
    ["npx", "-y", "@modelcontextprotocol/server-filesystem", "/srv/data"],
    ["npx", "-y", "srv"],
    ["uvx", "mcp-server-git", "--repository", "/home/me/src/project-2024"],
    ["python", "-m", "my_server", "--port", "8080", "--host", "127.0.0.1", "-v"],
    ["docker", "run", "-i", "--rm", "-e", "GITHUB_PERSONAL_ACCESS_TOKEN", "ghcr.io/github/github-mcp-server"],
    ["node", "build/index.js", "--max-tokens", "4096", "--tokenizer", "cl100k_base", "--author", "Ann"],
    ["server", "--token-file", "/run/secrets/token", "--api-key-env", "OPENAI_API_KEY", "--password-stdin"],
    ["server", "--no-auth", "/srv/data", "--keyboard", "us"],
    ["npx", "mcp-remote", "https://mcp.example.com/sse", "--header", "Content-Type: application/json"],
    ["pip", "install", "scikit-learn==1.5.0", "sk-learn-helpers", "hf_transfer"],
    ["server", "--id", "123e4567-e89b-12d3-a456-426614174000", "--when", "2024-01-01T12:00:00Z"],
    ["server", "-k", "short", "-p", "5432", "-t"],
    ["server", '{"max_tokens":"4096","author":"Ann","token_file":"/run/t"}'],
]


@pytest.mark.parametrize("argv", KEPT, ids=lambda argv: " ".join(argv)[:40])
def test_ordinary_arguments_are_kept(argv: list[str]) -> None:
    assert safe_command(argv) == shlex.join(argv)
    assert command_secrets(argv) == []


HIDDEN = [
    (["npx", "-y", "srv", "--api-key", "sk-test-SECRET123"], f"npx -y srv --api-key {R}"),
    (["srv", "--api-key=abc"], f"srv --api-key={R}"),
    (["srv", "--apiKey", "abc", "--port", "8080"], f"srv --apiKey {R} --port 8080"),
    (["srv", "--token", "t", "--access_token=t", "-token", "t"], f"srv --token {R} --access_token={R} -token {R}"),
    (
        ["srv", "--client-secret", "s", "--db-password", "p", "--passwd", "p"],
        f"srv --client-secret {R} --db-password {R} --passwd {R}",
    ),
    (["srv", "--auth", "me:pw", "--pass", "pw", "--credentials", "c"], f"srv --auth {R} --pass {R} --credentials {R}"),
    (["srv", "--token", "--verbose"], "srv --token --verbose"),  # a flag: the next option is not its value
    (["srv", "--api-key"], "srv --api-key"),
    (["srv", "--api-key="], "srv --api-key="),
    (["docker", "run", "-e", "GITHUB_TOKEN=ghp_abc", "img"], f"docker run -e GITHUB_TOKEN={R} img"),
    (["srv", "OPENAI_API_KEY=x", "DEBUG=1"], f"srv OPENAI_API_KEY={R} DEBUG=1"),
    (["mcp-remote", "--header", "Authorization: Bearer abc"], f"mcp-remote --header 'Authorization: {R}'"),
    (["mcp-remote", "--header", "Authorization:${AUTH}"], f"mcp-remote --header Authorization:{R}"),
    (["srv", "-H", "X-API-Key: abc"], f"srv -H 'X-API-Key: {R}'"),
    (["srv", "https://me:pw@h.example/mcp"], "srv 'https://***@h.example/mcp'"),
    (["srv", "--url=https://h.example/mcp?key=abc&x=1#frag"], "srv --url=https://h.example/mcp"),
    (["srv", "postgresql://app:pw@db:5432/app"], "srv 'postgresql://***@db:5432/app'"),
    (["srv", "http://[::1/mcp?token=abc"], f"srv {R}"),  # unparsable: nothing can be shown
    (["srv", "sk-test-SECRET123"], f"srv {R}"),
    (["srv", "-k", "sk-proj-4f0a9c1e7b"], f"srv -k {R}"),
    (["srv", "--github", "ghp_16C7e42F292c6912E7710c838347Ae178B4a"], f"srv --github {R}"),
    (["srv", "xoxb-1234-5678-abcdef", "AIzaSyA1b2C3d4E5f6", "glpat-Ab12Cd34Ef56"], f"srv {R} {R} {R}"),
    (["srv", "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.abc"], f"srv {R}"),
    (["srv", "--key", "x", "Bearer sk-ant-api03-Zz9"], f"srv --key {R} 'Bearer {R}'"),
    (["srv", "a1b2c3d4e5f6a7b8c9d0e1f2a3b4"], f"srv {R}"),  # 28 letters and digits mixed
    (["srv", "--id=3f2a9c8d7e6b5a4f3e2d1c0b9a8f7e6d"], f"srv --id={R}"),
    (["srv", "REDACTED", "--token", "REDACTED"], f"srv REDACTED --token {R}"),  # the stand-in is not confused
    (["srv", "a b", "--token", "x y"], f"srv 'a b' --token {R}"),
    (["srv", '{"password":"hunter22","host":"db"}'], f'srv \'{{"password":"{R}","host":"db"}}\''),
    (["srv", '--config={"apiKey": "abc", "port": 8080}'], f'srv \'--config={{"apiKey": "{R}", "port": 8080}}\''),
]


@pytest.mark.parametrize(("argv", "label"), HIDDEN, ids=lambda value: str(value)[:40])
def test_secrets_are_hidden_and_the_rest_kept(argv: list[str], label: str) -> None:
    assert safe_command(argv) == label


OPTION_GIVEN_AN_ASSIGNMENT = [
    (["docker", "run", "--env=DB_PASSWORD=hunter2", "img"], f"docker run --env=DB_PASSWORD={R} img", "hunter2"),
    (["mcp-remote", "--header=Authorization: Bearer abc"], f"mcp-remote '--header=Authorization: {R}'", "Bearer abc"),
    (["srv", "--set=auth.password=hunter2"], f"srv --set=auth.password={R}", "hunter2"),
]


@pytest.mark.parametrize(("argv", "label", "secret"), OPTION_GIVEN_AN_ASSIGNMENT, ids=lambda value: str(value)[:40])
def test_an_option_given_a_secret_named_assignment_in_one_argument_hides_its_value(
    argv: list[str], label: str, secret: str
) -> None:
    # The option's own name says nothing (--env, --header, --set): the assignment it is given does,
    # as when the two are separate arguments (-e DB_PASSWORD=hunter2).
    assert safe_command(argv) == label
    assert command_secrets(argv) == [secret]


def test_a_long_line_of_dotted_words_is_handled_in_linear_time() -> None:
    # A URL's scheme is searched for before each "://": a run of "a.a.a..." ahead of one made
    # each position scan to its end (quadratic: 400,000 characters took some 40 s, blocking the
    # event loop while an MCP server's stderr line was scrubbed). Bounded: killed after 20 s.
    code = "from connic.redact import safe_command, scrub; s = 'a.' * 200_000 + ' ://'; scrub(s); safe_command([s])"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=20)


def test_the_hidden_values_are_returned_for_scrubbing() -> None:
    argv = ["srv", "--api-key", "k-1", "--token=t-2", "A_SECRET=s-3", "x", "sk-test-SECRET123", "https://u:pw@h/"]
    assert command_secrets(argv) == ["k-1", "t-2", "s-3", "sk-test-SECRET123"]  # a URL's parts are hidden by shape


@pytest.mark.parametrize(
    "name",
    [
        "--api-key",
        "--apikey",
        "--apiKey",
        "--api_key",
        "API_KEY",
        "--key",
        "GITHUB_TOKEN",
        "--accessToken",
        "-token",
        "X-Auth-Token",
        "--client-secret",
        "--DB-PASSWORD",
        "--passwd",
        "--passphrase",
        "Authorization",
        "--auth",
        "--basicAuth",
        "--pass",
        "--pat",
        "--credentials",
        "--bearer",
        "Cookie",
        "--private-key",
    ],
)
def test_secret_bearing_names(name: str) -> None:
    assert secret_name(name)


@pytest.mark.parametrize(
    "name",
    [
        "--port",
        "-y",
        "--token-file",
        "--api-key-env",
        "--keyFile",
        "--no-auth",
        "--noAuth",
        "--max-tokens",
        "--tokenizer",
        "--author",
        "--bypass",
        "--compat",
        "--password-stdin",
        "--keys",
        "--secret-name",
        "",
        "--",
    ],
)
def test_names_that_are_not_secret_bearing(name: str) -> None:
    assert not secret_name(name)


def test_scrub_hides_known_secrets_urls_and_tokens_in_a_line() -> None:
    line = "error: key hunter22 rejected by https://me:pw@h/x?k=1 (tried ghp_16C7e42F292c6912E7710c) at 12:00"
    expected = f"error: key {R} rejected by https://***@h/x (tried {R}) at 12:00"
    assert scrub(line, ["hunter22", "pw", ""]) == expected
    assert scrub("a pw here", ["pw"]) == "a pw here"  # too short to look for: it would blank out words
    assert scrub("nothing to hide: 1.5 s, /srv/data") == "nothing to hide: 1.5 s, /srv/data"
    assert scrub("nul\x00byte") == "nul\ufffdbyte"  # not taken for a hidden part
    assert scrub('config {"client_secret": "zz-9", "user": "me"}') == f'config {{"client_secret": "{R}", "user": "me"}}'


def test_safe_url_of_an_unparsable_url_hides_it_all() -> None:
    assert safe_url("http://[::1/mcp?token=abc") == REDACTED
    assert safe_url("http://127.0.0.1:8000/mcp") == "http://127.0.0.1:8000/mcp"


def test_a_stdio_servers_secrets_are_those_of_its_args_and_its_secret_named_env() -> None:
    entry = {
        "command": "npx",
        "args": ["-y", "srv", "--api-key", "sk-test-SECRET123"],
        "env": {"API_TOKEN": "tok-value", "DEBUG": "1", "HOME_DIR": "/srv"},
    }
    spec = McpServers.from_config([entry], agent="bot").specs[0]
    assert spec.label == f"npx -y srv --api-key {R}"
    assert spec.secrets == ["sk-test-SECRET123", "tok-value"]
