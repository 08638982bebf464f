"""The plugin registry, built from entry points by :func:`load_registry`.

Nothing is imported until a plugin is asked for, so ``connic plugins`` and a
server that uses only ``echo`` never pay for an LLM SDK. Tests and embedders
build their own registry and may :meth:`Registry.register` classes directly.

Agents and middleware may also be named by reference, without packaging
(:meth:`Registry.resolve`): ``"agents.py:Shouter"`` (a file) or
``"mypkg.agents:Shouter"`` (an importable module); see docs/writing-agents.md.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import importlib
import importlib.util
import re
import sys
from collections.abc import Callable, Iterable
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

import attrs

from connic.agent import Agent
from connic.errors import PluginError
from connic.middleware import Middleware

__all__ = [
    "GROUPS",
    "REFERENCE_BASE",
    "Kind",
    "PluginInfo",
    "Registry",
    "absolute_reference",
    "check_plugin",
    "import_reference",
    "is_reference",
    "load_reference",
    "load_registry",
    "reference_name",
]

Kind = Literal["agents", "transports", "middleware", "stores"]
GROUPS: dict[Kind, str] = {
    "agents": "connic.agents",
    "transports": "connic.transports",
    "middleware": "connic.middleware",
    "stores": "connic.stores",
}
_SINGULAR: dict[Kind, str] = {
    "agents": "agent",
    "transports": "transport",
    "middleware": "middleware",
    "stores": "store",
}


def _what(obj: Any) -> str:
    """How an error names what an object is: ``a function``, ``the class Foo``, ``an int``."""
    if isinstance(obj, type):
        return f"the class {obj.__name__}"
    if isinstance(obj, ModuleType):
        return "a module"
    kind = type(obj).__name__
    if callable(obj) and hasattr(obj, "__code__"):
        kind = "function"
    return f"{'an' if kind[:1] in 'aeiou' else 'a'} {kind}"


def check_plugin(kind: Kind, obj: Any, label: str, attr: str | None = None) -> None:
    """Refuse an object that cannot be a plugin of ``kind``, naming it (``label``) and what it is.

    Checked when the plugin loads, so that a mistake is one error at start-up rather than
    an ``agent_error`` on every turn. ``attr`` is the attribute's name, when a reference gave it.
    """
    named = f"{attr} is {_what(obj)}" if attr else f"it is {_what(obj)}"
    if kind == "agents" and not (isinstance(obj, type) and issubclass(obj, Agent)):
        raise PluginError(f"{label}: {named}, not a connic.Agent subclass")
    if kind == "middleware":
        if isinstance(obj, type):
            if not issubclass(obj, Middleware):
                raise PluginError(f"{label}: {named}, not a connic.Middleware subclass")
        elif not callable(obj):
            raise PluginError(f"{label}: {named}, neither a connic.Middleware subclass nor a callable")


def is_reference(use: str) -> bool:
    """Whether ``use`` names a plugin by reference (``FILE.py:ATTR``, ``MODULE:ATTR``), not by entry point."""
    return ":" in use


def split_reference(use: str) -> tuple[str, str]:
    """``"where:attr"`` split into where the object lives (module or file) and its attribute path."""
    # rpartition: the attribute is after the last colon, so a Windows path keeps its drive.
    where, _, attr = use.rpartition(":")
    return where, attr


def reference_name(use: str) -> str:
    """The name a reference serves under on the command line: its class name, lower-cased."""
    return split_reference(use)[1].rpartition(".")[2].lower()


def is_file_reference(where: str) -> bool:
    """Whether the ``where`` part of a reference names a Python file rather than a module."""
    return where.endswith(".py") or "/" in where or "\\" in where


def absolute_reference(use: str, base: Path) -> str:
    """``use`` with a relative file made absolute against ``base`` (anything else unchanged)."""
    where, attr = split_reference(use)
    if not is_reference(use) or not is_file_reference(where):
        return use
    return f"{(base / Path(where).expanduser()).resolve()}:{attr}"


REFERENCE_BASE: contextvars.ContextVar[Path | None] = contextvars.ContextVar("connic_reference_base", default=None)
"""The folder a relative ``FILE.py:NAME`` in a plugin's own options starts from (an agent's
``tools``), set while :func:`connic.app.build_runtime` builds the agents: the configuration
file's folder. Unset (``None``), such references start from the current directory."""


IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
"""A dotted Python name (``pkg.module`` or ``Class.attr``)."""


def load_file(path: Path, label: str) -> ModuleType:
    """Import a Python file as a module of its own, once per file.

    The module's name is unique to the file's absolute path, so two ``agents.py`` in
    different folders never collide, and an agent and a middleware from one file share
    one module. The file's folder is on ``sys.path`` only while the file runs: its
    top-level imports of sibling modules work, and nothing later is shadowed by it.
    The sibling modules it imported are then taken out of ``sys.modules`` (the file keeps
    them): another folder's ``helpers.py`` is that folder's own, not the first one loaded.
    """
    if not path.is_file():
        raise PluginError(f"{label}: file not found: {path}")
    digest = hashlib.sha256(str(path).encode()).hexdigest()[:12]
    name = f"_connic_file_{re.sub(r'[^A-Za-z0-9_]', '_', path.stem)}_{digest}"
    module = sys.modules.get(name)
    if module is not None:
        return module
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise PluginError(f"{label}: cannot load {path} as a Python module")
    module = importlib.util.module_from_spec(spec)
    # In sys.modules while it runs: dataclasses and attrs look their module up there.
    sys.modules[name] = module
    folder = str(path.parent)
    already = set(sys.modules)
    sys.path.insert(0, folder)
    try:
        spec.loader.exec_module(module)
    except BaseException as exc:
        del sys.modules[name]
        if not isinstance(exc, Exception):
            raise
        raise PluginError(f"{label}: importing {path} failed: {first_line(exc)}") from exc
    finally:
        with contextlib.suppress(ValueError):  # the file took it off itself
            sys.path.remove(folder)
        _forget_siblings(set(sys.modules) - already - {name}, path.parent)
    return module


def _forget_siblings(names: set[str], folder: Path) -> None:
    """Take the modules ``names`` that were loaded from ``folder`` (or below) out of ``sys.modules``."""
    for imported in names:
        origin = getattr(sys.modules.get(imported), "__file__", None)
        if origin and Path(origin).resolve().is_relative_to(folder):
            del sys.modules[imported]


def first_line(exc: BaseException) -> str:
    """``exc`` as one line for a start-up error: its class and the first line of its message."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def import_reference(
    use: str,
    base: Path,
    label: str,
    *,
    form: str = "FILE.py:NAME or MODULE:NAME",
    hint: Callable[[ModuleType], str] | None = None,
) -> Any:
    """The object ``use`` (``FILE.py:NAME`` or ``MODULE:NAME``) names; a relative file is relative to ``base``.

    Each failure is a :class:`PluginError` starting ``"{label}: "``; ``form`` is how a
    malformed ``use`` is told to look, ``hint`` what to add when the name is missing from
    the module (say, what it does have). Plugins (:func:`load_reference`) and function
    tools (``connic.agents.functions``) both load through this.
    """
    where, attr = split_reference(use)
    if not where or not IDENTIFIER.match(attr):
        raise PluginError(f"{label}: expected {form}")
    if is_file_reference(where):
        path = (base / Path(where).expanduser()).resolve()
        module = load_file(path, label)
        source = str(path)
    else:
        if not IDENTIFIER.match(where):
            raise PluginError(f"{label}: {where!r} is neither a .py file nor a module name")
        try:
            module = importlib.import_module(where)
        except Exception as exc:
            raise PluginError(f"{label}: importing module {where} failed: {first_line(exc)}") from exc
        source = f"module {where}"
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            more = hint(module) if hint is not None else ""
            raise PluginError(f"{label}: {source} has no attribute {attr!r}{more}") from None
    return obj


def load_reference(kind: Kind, use: str, base: Path) -> Any:
    """Load and check the plugin ``use`` names by reference; a relative file is relative to ``base``."""
    label = f"{_SINGULAR[kind]} {use!r}"
    expected = Agent if kind == "agents" else Middleware

    def plugins_in(module: ModuleType) -> str:
        found = sorted(
            n for n, v in vars(module).items() if isinstance(v, type) and issubclass(v, expected) and v is not expected
        )
        return f" (it has: {', '.join(found)})" if found else ""

    obj = import_reference(use, base, label, hint=plugins_in)
    check_plugin(kind, obj, label, split_reference(use)[1])
    return obj


def _summary(obj: Any) -> str:
    doc = getattr(obj, "__doc__", None) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


@attrs.define
class PluginInfo:
    """One plugin: where it comes from, and (once loaded) the object itself."""

    kind: Kind
    name: str
    distribution: str
    version: str
    target: str
    entry_point: EntryPoint | None = None
    obj: Any = None

    def load(self) -> Any:
        """Import the plugin; a failure names the plugin and its distribution."""
        if self.obj is None:
            assert self.entry_point is not None
            try:
                self.obj = self.entry_point.load()
            except Exception as exc:
                raise PluginError(
                    f"{_SINGULAR[self.kind]} plugin {self.name!r} from distribution "
                    f"{self.distribution} {self.version} failed to load ({self.target}): "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
            check_plugin(
                self.kind,
                self.obj,
                f"{_SINGULAR[self.kind]} plugin {self.name!r} from distribution "
                f"{self.distribution} {self.version} ({self.target})",
            )
        return self.obj

    @property
    def description(self) -> str:
        """The first line of the plugin's docstring (imports the plugin)."""
        return _summary(self.load())


