"""Building the aiohttp application: standalone (:func:`create_app`) or embedded (:func:`setup`)."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator, Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Any

import attrs
from aiohttp import web

from connic.agent import Agent
from connic.config import Config, default_config, load_config, parse_config, structure
from connic.errors import ConfigError, PluginError
from connic.gate import ConnectionGate
from connic.metrics import CONTENT_TYPE, Metrics
from connic.middleware import MiddlewareFunc
from connic.playground import install_playground
from connic.redact import hide_bad_request_echo, install_log_redaction
from connic.registry import REFERENCE_BASE, Registry, load_registry
from connic.routes import install_routes
from connic.stores import SessionStore
from connic.stores.memory import MemoryStore
from connic.telemetry import configure as configure_telemetry
from connic.transport import Transport

__all__ = [
    "RUNTIME",
    "STARTING",
    "ConfigLike",
    "Runtime",
    "build_runtime",
    "create_app",
    "drain",
    "resolve_config",
    "setup",
]

ConfigLike = Config | str | Path | Mapping[str, Any] | None
"""A Config, a path to a TOML file, parsed TOML data, or None (``$CONNIC_CONFIG`` or the default)."""


@attrs.define
class Runtime:
    """The live objects built from a configuration."""

    config: Config
    agents: dict[str, Agent]
    transports: list[Transport]
    metrics: Metrics = attrs.field(factory=Metrics)
    gate: ConnectionGate = attrs.field(factory=lambda: ConnectionGate(0, 0))
    store: SessionStore = attrs.field(factory=MemoryStore)

    def __attrs_post_init__(self) -> None:
        for transport in self.transports:
            transport.metrics = self.metrics
            transport.gate = self.gate
            transport.store = self.store


RUNTIME = web.AppKey("connic.runtime", Runtime)
"""Where a connic application keeps its :class:`Runtime`."""

STARTING = web.AppKey[Callable[[str], None]]("connic.starting")
"""Optional: called with what the application's start-up begins next (``agent 'x' start()``).

A worker of ``run --workers N`` passes it on to its parent, which can then say what a worker
that does not listen in time is stuck in.
"""


def resolve_config(config: ConfigLike) -> Config:
    """Turn any accepted form of configuration into a :class:`Config`."""
    if isinstance(config, Config):
        return config
    if isinstance(config, str | Path):
        return load_config(config)
    if isinstance(config, Mapping):
        return parse_config(config)
    env = os.environ.get("CONNIC_CONFIG")
    return load_config(env) if env else default_config()


def _options(plugin: Any, data: Mapping[str, Any], where: str, key: str) -> Any:
    options_cls = getattr(plugin, "Options", None)
    if options_cls is None:
        if data:
            keys = ", ".join(repr(k) for k in sorted(data))
            raise ConfigError(f"{where}: {key}: unknown key {keys} (this plugin takes no options)")
        return None
    return structure(dict(data), options_cls, where=where, key=key)


def _base(config: Config) -> Path:
    """Where a relative ``FILE.py:NAME`` reference starts: the configuration file's folder, else here."""
    return Path(config.source).parent if config.source else Path.cwd()


def _plugin(registry: Registry, kind: Any, name: str, where: str, key: str, base: Path | None = None) -> Any:
    try:
        return registry.resolve(kind, name, base)
    except PluginError as exc:
        raise ConfigError(f"{where}: {key}: {exc}") from exc


def _middleware(
    registry: Registry, use: str, data: Mapping[str, Any], where: str, key: str, base: Path
) -> MiddlewareFunc:
    plugin = _plugin(registry, "middleware", use, where, f"{key}.use", base)
    if isinstance(plugin, type):
        instance: MiddlewareFunc = plugin(_options(plugin, data, where, key))
        return instance
    _options(None, data, where, key)
    fn: MiddlewareFunc = plugin
    return fn


# aiohttp reads braces in a route's path as a pattern: "/a/{x}" served every "/a/..." and
# "/a/{x" raised ValueError out of the server's start, a traceback where `check` said ok.
_PATTERN_MARKS = frozenset("{}")
_PATTERN_PROBLEM = "must not contain '{' or '}' (aiohttp would read a route pattern)"


