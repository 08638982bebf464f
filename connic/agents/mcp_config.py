"""The ``mcp_servers`` option of the built-in agents, validated (no MCP SDK needed).

Each entry is one table: ``command`` (with ``args``, ``env``, ``cwd``) for a server run over
stdio, or ``url`` (with ``headers``) for one reached over streamable HTTP; both take
``start_timeout``, ``call_timeout`` and ``max_result_bytes``. See docs/mcp.md.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

from connic.errors import ConfigError
from connic.redact import command_secrets, safe_command, safe_url, secret_name
from connic.registry import REFERENCE_BASE

__all__ = ["CALL_TIMEOUT", "KEYS", "MAX_RESULT_BYTES", "START_TIMEOUT", "McpServerSpec", "parse"]

START_TIMEOUT = 30.0
CALL_TIMEOUT = 120.0
MAX_RESULT_BYTES = 1024 * 1024
"""A tool result is cut to this many bytes of UTF-8 by default (``max_result_bytes``): 1 MiB, as ``max_frame_bytes``."""
_STDIO_KEYS = ("command", "args", "env", "cwd")
_HTTP_KEYS = ("url", "headers")
_COMMON_KEYS = ("start_timeout", "call_timeout", "max_result_bytes")
_ALL_KEYS = (*_STDIO_KEYS, *_HTTP_KEYS, *_COMMON_KEYS)
KEYS = _ALL_KEYS
"""Every key an ``mcp_servers`` entry may have (docs/mcp.md documents each)."""


@attrs.frozen
class McpServerSpec:
    """One entry of ``mcp_servers``, validated: either ``command`` (stdio) or ``url`` (HTTP)."""

    where: str
    command: str | None = None
    args: tuple[str, ...] = ()
    env: Mapping[str, str] | None = None
    cwd: str | None = None
    url: str | None = None
    headers: Mapping[str, str] = attrs.field(factory=dict)
    start_timeout: float = START_TIMEOUT
    call_timeout: float = CALL_TIMEOUT
    max_result_bytes: int = MAX_RESULT_BYTES

    @property
    def label(self) -> str:
        """How errors, logs and task names name the server: its command line or its url, secrets hidden.

        Tokens often travel in ``args`` (``--api-key sk-...``) and in a url's credentials or
        query: :func:`~connic.redact.safe_command` and :func:`~connic.redact.safe_url` keep
        what tells servers apart and hide those.
        """
        if self.url is not None:
            return safe_url(self.url)
        return safe_command([self.command or "", *self.args])

    @property
    def secrets(self) -> list[str]:
        """What a stdio server's stderr must not show: the secrets in ``args``, and ``env``'s secret-named values.

        A server that fails to start often says why with the key it was given (``invalid API
        key: sk-...``), and its last stderr line is quoted in the start-up error.
        """
        env = self.env or {}
        return [*command_secrets(self.args), *(value for name, value in env.items() if secret_name(name))]


def _strings(value: object, where: str, what: str) -> None:
    # Only the offending item's place and type: args and env values carry tokens.
    if not isinstance(value, list):
        raise ConfigError(f"{where}: expected {what}, got {type(value).__name__}")
    for index, item in enumerate(value):
        if not isinstance(item, str):
            raise ConfigError(f"{where}: expected {what}, but item {index} is {type(item).__name__}")


def _string_table(value: object, where: str) -> dict[str, str]:
    # The offending key and its value's type, never a value: env and headers are where secrets go.
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a table of strings, got {type(value).__name__}")
    for key, item in value.items():
        if not isinstance(item, str):
            raise ConfigError(f"{where}: expected a table of strings, but {key} is {type(item).__name__}")
    return {str(k): v for k, v in value.items()}


def _timeout(value: object, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise ConfigError(f"{where}: expected a positive number of seconds, got {value!r}")
    return float(value)


def _byte_count(value: object, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{where}: expected a whole number of bytes, at least 1, got {value!r}")
    return value


def _one(entry: object, where: str) -> McpServerSpec:
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: expected a table, got {type(entry).__name__}")
    for key in entry:
        if key not in _ALL_KEYS:
            raise ConfigError(f"{where}.{key}: unknown key (expected one of {', '.join(_ALL_KEYS)})")
    if ("command" in entry) == ("url" in entry):
        raise ConfigError(f"{where}: needs exactly one of command (run a program over stdio) or url (streamable HTTP)")
    kind, wrong = ("command", _HTTP_KEYS[1:]) if "command" in entry else ("url", _STDIO_KEYS[1:])
    for key in wrong:
        if key in entry:
            raise ConfigError(f"{where}.{key}: not allowed with {kind}")
    fields: dict[str, Any] = {"where": where}
    for key in _COMMON_KEYS:
        if key in entry:
            check = _byte_count if key == "max_result_bytes" else _timeout
            fields[key] = check(entry[key], f"{where}.{key}")
    if "command" in entry:
        command = entry["command"]
        if not isinstance(command, str) or not command.strip():
            got = "an empty string" if isinstance(command, str) else type(command).__name__
            raise ConfigError(f"{where}.command: expected a non-empty string, got {got}")
        fields["command"] = command
        if "args" in entry:
            _strings(entry["args"], f"{where}.args", "an array of strings")
            fields["args"] = tuple(entry["args"])
        if "env" in entry:
            fields["env"] = _string_table(entry["env"], f"{where}.env")
        if "cwd" in entry:
            cwd = entry["cwd"]
            if not isinstance(cwd, str) or not cwd:
                raise ConfigError(f"{where}.cwd: expected a directory path, got {cwd!r}")
            # Like a tool's FILE.py: relative to the configuration file's folder, not wherever connic was started.
            base = REFERENCE_BASE.get() or Path.cwd()
            fields["cwd"] = str(base / os.path.expanduser(cwd))
    else:
        url = entry["url"]
        if not isinstance(url, str):
            raise ConfigError(f"{where}.url: expected an http:// or https:// URL, got {type(url).__name__}")
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"{where}.url: expected an http:// or https:// URL, got {safe_url(url)!r}")
        fields["url"] = url
        if "headers" in entry:
            fields["headers"] = _string_table(entry["headers"], f"{where}.headers")
    return McpServerSpec(**fields)


def parse(value: object, *, agent: str) -> list[McpServerSpec]:
    """Validate an agent's ``mcp_servers`` value; each problem is a one-line :class:`ConfigError`.

    The message names the agent, the entry's index and the key (``agents.bot.mcp_servers[1].comand:
    unknown key ...``). Needs no SDK: only :meth:`McpServers.from_config` asks for it.
    """
    where = f"agents.{agent}.mcp_servers"
    if not isinstance(value, list):
        raise ConfigError(f"{where}: expected an array of tables, got {type(value).__name__}")
    return [_one(entry, f"{where}[{index}]") for index, entry in enumerate(value)]
