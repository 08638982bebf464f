"""What the built-in agents need to know of a tool, wherever it comes from.

A tool is offered to the model by its name, description and the JSON Schema of its
arguments, and called with the arguments the model chose. Python functions
(``tools = [...]``) and MCP servers (``mcp_servers = [...]``) are both
:class:`ToolSource` s: started with the agent, asked for their tools, closed with it.
The model <-> tool loop of the built-in agents sees only :class:`Tool`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

__all__ = ["MAX_NAME", "Tool", "ToolSource", "name_problem", "shown_name"]

MAX_NAME = 64
"""The longest tool name both providers accept."""

# OpenAI takes ^[a-zA-Z0-9_-]{1,64}$ and refuses the whole request otherwise; Gemini wants a
# letter or "_" first (then letters, digits, "_", ".", ":", "-", up to 128). Both: this.
_FIRST = re.compile(r"[A-Za-z_]")
_REST = re.compile(r"[A-Za-z0-9_-]")


def name_problem(name: str) -> str | None:
    """Why a provider would refuse ``name`` as a tool's name (``"is longer than 64 characters"``), or None.

    A name the model is offered must satisfy both providers' rules: letters, digits, ``_`` and
    ``-``, a letter or ``_`` first, at most :data:`MAX_NAME` characters. Checked at start-up,
    since one bad name makes the provider refuse every request of the agent.
    """
    if not name:
        return "is empty"
    if len(name) > MAX_NAME:
        return f"is longer than {MAX_NAME} characters"
    if not _FIRST.fullmatch(name[0]):
        return "does not start with a letter or _"
    for char in name:
        if not _REST.fullmatch(char):
            return f"has {char!r}: only letters, digits, _ and - are allowed"
    return None


def shown_name(name: str) -> str:
    """``name`` quoted for a one-line message, cut short when it is very long."""
    return repr(name) if len(name) <= MAX_NAME + 8 else repr(name[:MAX_NAME]) + "..."


@runtime_checkable
class Tool(Protocol):
    """One callable tool, as the model sees it."""

    @property
    def name(self) -> str:
        """The name the model calls it by; unique among an agent's tools."""

    @property
    def description(self) -> str:
        """What the tool does, for the model (may be empty)."""

    @property
    def parameters(self) -> Mapping[str, Any]:
        """The JSON Schema (an ``"type": "object"`` schema) of the arguments."""

    async def call(self, arguments: Mapping[str, Any]) -> Any:
        """Run the tool; returns a JSON-serialisable result, raises when the tool fails.

        Cancelling the awaiting task must stop the tool (or abandon it, for code that
        cannot be interrupted, such as a function running in a worker thread).
        """


@runtime_checkable
class ToolSource(Protocol):
    """Where an agent's tools come from: opened when the agent starts, closed when it stops."""

    async def start(self) -> Sequence[Tool]:
        """Make the tools ready (import functions, launch or connect to a server) and list them.

        Raises :class:`connic.ConfigError` with one clear line when the source cannot start.
        """

    async def close(self) -> None:
        """Release what :meth:`start` acquired; safe to call when start failed or never ran."""
