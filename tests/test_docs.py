"""The docs cover every config key, CLI command and flag, frame type and error code.

Everything is discovered by introspection, so a new key, flag, frame or code without
documentation fails here.
"""

from __future__ import annotations

import argparse
import re
import typing
from pathlib import Path

import attrs
import pytest

import connic.errors
import connic.frames
from connic.agents.echo import EchoAgent
from connic.cli import _parser
from connic.config import ConnectorConfig, ServerConfig
from connic.transports.websocket import RateLimit, WebSocketTransport

DOCS = Path(__file__).resolve().parent.parent / "docs"
NOT_WIRE_CODES = {"config_error", "plugin_error", "internal_error"}


def page(name: str) -> str:
    return (DOCS / name).read_text(encoding="utf-8")


def fields(cls: type) -> list[str]:
    return [f.name for f in attrs.fields(cls)]


@pytest.mark.parametrize(
    "name",
    [
        *fields(ServerConfig),
        *(n for n in fields(ConnectorConfig) if n != "options"),
        *fields(WebSocketTransport.Options),
        *fields(RateLimit),
        *fields(EchoAgent.Options),
        "use",
    ],
)
def test_config_key_documented(name: str) -> None:
    assert f"`{name}`" in page("configuration.md")


def cli_words() -> list[str]:
    words = []
    parser = _parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for command, sub in action.choices.items():
                words.append(command)
                for sub_action in sub._actions:
                    words += [o for o in sub_action.option_strings if o.startswith("--") and o != "--help"]
    return words


@pytest.mark.parametrize("word", cli_words())
def test_cli_documented(word: str) -> None:
    assert f"`{word}" in page("cli.md")


def server_frame_types() -> list[str]:
    return [cls.type for cls in typing.get_args(connic.frames.ServerFrame)]


@pytest.mark.parametrize("kind", [*server_frame_types(), "auth", "message", "cancel", "ping"])
def test_frame_type_documented(kind: str) -> None:
    text = page("protocol.md")
    assert f'"type": "{kind}"' in text or f"`{kind}`" in text


def error_classes() -> list[type[connic.errors.ConnicError]]:
    found = []
    for value in vars(connic.errors).values():
        if isinstance(value, type) and issubclass(value, connic.errors.ConnicError):
            found.append(value)
    return found


@pytest.mark.parametrize("code", sorted({c.code for c in error_classes()} - NOT_WIRE_CODES))
def test_error_code_documented(code: str) -> None:
    assert f"`{code}`" in page("protocol.md")


@pytest.mark.parametrize("close_code", sorted({c.close_code for c in error_classes() if c.close_code is not None}))
def test_close_code_documented(close_code: int) -> None:
    assert f"**{close_code}**" in page("protocol.md")


def test_client_frame_parser_accepts_only_documented_types() -> None:
    # Every type the parser knows appears in the protocol page (the parametrized test above),
    # and nothing else is accepted: an undocumented type must be unknown_type.
    with pytest.raises(connic.errors.UnknownType):
        connic.frames.parse_client_frame('{"type": "undocumented"}')


@pytest.mark.parametrize("path", sorted(DOCS.glob("*.md")), ids=lambda p: p.name)
def test_relative_links_resolve(path: Path) -> None:
    for target in re.findall(r"\]\(([^)#\s]+\.md)(?:#[^)]*)?\)", path.read_text(encoding="utf-8")):
        assert (path.parent / target).exists(), f"{path.name} links to missing {target}"


def test_every_page_is_in_the_toctree() -> None:
    index = page("index.md")
    for path in DOCS.glob("*.md"):
        if path.stem != "index":
            assert f"\n{path.stem}\n" in index, f"{path.name} is not in docs/index.md's toctree"
