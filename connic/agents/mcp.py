"""MCP servers as a :class:`~connic.agents.tools.ToolSource` for the built-in agents.

``mcp_servers = [{ command = "...", args = [...] }, { url = "http://.../mcp" }]`` on an
agent: each server is launched over stdio, or reached over streamable HTTP, through the
official ``mcp`` SDK (the ``connic[mcp]`` extra). The SDK is imported only when a server is
configured, so the core and the agents without ``mcp_servers`` never load it.

The SDK's clients are anyio context managers that must be entered and exited in one task,
while an agent's ``start()`` and ``close()`` may run in different ones; so each server lives
in a task of its own (:class:`_Server`) that enters the client, hands over its tools, waits
to be told to stop, and exits the client itself. Tool calls are plain requests on the
session, made from whichever task calls the tool: cancelling that task cancels the request
(the SDK tells the server with ``notifications/cancelled``). What a call returns becomes the
model's value in connic/agents/_mcp_results.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections import deque
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import attrs

from connic.agents._mcp_results import McpToolError, tool_result
from connic.agents.mcp_config import McpServerSpec, parse
from connic.agents.tools import Tool, name_problem, shown_name
from connic.errors import ConfigError
from connic.redact_command import scrub

if TYPE_CHECKING:
    from mcp import Client

__all__ = ["McpServerSpec", "McpServers", "McpTool", "McpToolError", "parse"]

log = logging.getLogger("connic.agents.mcp")

# Pages of tools/list followed before giving up: a server whose cursor never ends must not hang start().
_MAX_PAGES = 100
# Bound on waiting for a stopped stdio server's last stderr lines (a grandchild may hold the pipe).
_STDERR_GRACE = 1.0


def _leaf(exc: BaseException) -> BaseException:
    """The first real error inside nested exception groups (the SDK's task groups wrap them)."""
    while isinstance(exc, BaseExceptionGroup):
        inner = [e for e in exc.exceptions if not isinstance(e, asyncio.CancelledError)]
        exc = (inner or list(exc.exceptions))[0]
    return exc


def _reason(exc: BaseException, spec: McpServerSpec) -> str:
    """One line saying why a server failed, without a traceback."""
    exc = _leaf(exc)
    if isinstance(exc, TimeoutError):
        return f"no answer within {spec.start_timeout:g} s (start_timeout)"
    if isinstance(exc, FileNotFoundError) and spec.command is not None:
        missing = "cwd does not exist" if spec.cwd and not os.path.isdir(spec.cwd) else "command not found"
        return f"{missing} ({exc.strerror})"
    if isinstance(exc, OSError) and exc.strerror:
        return f"cannot run the command ({exc.strerror})" if spec.command is not None else exc.strerror
    text = " ".join(str(exc).split()) or type(exc).__name__
    if text == "Connection closed":
        return "the server closed the connection" + (" (it exited)" if spec.command else "")
    if type(exc).__name__ in ("ConnectError", "ConnectTimeout"):  # httpx2's, named without importing it
        return f"cannot connect ({text})"
    if type(exc).__name__ == "MCPError":
        return f"the server answered: {text}"
    return f"{type(exc).__name__}: {text}"


class _StderrTail:
    """A stdio server's stderr: each line logged at DEBUG, the last few kept for a start-up error."""

    def __init__(self, label: str, secrets: Sequence[str]) -> None:
        self.label = label
        self.secrets = secrets  # hidden in every line, with token-like words (connic.redact.scrub)
        self.lines: deque[str] = deque(maxlen=3)
        read_fd, write_fd = os.pipe()
        self.child_end = os.fdopen(write_fd, "w")
        self._task = asyncio.create_task(self._pump(os.fdopen(read_fd, "rb", buffering=0)))

    async def _pump(self, pipe: Any) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), pipe)
        buffer = b""
        try:
            while chunk := await reader.read(65536):
                *lines, buffer = (buffer + chunk).split(b"\n")
                buffer = buffer[-4096:]  # a line with no end must not grow without bound
                for raw in lines:
                    self._line(raw)
            if buffer:
                self._line(buffer)
        finally:
            transport.close()

    def _line(self, raw: bytes) -> None:
        line = scrub(raw.decode("utf-8", "replace").rstrip(), self.secrets)
        if line:
            # DEBUG: a server's stderr may echo the arguments it was called with (message text).
            log.debug('MCP server "%s" stderr: %s', self.label, line)
            self.lines.append(line[:300])

    def spawned(self) -> None:
        """The child has its copy of the pipe (or never will): drop ours, so EOF comes when it exits."""
        self.child_end.close()

    async def last_line(self) -> str | None:
        """The last line the (stopped) server wrote, once its stderr is drained (bounded wait)."""
        with contextlib.suppress(TimeoutError, OSError, ValueError):
            await asyncio.wait_for(asyncio.shield(self._task), _STDERR_GRACE)
        return self.lines[-1] if self.lines else None

    async def close(self) -> None:
        """Stop reading (the server is stopped)."""
        self.spawned()
        if not self._task.done():
            with contextlib.suppress(TimeoutError, OSError, ValueError):
                await asyncio.wait_for(asyncio.shield(self._task), _STDERR_GRACE)
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError, OSError, ValueError):
            await self._task


