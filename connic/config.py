"""Configuration: a TOML file structured by cattrs into frozen attrs classes.

Structuring is two-phase. :func:`load_config` checks the file's own shape (the
``server`` table, the ``agents`` tables and the ``connectors`` list); the
plugin-specific keys (an agent's options, a transport's settings, a middleware's
options) stay as plain dicts until :mod:`connic.app` resolves the plugins and
structures them into each plugin's ``Options`` class with :func:`structure`.
Every error names the file and the key.
"""

from __future__ import annotations

import math
import tomllib
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import attrs
import cattrs
from cattrs.errors import ForbiddenExtraKeysError

from connic.errors import ConfigError

__all__ = [
    "AgentConfig",
    "Config",
    "ConnectorConfig",
    "MiddlewareConfig",
    "ServerConfig",
    "StoreConfig",
    "at_least_one",
    "default_config",
    "in_range",
    "load_config",
    "non_negative",
    "one_of",
    "parse_config",
    "positive",
    "structure",
]

T = TypeVar("T")


def _finite(attribute: attrs.Attribute[Any], value: float) -> None:
    # inf and nan are valid TOML floats and compare in surprising ways: inf passes "> 0"
    # (then rate_limit.per = inf divides by zero on a session's second message).
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{attribute.name} must be a finite number, got {value!r}")


def in_range(low: float, high: float) -> Any:
    """An attrs validator: ``low <= value <= high`` (finite), naming the field when not."""

    def check(_: object, attribute: attrs.Attribute[Any], value: float) -> None:
        _finite(attribute, value)
        if not low <= value <= high:
            raise ValueError(f"{attribute.name} must be between {low:g} and {high:g}, got {value!r}")

    return check


def one_of(*values: str) -> Any:
    """An attrs validator: the value is one of ``values``, naming the field and the choices when not."""

    def check(_: object, attribute: attrs.Attribute[Any], value: str) -> None:
        if value not in values:
            raise ValueError(f"{attribute.name} must be one of {', '.join(values)}, got {value!r}")

    return check


def positive(_: object, attribute: attrs.Attribute[Any], value: float) -> None:
    """An attrs validator: the value is a finite number greater than zero."""
    _finite(attribute, value)
    if not value > 0:
        raise ValueError(f"{attribute.name} must be a positive number, got {value!r}")


def at_least_one(_: object, attribute: attrs.Attribute[Any], value: int) -> None:
    """An attrs validator: the value is an integer of 1 or more (a count, a size in bytes)."""
    if value < 1:
        raise ValueError(f"{attribute.name} must be at least 1, got {value!r}")


def non_negative(_: object, attribute: attrs.Attribute[Any], value: float) -> None:
    """An attrs validator: the value is a finite number, zero or more."""
    _finite(attribute, value)
    if not value >= 0:
        raise ValueError(f"{attribute.name} must be >= 0, got {value!r}")


@attrs.frozen
class ServerConfig:
    """The ``[server]`` table.

    ``max_connections`` and ``max_connections_per_ip`` cap open WebSocket
    connections across all connectors (0: no cap); ``metrics_port`` 0 serves
    ``metrics_path`` on the main port. ``playground`` serves the browser page at ``/`` (docs/playground.md).
    ``telemetry`` (auto, on, off), ``telemetry_capture_content`` and ``log_format`` (text, json):
    docs/observability.md. ``start_timeout``: seconds each worker of ``run --workers N`` may take to
    listen, ``worker_timeout`` how long one may go without a heartbeat (docs/cli.md).
    """

    host: str = "127.0.0.1"
    port: int = attrs.field(default=8080, validator=in_range(0, 65535))
    shutdown_grace: float = attrs.field(default=10.0, validator=non_negative)
    handshake_timeout: float = attrs.field(default=15.0, validator=positive)
    start_timeout: float = attrs.field(default=60.0, validator=positive)
    worker_timeout: float = attrs.field(default=60.0, validator=non_negative)
    max_connections: int = attrs.field(default=10_000, validator=non_negative)
    max_connections_per_ip: int = attrs.field(default=0, validator=non_negative)
    max_unauthenticated: int | None = attrs.field(default=None, validator=attrs.validators.optional(non_negative))
    metrics: bool = True
    metrics_path: str = "/metrics"
    metrics_port: int = attrs.field(default=0, validator=in_range(0, 65535))
    playground: bool = True
    telemetry: str = attrs.field(default="auto", validator=one_of("auto", "on", "off"))
    telemetry_capture_content: bool = False
    log_format: str = attrs.field(default="text", validator=one_of("text", "json"))


