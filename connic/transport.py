"""The transport plugin API: how agents are exposed over the network."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from aiohttp import web

from connic.agent import Agent
from connic.config import ConnectorConfig
from connic.gate import ConnectionGate
from connic.metrics import Metrics
from connic.middleware import MiddlewareFunc
from connic.stores import SessionStore
from connic.stores.memory import MemoryStore

__all__ = ["Transport"]


class Transport:
    """Base class of transport plugins (entry point group ``connic.transports``).

    One instance serves one ``[[connectors]]`` entry. Its ``Options`` attrs class
    receives the connector's transport-specific keys. :meth:`install` adds the
    transport's routes to the connic application; :meth:`shutdown` drains it.
    ``metrics``, ``gate`` (the connection caps) and ``store`` (the session
    store) are the application's, set when the runtime is built.
    """

    Options: ClassVar[type[Any] | None] = None

    def __init__(
        self,
        *,
        connector: ConnectorConfig,
        options: Any,
        agents: Mapping[str, Agent],
        middleware: Sequence[MiddlewareFunc],
        where: str,
        key: str,
    ) -> None:
        self.connector = connector
        self.options = options
        self.agents = dict(agents)
        self.middleware = list(middleware)
        self.where = where
        self.key = key
        self.metrics = Metrics()
        self.gate = ConnectionGate(0, 0)
        self.store: SessionStore = MemoryStore()
        self.restarting = False
        """Set before :meth:`shutdown` when the server restarts at once (``run --reload``): close 1012, not 1001."""

    def install(self, app: web.Application) -> None:
        """Add routes to ``app`` (the connic application or sub-application)."""
        raise NotImplementedError

    async def shutdown(self, grace: float) -> None:
        """Stop: let in-flight work finish for up to ``grace`` seconds, then close."""

    def describe(self, base_url: str) -> str:
        """One line for the start-up banner, e.g. the connector's URL."""
        return f"{base_url}{self.connector.path}"