@attrs.frozen
class McpTool:
    """A tool of an MCP server, as the agents' tool loop sees it."""

    name: str
    description: str
    parameters: Mapping[str, Any]
    server: _Server = attrs.field(eq=False, repr=False)

    async def call(self, arguments: Mapping[str, Any]) -> Any:
        """Call the tool on its server (``tools/call``); raises :class:`McpToolError` when it fails."""
        return await self.server.call(self.name, arguments)


def _retrieve(future: asyncio.Future[Any]) -> None:
    """Mark the failure of a future nobody awaits any more as seen (asyncio logs it otherwise)."""
    if future.done() and not future.cancelled():
        future.exception()


class _Server:
    """One MCP server, connected by a task of its own that owns the SDK client's contexts."""

    def __init__(self, spec: McpServerSpec) -> None:
        self.spec = spec
        self.client: Client | None = None
        self.gone: str | None = None
        self._stop = asyncio.Event()
        self._ready: asyncio.Future[list[McpTool]] | None = None
        self._task: asyncio.Task[None] | None = None
        self._scope: Any = None  # the run task's anyio CancelScope, to interrupt a connect in progress
        self._stderr: _StderrTail | None = None

    def _failed(self, reason: str) -> ConfigError:
        return ConfigError(f'MCP server "{self.spec.label}" ({self.spec.where}) failed to start: {reason}')

    async def start(self) -> list[McpTool]:
        """Launch or connect, initialize and list the tools, within ``start_timeout``."""
        if self._stop.is_set():  # McpServers.close() came first, from another task
            raise self._failed("closed before it was ready")
        self._ready = asyncio.get_running_loop().create_future()
        self._task = asyncio.create_task(self._run(self._ready), name=f"mcp server {self.spec.label}")
        try:
            async with asyncio.timeout(self.spec.start_timeout):
                return await asyncio.shield(self._ready)
        except TimeoutError:
            await self.close()
            _retrieve(self._ready)
            reason = f"no answer within {self.spec.start_timeout:g} s (start_timeout)"
            raise self._failed(await self._with_stderr(reason)) from None
        except BaseException:
            await self.close()
            _retrieve(self._ready)
            raise

    async def _with_stderr(self, reason: str) -> str:
        line = await self._stderr.last_line() if self._stderr is not None else None
        return f"{reason}; its stderr said: {line}" if line else reason

    async def _run(self, ready: asyncio.Future[list[McpTool]]) -> None:
        import anyio
        from mcp import Client, Implementation

        from connic import __version__

        if self.spec.command is not None:
            self._stderr = _StderrTail(self.spec.label, self.spec.secrets)
        try:
            with anyio.CancelScope() as self._scope:
                if self._stop.is_set():  # closed before this task first ran
                    self._scope.cancel()
                async with contextlib.AsyncExitStack() as stack:
                    try:
                        transport = await self._transport(stack)
                        client = Client(
                            transport, client_info=Implementation(name="connic", version=__version__), cache=None
                        )
                        await stack.enter_async_context(client)
                    finally:
                        if self._stderr is not None:
                            self._stderr.spawned()
                    tools = await self._list(client)
                    self.client = client
                    if not ready.done():
                        ready.set_result(tools)
                    await self._stop.wait()
                    self.client = None
        except Exception as exc:
            reason = _reason(exc, self.spec)
            if not ready.done():
                ready.set_exception(self._failed(await self._with_stderr(reason)))
            else:
                log.warning('MCP server "%s" stopped: %s', self.spec.label, reason)
            self.gone = reason
        finally:
            self.client = None
            if not ready.done():
                ready.set_exception(self._failed("closed before it was ready"))
            if self._stderr is not None:
                await self._stderr.close()

    async def _transport(self, stack: contextlib.AsyncExitStack) -> Any:
        spec = self.spec
        if spec.command is not None:
            from mcp import StdioServerParameters
            from mcp.client.stdio import stdio_client

            assert self._stderr is not None
            params = StdioServerParameters(
                command=spec.command,
                args=list(spec.args),
                env=dict(spec.env) if spec.env is not None else None,
                cwd=spec.cwd,
            )
            return stdio_client(params, errlog=self._stderr.child_end)
        import httpx2
        from mcp.client.streamable_http import streamable_http_client

        assert spec.url is not None
        # The SDK's own defaults (30 s, 300 s to read a held-open stream), the read never shorter than a call.
        timeout = httpx2.Timeout(30.0, read=max(300.0, spec.call_timeout))
        http = await stack.enter_async_context(httpx2.AsyncClient(headers=dict(spec.headers), timeout=timeout))
        return streamable_http_client(spec.url, http_client=http)

    async def _list(self, client: Client) -> list[McpTool]:
        tools: list[McpTool] = []
        cursor: str | None = None
        for _ in range(_MAX_PAGES):
            page = await client.list_tools(cursor=cursor)
            for tool in page.tools:
                tools.append(McpTool(tool.name, tool.description or "", dict(tool.input_schema), self))
            cursor = page.next_cursor
            if cursor is None:
                break
        log.info('MCP server "%s": %d tools: %s', self.spec.label, len(tools), ", ".join(t.name for t in tools))
        return tools

    async def call(self, name: str, arguments: Mapping[str, Any]) -> Any:
        """``tools/call``, bounded by ``call_timeout``; cancelling the caller cancels the request."""
        client = self.client
        where = f'MCP server "{self.spec.label}"'
        if client is None:
            raise McpToolError(f"{where} is not running" + (f": {self.gone}" if self.gone else ""))
        try:
            async with asyncio.timeout(self.spec.call_timeout):
                result = await client.call_tool(name, dict(arguments))
        except TimeoutError:
            raise McpToolError(f"{where}: tool {name!r} did not answer within {self.spec.call_timeout:g} s") from None
        except Exception as exc:
            raise McpToolError(f"{where}: {_reason(exc, self.spec)}") from None
        return tool_result(result, name, self.spec)

    async def close(self) -> None:
        """Stop the server's task: exit the client (stopping a stdio process), or interrupt a connect."""
        self._stop.set()
        if self.client is None and self._scope is not None:
            self._scope.cancel()
        if self._task is not None:
            # Shielded: a caller cancelled mid-close must not leave the process half stopped (the SDK bounds it).
            await asyncio.shield(self._task)