@attrs.frozen
class AgentConfig:
    """One ``[agents.NAME]`` table: the plugin to ``use`` and its options."""

    use: str
    options: Mapping[str, Any] = attrs.field(factory=dict)


@attrs.frozen
class StoreConfig:
    """The ``[store]`` table: the session store plugin to ``use`` and its options."""

    use: str = "memory"
    options: Mapping[str, Any] = attrs.field(factory=dict)


@attrs.frozen
class MiddlewareConfig:
    """One entry of a connector's ``middleware`` list."""

    use: str
    options: Mapping[str, Any] = attrs.field(factory=dict)


@attrs.frozen
class ConnectorConfig:
    """One ``[[connectors]]`` entry.

    ``agents`` empty means every configured agent. ``options`` holds the
    transport's own keys (for ``websocket``: ``streaming``, ``secrets`` ...).
    """

    transport: str = "websocket"
    path: str = "/ws"
    agents: tuple[str, ...] = ()
    middleware: tuple[MiddlewareConfig, ...] = ()
    options: Mapping[str, Any] = attrs.field(factory=dict)


@attrs.frozen
class Config:
    """A whole configuration; ``source`` is the file it came from, if any."""

    server: ServerConfig = ServerConfig()
    agents: Mapping[str, AgentConfig] = attrs.field(factory=dict)
    connectors: tuple[ConnectorConfig, ...] = ()
    store: StoreConfig = StoreConfig()
    source: str | None = None

    @property
    def where(self) -> str:
        """How errors name this configuration."""
        return self.source or "configuration"


def _strict(kind: type[Any], *accepted: type[Any]) -> Any:
    def hook(value: Any, _: type[Any]) -> Any:
        # bool is an int subclass, and cattrs would happily turn "false" into True.
        if isinstance(value, bool) and kind is not bool:
            raise TypeError(f"expected {kind.__name__}, got a boolean")
        if not isinstance(value, accepted):
            raise TypeError(f"expected {kind.__name__}, got {type(value).__name__}")
        return kind(value)

    return hook


def make_converter() -> cattrs.Converter:
    """A converter that rejects unknown keys and never coerces across types."""
    converter = cattrs.Converter(forbid_extra_keys=True)
    converter.register_structure_hook(bool, _strict(bool, bool))
    converter.register_structure_hook(int, _strict(int, int))
    converter.register_structure_hook(float, _strict(float, int, float))
    converter.register_structure_hook(str, _strict(str, str))
    converter.register_structure_hook_func(lambda t: t == tuple[str, ...], _strings)
    return converter


def _strings(value: Any, _: type[Any]) -> tuple[str, ...]:
    # cattrs would split a lone string into its characters: secrets = "abc" must not mean "a", "b", "c".
    if not isinstance(value, list | tuple):
        raise TypeError(f"expected a list of strings, got {type(value).__name__}")
    for item in value:
        if not isinstance(item, str):
            raise TypeError(f"expected a list of strings, got an item of type {type(item).__name__}")
    return tuple(value)


_converter = make_converter()


def _describe(exc: BaseException, type_: type[Any] | None) -> str:
    if isinstance(exc, ForbiddenExtraKeysError):
        keys = ", ".join(repr(k) for k in sorted(exc.extra_fields))
        return f"unknown key {keys}" if len(exc.extra_fields) == 1 else f"unknown keys {keys}"
    if isinstance(exc, KeyError):
        return "required key is missing"
    if isinstance(exc, (TypeError, ValueError)) and str(exc):
        return str(exc)
    # An optional table (rate_limit) is the union "RateLimit | None": named by its Python path,
    # the message told a TOML user nothing.
    options = [t for t in typing.get_args(type_) if t is not type(None)] or [type_]
    if len(options) == 1 and attrs.has(options[0]):
        return "expected a table ({ key = value, ... })"
    name = getattr(type_, "__name__", str(type_))
    return f"invalid value, expected {name}"


def _path(prefix: str, path: str) -> str:
    # transform_error paths look like "$.a.b" or "$.x[0]"; put ours in front.
    tail = path.removeprefix("$")
    if not prefix:
        return tail.lstrip(".") or "(top level)"
    return prefix + tail


def structure(data: Any, cls: type[T], *, where: str, key: str) -> T:
    """Structure ``data`` into ``cls``; errors become :class:`ConfigError`.

    ``where`` names the file, ``key`` the dotted location of ``data`` in it, so
    a message reads ``app.toml: agents.bot.delay: expected float, got str``.
    """
    try:
        return _converter.structure(data, cls)
    except cattrs.BaseValidationError as exc:
        messages = cattrs.transform_error(exc, path="$", format_exception=_describe)
        problems = []
        for message in messages:
            text, _, path = message.rpartition(" @ ")
            problems.append(f"{where}: {_path(key, path)}: {text}")
        raise ConfigError("; ".join(problems)) from None
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {key or '(top level)'}: {exc}") from None


