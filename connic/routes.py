"""Installing the connectors' routes, refusing a configuration in which one would hide another's.

aiohttp serves a request with the first route that matches it. An ``agui`` connector
at ``/a`` also serves ``GET /a/ws`` (its WebSocket binding), so a ``websocket``
connector at ``/a/ws`` listed after it was never reached: the banner showed it, its
clients got AG-UI's ``RUN_ERROR``\\ s. Each route a connector (or ``/metrics``) adds is
checked against the routes added before it by the others; one they would hide is a
:class:`~connic.errors.ConfigError` naming both.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from aiohttp import web
from aiohttp.web_urldispatcher import AbstractRoute

from connic.errors import ConfigError

if TYPE_CHECKING:
    from connic.app import Runtime

__all__ = ["install_routes"]


def install_routes(app: web.Application, runtime: Runtime, metrics: Any | None) -> None:
    """Install every transport's routes on ``app``, then ``metrics`` (the handler) at ``server.metrics_path``.

    ``metrics`` None: the metrics route is checked but its handler never runs
    (``connic check`` installs on an application it never serves). Raises
    :class:`~connic.errors.ConfigError` when a route would be hidden by another's.
    """
    routes = _Routes(app, runtime.config.where)
    for transport in runtime.transports:
        owner = f"{transport.key} ({transport.connector.transport} at {transport.connector.path!r})"
        with routes.owned_by(f"{transport.key}.path", owner):
            transport.install(app)
    server = runtime.config.server
    if server.metrics and server.metrics_port == 0:
        with routes.owned_by("server.metrics_path", "server.metrics_path"):
            app.router.add_get(server.metrics_path, metrics if metrics is not None else _unserved)


async def _unserved(request: web.Request) -> web.StreamResponse:
    raise web.HTTPNotFound()


class _Routes:
    """The routes connic's parts added to one application, each with the key of the part that added it."""

    def __init__(self, app: web.Application, where: str) -> None:
        self.app = app
        self.where = where
        self.served: list[tuple[AbstractRoute, str]] = []  # each route, and who added it

    @contextlib.contextmanager
    def owned_by(self, key: str, owner: str) -> Iterator[None]:
        """The routes added inside the block are ``owner``'s; each is checked against the others' first.

        ``key`` is the configuration key a refusal names.
        """
        before = {id(route) for route in self.app.router.routes()}
        try:
            yield
        except RuntimeError:
            # aiohttp adds a route for the path of the resource added last to that resource,
            # and raises when it has one for the method already: the other part's route.
            resources = list(self.app.router.resources())
            path = resources[-1].get_info().get("path") if resources else None
            if not isinstance(path, str):
                raise
            self._refuse(key, "GET", path)
            raise
        for route in self.app.router.routes():
            if id(route) not in before:
                self._claim(route, key, owner)

    def _claim(self, route: AbstractRoute, key: str, owner: str) -> None:
        path = route.resource.get_info().get("path") if route.resource is not None else None
        # A route with a pattern ({agent}) is only hidden in part: not checked. HEAD goes with its GET.
        if isinstance(path, str) and route.method != "HEAD":
            self._refuse(key, route.method, path, owner)
        self.served.append((route, owner))

    def _refuse(self, key: str, method: str, path: str, owner: str | None = None) -> None:
        """A ConfigError if another part's route already takes ``method path``."""
        for earlier, other in self.served:
            if other != owner and _same_method(earlier.method, method) and _matches(earlier, path):
                raise ConfigError(f"{self.where}: {key}: {method} {path} is already served by {other}")


def _same_method(one: str, other: str) -> bool:
    return one == other or "*" in (one, other)


def _matches(route: AbstractRoute, path: str) -> bool:
    """Whether ``route`` would take a request for ``path``."""
    if route.resource is None:
        return False
    info = route.resource.get_info()
    if info.get("path") == path:
        return True
    pattern = info.get("pattern")
    return pattern is not None and pattern.fullmatch(path) is not None
