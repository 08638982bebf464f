"""The model <-> tool loop the built-in LLM agents share.

An agent describes one turn as a :class:`Conversation`: :meth:`Conversation.step` makes
one model call on the conversation so far and streams its text, its :class:`Usage` and
the :class:`Call` s the model asked for; :meth:`Conversation.answer` adds the model's calls
and the tools' results to the conversation in the provider's own format. :func:`run_turn`
repeats that until the model answers without asking for a tool, running each round's
calls in parallel and yielding :class:`connic.ToolCall` / :class:`connic.ToolResult` as
they happen. Where the tools come from is the :class:`Toolbox`'s business: a list of
:class:`connic.agents.tools.ToolSource` started and closed with the agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncGenerator, Mapping, Sequence
from typing import Any, Protocol

import attrs

from connic.agent import ToolCall, ToolResult, Usage
from connic.agents._tool_threads import DEFAULT_THREADS
from connic.agents.tools import Tool, ToolSource
from connic.config import at_least_one, positive
from connic.errors import AgentError, ConfigError

__all__ = ["Call", "Conversation", "Outcome", "ToolOptions", "Toolbox", "run_turn"]

log = logging.getLogger("connic.agents.tools")


@attrs.frozen
class ToolOptions:
    """The tool options both built-in LLM agents take (their ``Options`` derive from this).

    ``tools``: functions by reference (``MODULE:NAME`` or ``FILE.py:NAME``);
    ``mcp_servers``: MCP servers whose tools the model may call (:mod:`connic.agents.mcp`);
    ``max_tool_rounds``: how many times in one turn the model may ask for tools;
    ``tool_timeout``: seconds one tool call may take;
    ``tool_threads``: how many sync function tools of the agent may run at once (each in a thread).
    """

    tools: tuple[str, ...] = ()
    # Any: connic.agents.mcp_config validates it, with messages naming the entry and the key.
    mcp_servers: Any = ()
    max_tool_rounds: int = attrs.field(default=8, validator=at_least_one)
    tool_timeout: float = attrs.field(default=60.0, validator=positive)
    tool_threads: int = attrs.field(default=DEFAULT_THREADS, validator=positive)

    def tool_sources(self, agent: str) -> list[ToolSource]:
        """The :class:`ToolSource` s of ``agent``'s options (built now: a bad entry raises ConfigError)."""
        sources: list[ToolSource] = []
        if self.tools:
            # Imported here: the module needs pydantic, which an agent without tools does not.
            from connic.agents.functions import FunctionTools

            sources.append(FunctionTools(self.tools, key="tools", threads=self.tool_threads, agent=agent))
        if self.mcp_servers:
            from connic.agents.mcp import McpServers

            sources.append(McpServers.from_config(self.mcp_servers, agent=agent))
        return sources


class Toolbox:
    """An agent's tools, by name: its sources started with the agent and closed with it."""

    def __init__(self, sources: Sequence[ToolSource]) -> None:
        self.sources = list(sources)
        self.tools: dict[str, Tool] = {}
        self._started: list[ToolSource] = []

    async def start(self) -> None:
        """Start every source and index its tools; a failure closes those already started."""
        try:
            for source in self.sources:
                tools = await source.start()
                self._started.append(source)
                for tool in tools:
                    if tool.name in self.tools:
                        raise ConfigError(f"two of the agent's tools are named {tool.name!r}")
                    self.tools[tool.name] = tool
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Close the sources started, last first; one failing to close does not keep the others open."""
        started, self._started = self._started, []
        self.tools = {}
        for source in reversed(started):
            try:
                await source.close()
            except Exception:
                log.exception("closing the tool source %r failed", source)


@attrs.frozen
class Call:
    """A tool call the model asked for.

    ``problem`` says why it cannot run, when the provider's message was malformed
    (arguments that are not a JSON object): the model gets it back as an error result.
    """

    call_id: str
    name: str
    arguments: Mapping[str, Any] = attrs.field(factory=dict)
    problem: str | None = None


@attrs.frozen
class Outcome:
    """A call and what came of it: the tool's result, or an error message (``is_error``)."""

    call: Call
    result: Any
    is_error: bool = False


class Conversation(Protocol):
    """One turn of one agent, as the loop drives it."""

    def step(self) -> AsyncGenerator[str | Usage | Call, None]:
        """Make one model call on the conversation so far: its text chunks, its usage, the calls it asks for."""

    def answer(self, outcomes: Sequence[Outcome]) -> None:
        """Add the model's last calls and their outcomes (in the calls' order) to the conversation."""


