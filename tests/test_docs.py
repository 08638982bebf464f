"""The documentation in docs/ is complete and its examples hold.

What must be documented is discovered by introspection (configuration classes, the CLI parser,
the frame classes and parser, the error classes), so a new key, flag, frame or code without
documentation fails here.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import json
import re
import textwrap
import tomllib
import types
import typing
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import attrs
import pytest

import connic.errors
import connic.frames
from connic.agents.echo import EchoAgent
from connic.app import build_runtime
from connic.cli import _parser
from connic.config import ConnectorConfig, ServerConfig, parse_config
from connic.registry import Registry
from connic.stores.memory import MemoryStore
from connic.transports.websocket import WebSocketTransport

DOCS = Path(__file__).resolve().parent.parent / "docs"
PAGES = sorted(DOCS.glob("*.md"))
NOT_WIRE_CODES = {"config_error", "plugin_error", "internal_error"}


def page(name: str) -> str:
    return (DOCS / name).read_text(encoding="utf-8")


def code_blocks(text: str, language: str) -> list[str]:
    """The contents of the page's fenced blocks in ``language`` (also those indented in lists)."""
    found = re.findall(rf"^([ \t]*)```{language}\n(.*?)^\1```", text, re.M | re.S)
    return [textwrap.dedent(block) for _, block in found]


def table_row(text: str, name: str) -> str | None:
    """The Markdown table row whose first cell is `name`, if any."""
    match = re.search(rf"^\| `{re.escape(name)}` \|.*$", text, re.M)
    return match.group(0) if match else None


# --- configuration ---------------------------------------------------------------------------


def attrs_class_in(tp: Any) -> type | None:
    """The attrs class in a field type such as ``RateLimit | None``, if any."""
    if isinstance(tp, type) and attrs.has(tp):
        return tp
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            found = attrs_class_in(arg)
            if found is not None:
                return found
    return None


def config_keys() -> list[tuple[str, Any]]:
    """Every key of [server], [[connectors]] and the websocket transport, with its default."""
    keys = []
    for cls in (ServerConfig, ConnectorConfig, WebSocketTransport.Options):
        defaults = cls()
        keys += [(f.name, getattr(defaults, f.name)) for f in attrs.fields(cls) if f.name != "options"]
    return keys


def nested_config_keys() -> list[str]:
    """Keys of tables nested in a key (``rate_limit = { messages, per }``), and the echo agent's."""
    names = [f.name for f in attrs.fields(EchoAgent.Options)]
    options = attrs.resolve_types(WebSocketTransport.Options)
    for field in attrs.fields(options):
        nested = attrs_class_in(field.type)
        if nested is not None:
            names += [f.name for f in attrs.fields(nested)]
    return names


