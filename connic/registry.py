"""The plugin registry, built from entry points by :func:`load_registry`.

Nothing is imported until a plugin is asked for, so ``connic plugins`` and a
server that uses only ``echo`` never pay for an LLM SDK. Tests and embedders
build their own registry and may :meth:`Registry.register` classes directly.
"""

from __future__ import annotations

from collections.abc import Iterable
from importlib.metadata import EntryPoint, entry_points
from typing import Any, Literal

import attrs

from connic.errors import PluginError

__all__ = ["GROUPS", "Kind", "PluginInfo", "Registry", "load_registry"]

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
