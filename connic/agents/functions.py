"""Plain Python functions as tools: the ``tools = ["mypkg.tools:get_weather", "tools.py:search"]`` option.

Each entry names a function the way agents and middleware are named by reference
(``MODULE:NAME``, or ``FILE.py:NAME`` relative to the configuration file's folder). The
tool's name is ``NAME``'s last part, its description the function's docstring, and the JSON
Schema of its arguments comes from the signature and type hints through pydantic
(``TypeAdapter``); arguments the model sends are validated by pydantic (``validate_call``)
before the function runs. Sync functions run in threads of the agent's own, at most
``tool_threads`` at once (connic/agents/_tool_threads.py: never the event loop's default
executor, which the DNS resolver shares). pydantic is imported only when an agent has
function tools (``pip install 'connic[tools]'``).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from connic.agents._tool_threads import DEFAULT_THREADS, ToolThreads
from connic.agents.tools import Tool, name_problem, shown_name
from connic.errors import ConfigError, PluginError
from connic.registry import REFERENCE_BASE, first_line, import_reference, split_reference

__all__ = ["FunctionTool", "FunctionTools", "load_function"]


def load_function(entry: str, base: Path) -> tuple[str, Callable[..., Any]]:
    """The tool name and the function ``entry`` (``MODULE:NAME`` or ``FILE.py:NAME``) names.

    Raises :class:`ConfigError` saying what is wrong with the entry (not which key it is in).
    """
    try:
        obj = import_reference(entry, base, "tool", form="MODULE:FUNCTION or FILE.py:FUNCTION")
    except PluginError as exc:
        # import_reference's message starts with the label it was given ("tool: ").
        raise ConfigError(str(exc).removeprefix("tool: ")) from exc
    attr = split_reference(entry)[1]
    if isinstance(obj, type) or not callable(obj):
        raise ConfigError(f"{attr} is {'a class' if isinstance(obj, type) else type(obj).__name__}, not a function")
    name = attr.rpartition(".")[2]
    problem = name_problem(name)
    if problem is not None:
        raise ConfigError(f"the tool name {shown_name(name)} {problem}")
    return name, obj


class FunctionTool:
    """One Python function as a :class:`connic.agents.tools.Tool`.

    A sync function runs in one of ``threads`` (by default, a set of its own of
    :data:`~connic.agents._tool_threads.DEFAULT_THREADS`).
    """

    def __init__(self, name: str, function: Callable[..., Any], threads: ToolThreads | None = None) -> None:
        pydantic = _pydantic()
        self._threads = threads if threads is not None else ToolThreads(DEFAULT_THREADS)
        self._name = name
        self._function = function
        self._async = inspect.iscoroutinefunction(function)
        self._description = inspect.getdoc(function) or ""
        try:
            schema = pydantic.TypeAdapter(function).json_schema()
            self._validated = pydantic.validate_call(function)
        except Exception as exc:  # pydantic's errors for a signature it cannot handle, an unresolved hint
            raise ConfigError(f"cannot describe the arguments of {name}: {first_line(exc)}") from None
        if schema.get("type") != "object":
            raise ConfigError(f"cannot describe the arguments of {name} as a JSON object")
        self._parameters: Mapping[str, Any] = schema
        # pydantic titles validate_call's errors with the function's name: an error titled
        # otherwise was raised by the function itself (its own models), not by the arguments.
        self._titles = {getattr(function, "__name__", name), getattr(function, "__qualname__", name)}

    @property
    def name(self) -> str:
        """The name the model calls the function by."""
        return self._name

    @property
    def description(self) -> str:
        """The function's docstring."""
        return self._description

    @property
    def parameters(self) -> Mapping[str, Any]:
        """The JSON Schema of the arguments, from the signature and type hints."""
        return self._parameters

    async def call(self, arguments: Mapping[str, Any]) -> Any:
        """Validate ``arguments``, run the function (a sync one in a thread), return its result as JSON data."""
        pydantic = _pydantic()
        try:
            if self._async:
                result = await self._validated(**arguments)
            else:
                # Cancelling abandons the thread (Python cannot stop it); its result is dropped.
                result = await self._threads.run(self._validated, **arguments)
        except pydantic.ValidationError as exc:
            if exc.title not in self._titles:
                raise
            problems = "; ".join(
                f"{'.'.join(str(part) for part in error['loc']) or 'arguments'}: {error['msg']}"
                for error in exc.errors(include_url=False)
            )
            raise ValueError(f"invalid arguments: {problems}") from None
        # Dataclasses, pydantic models, datetimes ... become JSON values the providers accept.
        return importlib.import_module("pydantic_core").to_jsonable_python(result)

    def __repr__(self) -> str:
        return f"FunctionTool({self._name!r}, {self._function!r})"


class FunctionTools:
    """A :class:`connic.agents.tools.ToolSource` of Python functions (an agent's ``tools`` option).

    The functions are imported and described when this is built, so a bad entry is a
    :class:`ConfigError` when the configuration loads (``connic check`` too), naming
    ``key`` and the entry. Relative files start from ``base``: by default the
    configuration file's folder (:data:`connic.registry.REFERENCE_BASE`), else the
    current directory. Sync functions run in at most ``threads`` threads at once, the
    agent's own (``agent`` names it in their log lines).
    """

    def __init__(
        self,
        entries: Sequence[str],
        key: str = "tools",
        base: Path | None = None,
        *,
        threads: int = DEFAULT_THREADS,
        agent: str = "?",
    ) -> None:
        if base is None:
            base = REFERENCE_BASE.get() or Path.cwd()
        self.threads = ToolThreads(threads, agent)
        self.tools: list[FunctionTool] = []
        given: dict[str, str] = {}
        for index, entry in enumerate(entries):
            label = f"{key}[{index}] {entry!r}"
            try:
                name, function = load_function(entry, base)
                if name in given:
                    raise ConfigError(f"a tool named {name!r} is already given by {given[name]}")
                self.tools.append(FunctionTool(name, function, self.threads))
            except ConfigError as exc:
                raise ConfigError(f"{label}: {exc.message}") from None
            given[name] = label

    async def start(self) -> Sequence[Tool]:
        """The functions (ready since this was built), with their threads' bound afresh."""
        self.threads.open()
        return list(self.tools)

    async def close(self) -> None:
        """Abandon the sync calls still running (logged with their number); nothing waits for them."""
        self.threads.close()


def _pydantic() -> Any:
    try:
        return importlib.import_module("pydantic")
    except ImportError:
        raise ConfigError("function tools need pydantic: pip install 'connic[tools]'") from None