class Registry:
    """Plugins by kind and name."""

    def __init__(self, plugins: Iterable[PluginInfo] = ()) -> None:
        self._plugins: dict[Kind, dict[str, PluginInfo]] = {kind: {} for kind in GROUPS}
        self._clashes: dict[tuple[Kind, str], list[str]] = {}
        for info in plugins:
            self._add(info)

    def _add(self, info: PluginInfo) -> None:
        current = self._plugins[info.kind].get(info.name)
        if current is not None and current.distribution != info.distribution:
            self._clashes.setdefault((info.kind, info.name), [current.distribution]).append(info.distribution)
        self._plugins[info.kind][info.name] = info

    def register(self, kind: Kind, name: str, obj: Any) -> None:
        """Add a plugin object directly (tests, embedding), replacing one of the same name."""
        self._plugins[kind][name] = PluginInfo(kind, name, "(registered)", "", repr(obj), obj=obj)
        self._clashes.pop((kind, name), None)

    def names(self, kind: Kind) -> list[str]:
        """The names of the plugins of one kind, sorted."""
        return sorted(self._plugins[kind])

    def info(self, kind: Kind, name: str) -> PluginInfo:
        """The :class:`PluginInfo` of a plugin; unknown names list what is available."""
        try:
            info = self._plugins[kind][name]
        except KeyError:
            available = ", ".join(self.names(kind)) or "none installed"
            raise PluginError(f"unknown {_SINGULAR[kind]} plugin {name!r} (available: {available})") from None
        clash = self._clashes.get((kind, name))
        if clash:
            raise PluginError(
                f"{_SINGULAR[kind]} plugin {name!r} is declared by several distributions: {', '.join(clash)}"
            )
        return info

    def get(self, kind: Kind, name: str) -> Any:
        """The loaded plugin object."""
        return self.info(kind, name).load()

    def resolve(self, kind: Kind, use: str, base: Path | None = None) -> Any:
        """The plugin a ``use`` value names: an entry point's name, or for agents and middleware a reference.

        ``FILE.py:NAME`` (a path, relative to ``base``, by default the current directory) or
        ``MODULE:NAME`` (an importable module). A reference's object is checked like an
        entry point's: an agent must be a :class:`connic.Agent` subclass, a middleware a
        :class:`connic.Middleware` subclass or a callable.
        """
        if kind in ("agents", "middleware") and is_reference(use):
            return load_reference(kind, use, base if base is not None else Path.cwd())
        return self.get(kind, name=use)

    def __iter__(self) -> Any:
        for kind in GROUPS:
            yield from (self._plugins[kind][name] for name in self.names(kind))


def load_registry() -> Registry:
    """Build a registry from the installed distributions' entry points."""
    plugins = []
    for kind, group in GROUPS.items():
        for ep in entry_points(group=group):
            dist = ep.dist
            plugins.append(
                PluginInfo(
                    kind=kind,
                    name=ep.name,
                    distribution=dist.metadata["Name"] if dist is not None else "(unknown)",
                    version=dist.version if dist is not None else "",
                    target=ep.value,
                    entry_point=ep,
                )
            )
    return Registry(plugins)