def build_runtime(config: Config, registry: Registry | None = None) -> Runtime:
    """Resolve the plugins a configuration names and build agents and transports."""
    registry = registry if registry is not None else load_registry()
    where = config.where
    base = _base(config)
    agents: dict[str, Agent] = {}
    for name, agent_config in config.agents.items():
        key = f"agents.{name}"
        cls = _plugin(registry, "agents", agent_config.use, where, f"{key}.use", base)
        options = _options(cls, agent_config.options, where, key)
        reset = REFERENCE_BASE.set(base)  # an agent's own references (its tools) start there too
        try:
            agents[name] = cls(name, options)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {key}: {exc.message}") from None
        finally:
            REFERENCE_BASE.reset(reset)
    if not config.connectors:
        raise ConfigError(f"{where}: connectors: no connector is configured")
    server = config.server
    if server.metrics and not server.metrics_path.startswith("/"):
        raise ConfigError(f"{where}: server.metrics_path: must start with '/', got {server.metrics_path!r}")
    if server.metrics and _PATTERN_MARKS & set(server.metrics_path):
        raise ConfigError(f"{where}: server.metrics_path: {_PATTERN_PROBLEM}, got {server.metrics_path!r}")
    transports: list[Transport] = []
    paths: dict[str, str] = {}
    for index, connector in enumerate(config.connectors):
        key = f"connectors[{index}]"
        if not connector.path.startswith("/"):
            raise ConfigError(f"{where}: {key}.path: must start with '/', got {connector.path!r}")
        if _PATTERN_MARKS & set(connector.path):
            raise ConfigError(f"{where}: {key}.path: {_PATTERN_PROBLEM}, got {connector.path!r}")
        if connector.path in paths:
            raise ConfigError(f"{where}: {key}.path: {connector.path!r} is already used by {paths[connector.path]}")
        if server.metrics and server.metrics_port == 0 and connector.path == server.metrics_path:
            raise ConfigError(f"{where}: {key}.path: {connector.path!r} is server.metrics_path")
        paths[connector.path] = key
        names = connector.agents or tuple(agents)
        missing = [n for n in names if n not in agents]
        if missing:
            known = ", ".join(sorted(agents)) or "none"
            raise ConfigError(f"{where}: {key}.agents: no agent named {missing[0]!r} (configured agents: {known})")
        if not names:
            raise ConfigError(f"{where}: {key}.agents: no agent is configured ([agents.NAME] tables)")
        middleware = [
            _middleware(registry, mw.use, mw.options, where, f"{key}.middleware[{i}]", base)
            for i, mw in enumerate(connector.middleware)
        ]
        cls = _plugin(registry, "transports", connector.transport, where, f"{key}.transport")
        transports.append(
            cls(
                connector=connector,
                options=_options(cls, connector.options, where, key),
                agents={n: agents[n] for n in names},
                middleware=middleware,
                where=where,
                key=key,
            )
        )
    gate = ConnectionGate(server.max_connections, server.max_connections_per_ip, server.max_unauthenticated)
    store_cls = _plugin(registry, "stores", config.store.use, where, "store.use")
    store = store_cls(_options(store_cls, config.store.options, where, "store"))
    return Runtime(config=config, agents=agents, transports=transports, gate=gate, store=store)


async def _agents_lifecycle(runtime: Runtime, app: web.Application) -> AsyncIterator[None]:
    # The runtime is bound when installed, not read back from app[RUNTIME]: an app's
    # callbacks must each serve the runtime they were installed with.
    starting = app.get(STARTING)

    def step(what: str) -> None:
        if starting is not None:
            starting(what)

    started: list[Agent] = []
    step(f"the session store's start() ([store] use = {runtime.config.store.use!r})")
    await runtime.store.start()
    try:
        for name, agent in runtime.agents.items():
            step(f"agent {name!r} start()")
            await agent.start()
            started.append(agent)
        step("binding the port")
        yield
    finally:
        await asyncio.gather(*(agent.close() for agent in reversed(started)), return_exceptions=True)
        await runtime.store.close()


async def drain(app: web.Application, *, restart: bool = False) -> None:
    """Gracefully close connic's connections: finish in-flight replies, then close 1001.

    With ``restart`` (``run --reload`` restarting its server) they close 1012, service
    restart, instead: the server is back in a moment, so clients reconnect.

    ``app`` is what :func:`create_app` or :func:`setup` returned. connic also
    drains from ``on_shutdown``, but aiohttp stops reading every connection
    before that signal (``Server.pre_shutdown``), so a server that calls this
    first, as ``python -m connic run`` does, keeps answering pings and cancels
    and can refuse new messages politely while it drains. Calling it twice is
    harmless.
    """
    runtime = app[RUNTIME]
    for transport in runtime.transports:
        transport.restarting = restart
    await _drain(runtime)