async def run_turn(
    conversation: Conversation, toolbox: Toolbox, options: ToolOptions, agent: str
) -> AsyncGenerator[str | Usage | ToolCall | ToolResult, None]:
    """Run the model <-> tool loop of one turn.

    Text chunks are yielded as they come, tool events as they happen, and one
    :class:`Usage`, summed over every model call, at the end. A model that still asks
    for tools after ``max_tool_rounds`` rounds ends the turn with :class:`AgentError`.
    """
    prompt = candidates = 0
    counted = False
    rounds = 0
    while True:
        calls: list[Call] = []
        async with contextlib.aclosing(conversation.step()) as step:
            async for item in step:
                if isinstance(item, Call):
                    calls.append(item)
                elif isinstance(item, Usage):
                    prompt += item.prompt_tokens
                    candidates += item.candidates_tokens
                    counted = True
                else:
                    yield item
        if not calls:
            break
        if rounds == options.max_tool_rounds:
            raise AgentError(f"the model was still calling tools after {rounds} rounds (max_tool_rounds = {rounds})")
        rounds += 1
        outcomes: list[Outcome] = []
        calls_run = _run_calls(calls, toolbox, options.tool_timeout, agent, outcomes)
        async with contextlib.aclosing(calls_run) as events:
            async for event in events:
                yield event
        conversation.answer(outcomes)
    if counted:
        yield Usage(prompt_tokens=prompt, candidates_tokens=candidates)


async def _run_calls(
    calls: Sequence[Call], toolbox: Toolbox, limit: float, agent: str, outcomes: list[Outcome]
) -> AsyncGenerator[ToolCall | ToolResult, None]:
    """Run ``calls`` in parallel: a ToolCall per call, then each ToolResult as its tool finishes.

    ``outcomes`` is filled in the calls' order. Closing this generator (the turn was
    cancelled) cancels the tools still running and waits for them to end.
    """
    tasks: dict[asyncio.Task[Outcome], int] = {}
    try:
        for index, call in enumerate(calls):
            task = asyncio.create_task(_run(call, toolbox, limit, agent), name=f"connic tool {call.name}")
            tasks[task] = index
        for call in calls:
            yield ToolCall(call.call_id, call.name, dict(call.arguments))
        results: dict[int, Outcome] = {}
        pending: set[asyncio.Task[Outcome]] = set(tasks)
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in sorted(done, key=tasks.__getitem__):
                outcome = results[tasks[task]] = task.result()
                yield ToolResult(outcome.call.call_id, outcome.call.name, outcome.result, outcome.is_error)
        outcomes.extend(results[index] for index in range(len(calls)))
    finally:
        running = [task for task in tasks if not task.done()]
        for task in running:
            task.cancel()
        if running:
            await asyncio.gather(*running, return_exceptions=True)


async def _run(call: Call, toolbox: Toolbox, limit: float, agent: str) -> Outcome:
    """Run one call; every failure becomes an error outcome for the model, never an exception."""
    if call.problem is not None:
        return Outcome(call, call.problem, is_error=True)
    tool = toolbox.tools.get(call.name)
    if tool is None:
        known = ", ".join(sorted(toolbox.tools)) or "none"
        return Outcome(call, f"unknown tool {call.name!r} (the tools are: {known})", is_error=True)
    deadline = asyncio.timeout(limit)
    try:
        async with deadline:
            result = await tool.call(call.arguments)
        json.dumps(result, allow_nan=False)
    except TimeoutError as exc:
        if not deadline.expired():
            return _failed(call, exc, agent)
        log.warning("agent %s: tool %s did not finish within %g s", agent, call.name, limit)
        return Outcome(call, f"the tool did not finish within {limit:g} s (tool_timeout)", is_error=True)
    except Exception as exc:
        return _failed(call, exc, agent)
    return Outcome(call, result)


def _failed(call: Call, exc: Exception, agent: str) -> Outcome:
    # The model gets the error and may try something else. The exception's text often quotes
    # the arguments (an MCP server's error echoes them), so it is no log's business above
    # DEBUG (issue 18: no message text at any level an operator keeps): WARNING says what
    # failed and how, the text and the traceback are for debugging.
    log.warning("agent %s: tool %s failed: %s", agent, call.name, type(exc).__name__)
    log.debug("agent %s: tool %s failed", agent, call.name, exc_info=exc)
    text = str(exc)
    return Outcome(call, f"{type(exc).__name__}: {text}" if text else type(exc).__name__, is_error=True)
