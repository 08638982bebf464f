"""What the built-in agents need to know of a tool, wherever it comes from.

A tool is offered to the model by its name, description and the JSON Schema of its
arguments, and called with the arguments the model chose. Python functions
(``tools = [...]``) and MCP servers (``mcp_servers = [...]``) are both
:class:`ToolSource` s: started with the agent, asked for their tools, closed with it.
The model <-> tool loop of the built-in agents sees only :class:`Tool`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

__all__ = ["Tool", "ToolSource"]


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