async def _drain(runtime: Runtime, app: web.Application | None = None) -> None:
    grace = runtime.config.server.shutdown_grace
    await asyncio.gather(*(t.shutdown(grace) for t in runtime.transports))


def _metrics_app(runtime: Runtime) -> web.Application:
    app = web.Application()
    app.router.add_get(runtime.config.server.metrics_path, _metrics_handler(runtime))
    return app


def _metrics_handler(runtime: Runtime) -> Any:
    async def metrics(request: web.Request) -> web.Response:
        # prometheus-client's exposition (this app's registry, or every worker's in multiprocess mode).
        return web.Response(body=runtime.metrics.exposition(), headers={"Content-Type": CONTENT_TYPE})

    return metrics


async def _metrics_site(runtime: Runtime, app: web.Application) -> AsyncIterator[None]:
    # metrics_port set: /metrics gets a listener of its own, beside the main one.
    server = runtime.config.server
    runner = web.AppRunner(_metrics_app(runtime), access_log=None)
    await runner.setup()
    try:
        try:
            await web.TCPSite(runner, server.host, server.metrics_port).start()
        except (socket.gaierror, ValueError) as exc:
            # Bare, asyncio says only "Name or service not known" (or, for a malformed
            # name, raises UnicodeError from the idna codec).
            why = exc.strerror if isinstance(exc, socket.gaierror) else exc
            raise ConfigError(f"{runtime.config.where}: server.host: cannot resolve {server.host!r}: {why}") from None
        yield
    finally:
        await runner.cleanup()


def _install(app: web.Application, runtime: Runtime, *, playground_path: str = "/") -> None:
    app[RUNTIME] = runtime
    install_log_redaction()  # aiohttp logs request lines, which may carry a secret
    configure_telemetry(runtime.config.server, runtime.metrics, app, where=runtime.config.where)
    install_routes(app, runtime, _metrics_handler(runtime))  # the transports', then /metrics on the main port
    server = runtime.config.server
    if server.metrics and server.metrics_port:
        app.cleanup_ctx.append(partial(_metrics_site, runtime))
    if server.playground:
        install_playground(app, runtime, path=playground_path)
    app.cleanup_ctx.append(partial(_agents_lifecycle, runtime))
    app.on_shutdown.append(partial(_drain, runtime))


def create_app(config: ConfigLike = None, *, registry: Registry | None = None) -> web.Application:
    """A standalone connic application: what ``python -m connic run`` and gunicorn serve."""
    runtime = build_runtime(resolve_config(config), registry)
    app = web.Application()
    _install(app, runtime)
    hide_bad_request_echo(app)  # a malformed request's 400 body would quote it, secret and all
    return app


def setup(
    app: web.Application,
    config: ConfigLike = None,
    *,
    prefix: str | None = "/connic",
    registry: Registry | None = None,
) -> web.Application:
    """Add connic to an existing aiohttp application.

    By default connic lives in a sub-application under ``prefix``: connic's
    auth, limits and handlers never touch the host's routes. (aiohttp still runs
    the host's own middleware for a sub-application's requests; a host middleware
    that must not see connic's can skip paths under ``prefix``.) With
    ``prefix=None`` the routes are added to ``app`` itself, and the playground
    moves to ``/connic/`` so the host keeps ``/``. Returns the application connic
    was installed into.
    """
    if prefix is not None and not prefix.strip("/"):
        raise ValueError("prefix must name a path such as '/connic'; use prefix=None to install at the root")
    if prefix is None and RUNTIME in app:
        # Two runtimes at one root would claim the same paths (/ws, /metrics, the
        # playground), and app[RUNTIME], which drain(app) uses, can hold only one.
        raise ConfigError(
            "setup(prefix=None): connic is already installed in this application; give the second "
            "instance a prefix of its own (prefix='/other'), or configure both sets of agents in one config"
        )
    runtime = build_runtime(resolve_config(config), registry)
    if prefix is None:
        # The host owns "/": the playground goes to /connic/ (docs/playground.md).
        _install(app, runtime, playground_path="/connic/")
        return app
    sub = web.Application()
    _install(sub, runtime)
    app.add_subapp(prefix.rstrip("/"), sub)
    return sub
