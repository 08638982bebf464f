"""A small real MCP server for tests/test_mcp.py, written with the ``mcp`` SDK's ``MCPServer``.

(``MCPServer`` is what the SDK called ``FastMCP`` before 2.x.)

``python tests/mcp_server.py`` serves over stdio; ``python tests/mcp_server.py --http``
serves streamable HTTP at ``/mcp`` on a free loopback port, printing ``PORT <n>`` on its
stdout once it listens (the port is bound before it is printed, so there is no race).
``MCP_TEST_EVENTS`` names a file the server appends what it saw to (``slow cancelled``),
so a test can tell that a cancel reached the server. ``MCP_TEST_PREFIX`` prefixes the
tool names (for the name-clash test).
"""

from __future__ import annotations

import os
import socket
import sys
from typing import Any

import anyio
from mcp.server.mcpserver import Context, Image, MCPServer
from mcp.server.mcpserver.exceptions import ToolError

PREFIX = os.environ.get("MCP_TEST_PREFIX", "")
_PNG = (
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c63f8cfc0f01f0005000201a5f1a8d70000000049454e44ae426082"
)
app = MCPServer("connic-test")


def _event(text: str) -> None:
    path = os.environ.get("MCP_TEST_EVENTS")
    if path:
        with open(path, "a", encoding="utf-8") as file:
            file.write(text + "\n")


@app.tool(name=PREFIX + "add")
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


@app.tool(name=PREFIX + "greet", structured_output=False)
def greet(name: str, polite: bool = False) -> str:
    """Greet someone by name."""
    return f"Good day, {name}." if polite else f"hi {name}"


@app.tool(name=PREFIX + "fail")
def fail(reason: str) -> str:
    """Always fails, with ``reason`` as the error the model sees."""
    raise ToolError(reason)


@app.tool(name=PREFIX + "slow")
async def slow(seconds: float) -> str:
    """Sleep ``seconds``, then answer; records a cancel in MCP_TEST_EVENTS."""
    try:
        await anyio.sleep(seconds)
    except anyio.get_cancelled_exc_class():
        _event("slow cancelled")
        raise
    return "slept"


@app.tool(name=PREFIX + "info")
def info(ctx: Context) -> dict[str, Any]:
    """What the server runs with: pid, working directory, one env var, one request header."""
    headers = ctx.headers or {}
    return {
        "pid": os.getpid(),
        "cwd": os.getcwd(),
        "env": os.environ.get("MCP_TEST_VALUE"),
        "header": headers.get("x-test-token"),
    }


@app.tool(name=PREFIX + "picture", structured_output=False)
def picture() -> list[Any]:
    """A caption and a one-pixel PNG: content that is not all text."""
    return ["a red dot", Image(data=bytes.fromhex(_PNG), format="png")]


@app.tool(name=PREFIX + "die")
def die() -> str:
    """Exit the server process at once, mid-call."""
    os._exit(3)


async def _serve_http() -> None:
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    config = uvicorn.Config(app.streamable_http_app(), log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    print(f"PORT {sock.getsockname()[1]}", flush=True)
    await server.serve(sockets=[sock])


def main() -> None:
    """Serve over stdio, or streamable HTTP with ``--http``."""
    if "--http" in sys.argv:
        anyio.run(_serve_http)
    else:
        app.run()


if __name__ == "__main__":
    main()