class McpServers:
    """The :class:`~connic.agents.tools.ToolSource` of an agent's ``mcp_servers``."""

    def __init__(self, specs: Sequence[McpServerSpec]) -> None:
        self.specs = tuple(specs)
        self._servers: list[_Server] = []

    @classmethod
    def from_config(cls, value: object, *, agent: str) -> McpServers:
        """Validate ``mcp_servers`` (see :func:`parse`); a non-empty list needs the ``mcp`` package."""
        specs = parse(value, agent=agent)
        if specs:
            try:
                import mcp  # noqa: F401
            except ImportError:
                raise ConfigError(
                    f"agents.{agent}.mcp_servers: the MCP SDK is not installed: pip install 'connic[mcp]'"
                ) from None
        return cls(specs)

    async def start(self) -> Sequence[Tool]:
        """Start every server at once and list their tools.

        Any failure, a tool name offered twice, or a name no provider accepts is a :class:`ConfigError`.
        """
        await self.close()
        self._servers = servers = [_Server(spec) for spec in self.specs]
        try:
            results = await asyncio.gather(*(server.start() for server in servers), return_exceptions=True)
            failures = [r for r in results if isinstance(r, BaseException)]
            for failure in failures:
                if not isinstance(failure, ConfigError):
                    raise failure
            if failures:
                raise ConfigError("; ".join(str(failure) for failure in failures))
            tools: list[Tool] = []
            owners: dict[str, McpServerSpec] = {}
            for server, result in zip(servers, results, strict=True):
                assert not isinstance(result, BaseException)
                for tool in result:
                    problem = name_problem(tool.name)
                    if problem is not None:
                        # Offered, it would make the provider refuse every request of the agent.
                        raise ConfigError(
                            f'MCP server "{server.spec.label}" ({server.spec.where}): '
                            f"the tool name {shown_name(tool.name)} {problem}, so no model can be offered it"
                        )
                    first = owners.setdefault(tool.name, server.spec)
                    if first is not server.spec:
                        raise ConfigError(
                            f'tool {tool.name!r} is offered by two MCP servers: "{first.label}" ({first.where}) '
                            f'and "{server.spec.label}" ({server.spec.where})'
                        )
                    tools.append(tool)
            return tools
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Close every session and stop every stdio server (each within a few seconds)."""
        servers, self._servers = self._servers, []
        await asyncio.gather(*(server.close() for server in servers))