def _table(value: Any, where: str, key: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: {key}: expected a table, got {type(value).__name__}")
    return value


def _split_use(table: dict[str, Any], where: str, key: str) -> tuple[str, dict[str, Any]]:
    options = dict(table)
    use = options.pop("use", None)
    if not isinstance(use, str) or not use:
        raise ConfigError(f"{where}: {key}.use: required key is missing (the plugin name)")
    return use, options


_CONNECTOR_KEYS = frozenset({"transport", "path", "agents", "middleware"})


def parse_config(data: Mapping[str, Any], source: str | None = None) -> Config:
    """Build a :class:`Config` from already-parsed TOML data."""
    where = source or "configuration"
    unknown = set(data) - {"server", "agents", "connectors", "store"}
    if unknown:
        keys = ", ".join(repr(k) for k in sorted(unknown))
        raise ConfigError(f"{where}: unknown top-level key {keys} (expected server, agents, connectors, store)")
    server = structure(_table(data.get("server", {}), where, "server"), ServerConfig, where=where, key="server")
    agents: dict[str, AgentConfig] = {}
    for name, table in _table(data.get("agents", {}), where, "agents").items():
        key = f"agents.{name}"
        use, options = _split_use(_table(table, where, key), where, key)
        agents[name] = AgentConfig(use=use, options=options)
    raw_connectors = data.get("connectors", [])
    if not isinstance(raw_connectors, list):
        raise ConfigError(f"{where}: connectors: expected an array of tables ([[connectors]])")
    connectors = []
    for index, raw in enumerate(raw_connectors):
        key = f"connectors[{index}]"
        table = _table(raw, where, key)
        own = {k: v for k, v in table.items() if k in _CONNECTOR_KEYS and k != "middleware"}
        options = {k: v for k, v in table.items() if k not in _CONNECTOR_KEYS}
        middleware = []
        raw_mw = table.get("middleware", [])
        if not isinstance(raw_mw, list):
            raise ConfigError(f"{where}: {key}.middleware: expected an array of tables")
        for mw_index, mw in enumerate(raw_mw):
            mw_key = f"{key}.middleware[{mw_index}]"
            use, mw_options = _split_use(_table(mw, where, mw_key), where, mw_key)
            middleware.append(MiddlewareConfig(use=use, options=mw_options))
        connector = structure(own, ConnectorConfig, where=where, key=key)
        connectors.append(attrs.evolve(connector, middleware=tuple(middleware), options=options))
    store = StoreConfig()
    if "store" in data:
        use, store_options = _split_use(_table(data["store"], where, "store"), where, "store")
        store = StoreConfig(use=use, options=store_options)
    return Config(server=server, agents=agents, connectors=tuple(connectors), store=store, source=source)


def _too_deep(text: str, exc: RecursionError) -> str:
    """Say where tomllib, a recursive parser, ran out of stack: the key and its line.

    tomllib gives no position for this, so the key is read from the outermost
    ``parse_key_value_pair`` frame (``key_value_rule`` holds the table header and the
    key's offset). If a later Python renames those, the message just names no key.
    """
    header: tuple[str, ...] = ()
    offset: int | None = None
    tb = exc.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        if frame.f_globals.get("__name__") == "tomllib._parser":
            local = frame.f_locals
            if frame.f_code.co_name == "key_value_rule" and offset is None:
                header, offset = tuple(local.get("header", ())), local.get("pos")
            elif frame.f_code.co_name == "parse_key_value_pair" and isinstance(local.get("key"), tuple):
                key = ".".join((*header, *local["key"]))
                line = text.count("\n", 0, offset) + 1 if isinstance(offset, int) else None
                where = f" (line {line})" if line is not None else ""
                return f"{key}: not valid TOML: arrays or inline tables nested too deeply{where}"
        tb = tb.tb_next
    return "not valid TOML: arrays or inline tables nested too deeply"


def load_config(path: str | Path) -> Config:
    """Read and check a TOML configuration file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        data = tomllib.loads(text)
    except RecursionError as exc:
        raise ConfigError(f"{path}: {_too_deep(text, exc)}") from None
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not valid UTF-8") from None
    return parse_config(data, source=str(path))


def default_config() -> Config:
    """The configuration used with no file: one ``/ws`` connector to ``echo``."""
    return Config(
        agents={"echo": AgentConfig(use="echo")},
        connectors=(ConnectorConfig(),),
    )
