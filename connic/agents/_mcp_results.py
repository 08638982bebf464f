"""An MCP tool's result as the model is given it: a JSON-able value, bounded by ``max_result_bytes``.

A ``CallToolResult`` of the SDK becomes its structured content, its text or its content
blocks; one that is an error becomes an :class:`McpToolError`. Connecting to the servers and
calling their tools is connic/agents/mcp.py.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from connic.agents.mcp_config import McpServerSpec

__all__ = ["McpToolError", "tool_result"]

log = logging.getLogger("connic.agents.mcp")


class McpToolError(Exception):
    """An MCP tool failed; the message is meant for the model (and the client's ``tool_result``)."""


def _cut(text: str, limit: int) -> tuple[str, int] | None:
    """``text`` cut to its first ``limit`` bytes of UTF-8 with a marker, and its whole size; None when it fits.

    The cut never falls inside a character: one that would straddle it is left out whole.
    """
    if len(text) <= limit // 4:  # no character is more than 4 bytes: it fits, without encoding it to tell
        return None
    # surrogatepass: a JSON string may hold a lone surrogate ("\ud800"), which strict UTF-8 refuses.
    data = text.encode("utf-8", "surrogatepass")
    if len(data) <= limit:
        return None
    end = limit
    while end and data[end] & 0xC0 == 0x80:  # a continuation byte: its character began before the cut
        end -= 1
    return data[:end].decode("utf-8", "surrogatepass") + f"\n[truncated: {end} bytes of {len(data)}]", len(data)


def tool_result(result: Any, name: str, spec: McpServerSpec) -> Any:
    """A ``CallToolResult`` as a JSON-able value: structured content, else the text, else the content blocks.

    A result (or an error's text) over ``max_result_bytes`` is cut to that many bytes, with a
    marker the model sees: a server's 100 MB answer would otherwise go whole into the model's
    context, the conversation's history and the client's ``tool_result`` frame.
    """
    blocks = list(result.content)
    texts = [block.text for block in blocks if getattr(block, "type", None) == "text"]
    if result.is_error:
        message = "\n".join(texts) or f"tool {name!r} failed"
        raise McpToolError(_bounded(message, message, name, spec))
    if result.structured_content is not None:
        value: Any = result.structured_content
    elif len(texts) == len(blocks):
        value = "\n".join(texts)
    else:
        value = [block.model_dump(mode="json", by_alias=True, exclude_none=True) for block in blocks]
    # A structure is measured, and cut, as the JSON text the provider would be sent.
    return _bounded(value, value if isinstance(value, str) else json.dumps(value, ensure_ascii=False), name, spec)


def _bounded(value: Any, text: str, name: str, spec: McpServerSpec) -> Any:
    """``value`` when ``text`` (its text) fits ``max_result_bytes``; else ``text`` cut, and a warning logged."""
    cut = _cut(text, spec.max_result_bytes)
    if cut is None:
        return value
    shown, size = cut
    # The server and the tool, never the content (issue 18: no message text above DEBUG).
    log.warning(
        'MCP server "%s": tool %r returned %d bytes, over max_result_bytes (%d); the model is given the start of it',
        spec.label,
        name,
        size,
        spec.max_result_bytes,
    )
    return shown