def toml_default(value: Any) -> str | None:
    """How a default is written in configuration.md's tables; None when it has no TOML form."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple) and not value:
        return "[]"
    return None


@pytest.mark.parametrize(("name", "default"), config_keys(), ids=[name for name, _ in config_keys()])
def test_config_key_documented_with_its_default(name: str, default: Any) -> None:
    row = table_row(page("configuration.md"), name)
    assert row is not None, f"configuration.md has no table row for `{name}`"
    written = toml_default(default)
    if written is not None:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert f"`{written}`" in cells[2], f"`{name}` defaults to {written}; the table says {cells[2]}"


def agui_keys() -> list[tuple[str, Any]]:
    """Every key of the agui transport, with its default (its own table: some defaults differ from websocket's)."""
    from connic.transports.agui import AguiTransport

    defaults = AguiTransport.Options()
    return [(f.name, getattr(defaults, f.name)) for f in attrs.fields(AguiTransport.Options)]


def agui_table() -> str:
    """configuration.md's section of the agui transport, up to the next heading."""
    text = page("configuration.md")
    start = text.index('### `transport = "agui"`')
    end = text.index("\n#", start + 1)
    return text[start:end]


@pytest.mark.parametrize(("name", "default"), agui_keys(), ids=[name for name, _ in agui_keys()])
def test_agui_config_key_documented_with_its_default(name: str, default: Any) -> None:
    row = table_row(agui_table(), name)
    assert row is not None, f"configuration.md's agui table has no row for `{name}`"
    written = toml_default(default)
    if written is not None:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert f"`{written}`" in cells[2], f"agui `{name}` defaults to {written}; the table says {cells[2]}"


@pytest.mark.parametrize("name", [*nested_config_keys(), "use"])
def test_nested_config_key_documented(name: str) -> None:
    assert f"`{name}`" in page("configuration.md")


@pytest.mark.parametrize("variable", ["CONNIC_SECRET", "CONNIC_CONFIG"])
def test_environment_variable_documented(variable: str) -> None:
    assert table_row(page("configuration.md"), variable) is not None


# --- command line ----------------------------------------------------------------------------


def cli_commands_and_flags() -> tuple[list[str], list[str]]:
    commands: list[str] = []
    flags: list[str] = []

    def walk(parser: argparse.ArgumentParser) -> None:
        for action in parser._actions:
            flags.extend(o for o in action.option_strings if o.startswith("--"))
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    commands.append(name)
                    walk(sub)

    walk(_parser())
    return commands, sorted(set(flags))


@pytest.mark.parametrize("command", cli_commands_and_flags()[0])
def test_cli_command_documented(command: str) -> None:
    assert f"## `connic {command}`" in page("cli.md")


@pytest.mark.parametrize("flag", cli_commands_and_flags()[1])
def test_cli_flag_documented(flag: str) -> None:
    assert re.search(rf"`{re.escape(flag)}( [^`]*)?`", page("cli.md")), f"cli.md does not document `{flag}`"


# --- frames ----------------------------------------------------------------------------------


def server_frame_classes() -> list[Any]:
    return list(typing.get_args(connic.frames.ServerFrame))


def client_frame_types() -> list[str]:
    """The ``type`` values parse_client_frame accepts: the strings it compares ``kind`` with."""
    tree = ast.parse(inspect.getsource(connic.frames.parse_client_frame))
    found = [
        node.comparators[0].value
        for node in ast.walk(tree)
        if isinstance(node, ast.Compare)
        and isinstance(node.left, ast.Name)
        and node.left.id == "kind"
        and isinstance(node.comparators[0], ast.Constant)
        and isinstance(node.comparators[0].value, str)
    ]
    assert "message" in found, "parse_client_frame changed shape: update client_frame_types()"
    return found


def test_client_frame_types_are_all_found() -> None:
    # An undocumented type must be refused; a documented one must not be.
    with pytest.raises(connic.errors.UnknownType):
        connic.frames.parse_client_frame('{"type": "undocumented"}')
    for kind in client_frame_types():
        try:
            connic.frames.parse_client_frame(json.dumps({"type": kind}))
        except connic.errors.UnknownType:
            pytest.fail(f"{kind!r} was found in parse_client_frame but is refused")
        except connic.errors.ProtocolError:
            pass  # known type, incomplete frame


def sample(tp: Any) -> Any:
    """A value of type ``tp``; optional fields get a value so that their keys show."""
    if tp is Any:  # a JSON value (tool_result's result, progress's detail)
        return "x"
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return sample(next(arg for arg in typing.get_args(tp) if arg is not type(None)))
    origin = typing.get_origin(tp) or tp
    values: dict[Any, Any] = {str: "x", bool: True, int: 1, float: 1.0, tuple: ("x",)}
    if origin in values:
        return values[origin]
    if isinstance(origin, type) and issubclass(origin, Mapping):
        return {}
    raise TypeError(f"no sample for {tp!r}")


SEQUENCED = {
    "ack",
    "stream_start",
    "stream_chunk",
    "stream_end",
    "response",
    "tool_call",
    "tool_result",
    "progress",
    "error",
}
"""Frame types whose JSON form gains ``seq`` when they belong to a message (PROTOCOL.md §7)."""


def frame_keys(cls: type) -> set[str]:
    """Every key the frame's JSON form can have, ``seq`` included."""
    resolved = attrs.resolve_types(cls)
    frame = cls(**{f.name: sample(f.type) for f in attrs.fields(resolved)})
    keys = set(frame.to_dict())
    return keys | {"seq"} if getattr(cls, "type", None) in SEQUENCED else keys


def json_examples(text: str) -> Iterator[dict[str, Any]]:
    """Every JSON object in the page's ```json blocks (a block may hold several)."""
    decoder = json.JSONDecoder()
    for block in code_blocks(text, "json"):
        position = 0
        while position < len(block):
            if block[position].isspace():
                position += 1
                continue
            value, position = decoder.raw_decode(block, position)
            assert isinstance(value, dict), f"a JSON example is not an object: {value!r}"
            yield value


SERVER_TYPES = {cls.type: cls for cls in server_frame_classes()}


@pytest.mark.parametrize("kind", [*SERVER_TYPES, *client_frame_types()])
def test_frame_type_has_a_json_example(kind: str) -> None:
    kinds = {example.get("type") for example in json_examples(page("protocol.md"))}
    assert kind in kinds, f"protocol.md has no JSON example of {kind!r}"


@pytest.mark.parametrize("kind", list(SERVER_TYPES))
def test_server_frame_examples_show_every_field(kind: str) -> None:
    keys = frame_keys(SERVER_TYPES[kind])
    shown: set[str] = set()
    for example in json_examples(page("protocol.md")):
        if example.get("type") == kind:
            shown |= set(example)
    assert shown == keys, f"{kind} examples show {sorted(shown)}, the frame has {sorted(keys)}"


@pytest.mark.parametrize("path", PAGES, ids=lambda p: p.name)
def test_json_examples_are_real_frames(path: Path) -> None:
    for example in json_examples(path.read_text(encoding="utf-8")):
        kind = example.get("type")
        if kind in SERVER_TYPES:
            extra = set(example) - frame_keys(SERVER_TYPES[kind])
            assert not extra, f"{path.name}: {kind} example has keys no {kind} frame has: {extra}"
        else:
            connic.frames.parse_client_frame(json.dumps(example))  # raises on a bad example


# --- errors ----------------------------------------------------------------------------------


def wire_errors() -> list[type[connic.errors.ConnicError]]:
    found = [
        value
        for value in vars(connic.errors).values()
        if isinstance(value, type) and issubclass(value, connic.errors.ConnicError)
    ]
    return [cls for cls in found if cls.code not in NOT_WIRE_CODES]


@pytest.mark.parametrize("error", wire_errors(), ids=lambda cls: cls.code)
def test_error_code_and_close_code_documented(error: type[connic.errors.ConnicError]) -> None:
    row = table_row(page("protocol.md"), error.code)
    assert row is not None, f"protocol.md's error table has no row for `{error.code}`"
    if error.close_code is None:
        assert "stays open" in row
    else:
        assert f"**{error.close_code}**" in row


# --- links, pages and examples ---------------------------------------------------------------


def anchors(text: str) -> set[str]:
    """The heading anchors MyST makes (myst_heading_anchors = 3; GitHub-style slugs)."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    found: set[str] = set()
    for title in re.findall(r"^#{1,3} (.+)$", text, re.M):
        plain = re.sub(r"[`*]", "", re.sub(r"\[([^]]*)\]\([^)]*\)", r"\1", title)).strip()
        slug = re.sub(r"[^\w\- ]", "", plain.lower()).replace(" ", "-")
        candidate, n = slug, 0
        while candidate in found:
            n += 1
            candidate = f"{slug}-{n}"
        found.add(candidate)
    return found


@pytest.mark.parametrize("path", PAGES, ids=lambda p: p.name)
def test_relative_links_resolve(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    for target, anchor in re.findall(r"\]\((?![a-z]+:)([^)#\s]*)(?:#([^)\s]*))?\)", text):
        linked = path if not target else path.parent / target
        assert linked.exists(), f"{path.name} links to missing {target}"
        if anchor:
            assert anchor in anchors(linked.read_text(encoding="utf-8")), f"{path.name}: no #{anchor} in {linked.name}"


def test_every_page_is_in_the_toctree_and_the_contents() -> None:
    index = page("index.md")
    toctree = re.search(r"```\{toctree\}\n(.*?)```", index, re.S)
    assert toctree is not None
    entries = [line.strip() for line in toctree.group(1).splitlines() if line.strip() and not line.startswith(":")]
    for entry in entries:
        assert (DOCS / f"{entry}.md").exists(), f"the toctree names a missing page {entry}"
    for path in PAGES:
        if path.stem != "index":
            assert path.stem in entries, f"{path.name} is not in index.md's toctree"
            assert f"]({path.name})" in index, f"{path.name} is not in index.md's contents"


@pytest.mark.parametrize("path", PAGES, ids=lambda p: p.name)
def test_python_examples_compile(path: Path) -> None:
    for block in code_blocks(path.read_text(encoding="utf-8"), "python"):
        compile(block, f"{path.name} example", "exec")


def builtin_registry() -> Registry:
    registry = Registry()
    registry.register("agents", "echo", EchoAgent)
    registry.register("transports", "websocket", WebSocketTransport)
    registry.register("stores", "memory", MemoryStore)
    return registry


@pytest.mark.parametrize("path", PAGES, ids=lambda p: p.name)
def test_toml_examples_are_valid(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CONNIC_SECRET", raising=False)
    for block in code_blocks(path.read_text(encoding="utf-8"), "toml"):
        data = tomllib.loads(block)
        if not set(data) <= {"server", "agents", "connectors", "store"}:
            continue  # packaging metadata, not a connic configuration
        config = parse_config(data, source=f"{path.name} example")
        uses = {a.use for a in config.agents.values()} | {m.use for c in config.connectors for m in c.middleware}
        transports = {c.transport for c in config.connectors}
        if config.agents and config.connectors and uses <= {"echo"} and transports <= {"websocket"}:
            build_runtime(config, builtin_registry())  # plugin options and every check of a real start


# --- the built-in agents' options and MCP server entries -------------------------------------


def option_rows(text: str, name: str) -> list[list[str]]:
    """The cells of each Markdown table row whose first cell names `name`, alone or among others
    (`temperature`, `top_p`), in a table with a default column (key | type | default | meaning)."""
    rows = re.findall(rf"^\| (?:[^|]*, )?`{re.escape(name)}`(?:, [^|]*)? \|.*$", text, re.M)
    cells = [[cell.strip() for cell in row.strip("|").split("|")] for row in rows]
    return [row for row in cells if len(row) >= 4]


def assert_option_documented(page_name: str, name: str, default: Any) -> None:
    """`name` has a row on `page_name`; when its default has a TOML form, the default cell shows it."""
    rows = option_rows(page(page_name), name)
    assert rows, f"{page_name} has no table row for `{name}`"
    written = toml_default(default)
    if written is not None:
        said = [row[2] for row in rows]
        assert any(f"`{written}`" in cell for cell in said), f"{page_name}: `{name}` defaults to {written}; says {said}"


def agent_options() -> list[tuple[str, str, Any]]:
    """(page, option, default) for every option of the built-in agents, tool options included."""
    from connic.agents.gemini import GeminiAgent
    from connic.agents.openai import OpenAIAgent
    from connic.agents.tool_loop import ToolOptions

    found = []
    for page_name, options in (
        ("agents-gemini.md", GeminiAgent.Options),
        ("agents-openai.md", OpenAIAgent.Options),
        ("configuration.md", EchoAgent.Options),
        ("configuration.md", ToolOptions),  # the tool options' own table, beside each agent's page
    ):
        defaults = options()
        found += [(page_name, f.name, getattr(defaults, f.name)) for f in attrs.fields(options)]
    return found


@pytest.mark.parametrize(
    ("page_name", "name", "default"), agent_options(), ids=[f"{p}:{n}" for p, n, _ in agent_options()]
)
def test_agent_option_documented_with_its_default(page_name: str, name: str, default: Any) -> None:
    assert_option_documented(page_name, name, default)


def mcp_server_keys() -> list[tuple[str, Any]]:
    """Every key of an ``mcp_servers`` entry, with its default where it has one."""
    from connic.agents import mcp_config

    defaults = {
        "start_timeout": mcp_config.START_TIMEOUT,
        "call_timeout": mcp_config.CALL_TIMEOUT,
        "max_result_bytes": mcp_config.MAX_RESULT_BYTES,
    }
    return [(key, defaults.get(key)) for key in mcp_config.KEYS]


@pytest.mark.parametrize(("name", "default"), mcp_server_keys(), ids=[name for name, _ in mcp_server_keys()])
def test_mcp_server_key_documented_with_its_default(name: str, default: Any) -> None:
    assert_option_documented("mcp.md", name, default)
