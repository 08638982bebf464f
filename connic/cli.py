"""The command line: ``python -m connic run | plugins | check | new``.

It parses the arguments and makes the configuration; serving it is
:mod:`connic.serving`'s (``serve``, re-exported here).
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import logging
import os
import secrets
import shlex
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
from aiohttp import web

from connic import __version__
from connic.app import build_runtime, create_app
from connic.banner import print_banner
from connic.config import AgentConfig, Config, default_config, load_config
from connic.errors import ConfigError, ConnicError, PluginError
from connic.logs import FORMATS, configure_logging
from connic.metrics import MULTIPROC_ENV
from connic.registry import absolute_reference, is_reference, load_reference, load_registry, reference_name
from connic.reload import CHILD_ENV, SECRET_ENV, run_reloading
from connic.routes import install_routes
from connic.serving import GC_YOUNG_THRESHOLD, SLOW_CALLBACK, Listening, serve
from connic.starter import write_starter

# Re-exported: print_banner from connic.banner; serve, Listening and GC_YOUNG_THRESHOLD from connic.serving.
__all__ = ["GC_YOUNG_THRESHOLD", "MAX_WORKERS", "Listening", "main", "print_banner", "serve"]

MAX_WORKERS = 1024
"""The most ``--workers`` accepts. A fixed bound, not one of ``os.cpu_count()``: a container sees
the host's CPUs, not its own share. Each worker is a whole Python process (tens of MB): more
than this is a typo (``--workers 100000`` had the parent start processes until the machine ran
out of memory or of process slots)."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="connic", description="Serve chat agents over WebSocket.")
    parser.add_argument("--version", action="version", version=f"connic {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run the server", description="Run the connic server.")
    run.add_argument("--config", metavar="FILE", help="TOML configuration file (default: $CONNIC_CONFIG, or built in)")
    run.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    run.add_argument("--port", type=int, help="port to listen on (default 8080; 0 picks a free one)")
    run.add_argument(
        "--agent",
        action="append",
        metavar="PLUGIN",
        help=(
            "serve this agent (repeatable; replaces the configured agents): an installed plugin's name,"
            " FILE.py:CLASS or MODULE:CLASS (served as CLASS, lower-cased)"
        ),
    )
    run.add_argument(
        "--secret", action="append", metavar="S", help="accept this secret (repeatable; replaces configured secrets)"
    )
    run.add_argument("--no-auth", action="store_true", help="do not require a secret")
    run.add_argument("--no-streaming", action="store_true", help="send whole responses instead of streams")
    run.add_argument("--session-timeout", type=float, metavar="S", help="idle seconds before a session expires")
    run.add_argument("--max-messages", type=int, metavar="N", help="messages allowed per session")
    run.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help=(
            f"serve from N processes (1 to {MAX_WORKERS}) on one port (SO_REUSEPORT), under a supervising parent"
            " (default 1)"
        ),
    )
    run.add_argument(
        "--reload",
        action="store_true",
        help=(
            "restart the server when a .py, .toml or template file changes under the configuration's folder"
            " (or the --agent file's, or the current directory); needs the watchfiles package"
        ),
    )
    run.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    run.add_argument(
        "--log-format",
        choices=FORMATS,
        help="log lines as plain text or one JSON object each (default: the configuration's server.log_format, text)",
    )
    run.add_argument(
        "--debug",
        action="store_true",
        help=f"asyncio debug mode: log every callback that blocks the event loop over {SLOW_CALLBACK:g} s",
    )

    commands.add_parser("plugins", help="list installed plugins", description="List installed plugins.")

    check = commands.add_parser("check", help="validate a configuration", description="Validate a configuration.")
    check.add_argument("--config", metavar="FILE", required=True, help="TOML configuration file")

    new = commands.add_parser(
        "new",
        help="write a starter agent and its configuration",
        description="Write NAME/agent.py and NAME/connic.toml: an agent to edit, and the configuration serving it.",
    )
    new.add_argument("name", metavar="NAME", help="the folder to create (refused if it holds either file)")
    return parser


def _cli_agents(values: Sequence[str]) -> dict[str, AgentConfig]:
    """The agents ``--agent`` names: a plugin under its own name, a reference under its class name.

    A file reference is made absolute here, against the current directory: the
    configuration file's folder (where references in the file start) is not where the
    user typed it.
    """
    agents: dict[str, AgentConfig] = {}
    given: dict[str, str] = {}
    for value in values:
        name = reference_name(value) if is_reference(value) else value
        use = absolute_reference(value, Path.cwd())
        if name in given and agents[name].use != use:
            raise ConfigError(f"--agent {value}: the name {name!r} is already served by --agent {given[name]}")
        given[name] = value
        if is_reference(value):
            # Loaded here too (build_runtime finds it cached), so that a mistake is blamed on
            # the flag as typed rather than on a configuration key the user never wrote.
            try:
                load_reference("agents", value, Path.cwd())
            except PluginError as exc:
                raise ConfigError(f"--agent: {exc.message}") from None
        agents[name] = AgentConfig(use=use)
    return agents


def _flag_value(flag: str, key: str, value: float) -> float:
    """``value``, checked as the connectors' ``key`` is checked; a bad one is blamed on ``flag``.

    Checked later, with the connectors' other options, the error would name the
    configuration file and a key the user never wrote there.
    """
    from connic.transports.websocket import WebSocketTransport  # the agui transport checks these alike

    changes: dict[str, Any] = {key: value}
    try:
        attrs.evolve(WebSocketTransport.Options(), **changes)
    except ValueError as exc:
        raise ConfigError(f"{flag}: {exc}") from None
    return value


def _check_environment() -> None:
    """Refuse, in one line, an environment variable that would otherwise fail with a traceback."""
    directory = os.environ.get(MULTIPROC_ENV)
    if directory is not None and not os.path.isdir(directory):
        # connic.metrics refuses it too, but as a ValueError from deep inside create_app().
        raise ConfigError(
            f"{MULTIPROC_ENV}={directory!r}: the environment variable must name an existing directory "
            "(prometheus-client's multiprocess mode), or be unset"
        )


def _with_overrides(config: Config, args: argparse.Namespace) -> Config:
    server = config.server
    if args.log_format is not None:
        server = attrs.evolve(server, log_format=args.log_format)  # the workers read it from the configuration
    if args.host is not None:
        server = attrs.evolve(server, host=args.host)
    if args.port is not None:
        try:
            server = attrs.evolve(server, port=args.port)
        except ValueError as exc:
            raise ConfigError(f"--port: {exc}") from None
    agents = dict(config.agents)
    if args.agent:
        agents = _cli_agents(args.agent)
    overrides: dict[str, Any] = {}
    if args.secret:
        for secret in args.secret:
            try:
                secret.encode()
            except UnicodeEncodeError:  # argv bytes that are not UTF-8 (Python decodes them to surrogates)
                raise ConfigError("--secret: not valid UTF-8 text") from None
        overrides["secrets"] = list(args.secret)
    if args.no_auth:
        overrides["require_auth"] = False
    if args.no_streaming:
        overrides["streaming"] = False
    if args.session_timeout is not None:
        overrides["session_timeout"] = _flag_value("--session-timeout", "session_timeout", args.session_timeout)
    if args.max_messages is not None:
        overrides["max_messages"] = _flag_value("--max-messages", "max_messages", args.max_messages)
    connectors = tuple(
        attrs.evolve(
            c,
            agents=tuple(agents) if args.agent else c.agents,
            options={**c.options, **overrides},
        )
        for c in config.connectors
    )
    return attrs.evolve(config, server=server, agents=agents, connectors=connectors)


def _generate_secrets(config: Config) -> tuple[Config, str | None]:
    """Give every connector that needs a secret and has none a fresh random one."""
    if os.environ.get("CONNIC_SECRET"):
        return config, None
    # Under --reload the parent generated it: the same secret across restarts.
    generated = os.environ.get(SECRET_ENV) or secrets.token_urlsafe(18)
    used = False
    connectors = []
    for c in config.connectors:
        needs = c.transport == "websocket" and c.options.get("require_auth", True) and not c.options.get("secrets")
        if needs:
            used = True
            c = attrs.evolve(c, options={**c.options, "secrets": [generated]})
        connectors.append(c)
    if not used:
        return config, None
    return attrs.evolve(config, connectors=tuple(connectors)), generated


def _run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    if args.workers > MAX_WORKERS:
        # Bad usage, as argparse's own refusals (exit 2), and before anything is loaded.
        print(f"connic: error: --workers: at most {MAX_WORKERS}, got {args.workers}", file=sys.stderr)
        return 2
    level = args.log_level.upper()
    if level not in logging.getLevelNamesMapping():
        raise ConfigError(f"--log-level: unknown level {args.log_level!r} (DEBUG, INFO, WARNING, ERROR, CRITICAL)")
    _check_environment()
    config_file = args.config or os.environ.get("CONNIC_CONFIG") or None
    config = load_config(config_file) if config_file else default_config()
    configure_logging(level, args.log_format or config.server.log_format)
    # The child of --reload runs our arguments minus --reload; an abbreviation (--rel) stays in them.
    if args.reload and not os.environ.get(CHILD_ENV):
        return run_reloading(args, argv, config, config_file)
    host_key = "--host" if args.host is not None else f"{config.where}: server.host"
    config, generated = _generate_secrets(_with_overrides(config, args))
    if args.no_auth:
        print(
            "connic: warning: --no-auth: no secret is required, anyone who can reach this port can use the agents",
            file=sys.stderr,
        )
    if args.workers < 1:
        raise ConfigError(f"--workers: must be at least 1, got {args.workers}")
    if args.workers > 1:
        # Imported here: only --workers needs the supervisor.
        from connic.workers import Supervisor

        supervisor = Supervisor(config, args.workers, generated=generated, host_key=host_key)
        return supervisor.run(log_level=level, debug=args.debug)
    app = create_app(config)
    restartable = bool(os.environ.get(CHILD_ENV))
    coro = serve(app, config.server.host, config.server.port, host_key, generated=generated, restartable=restartable)
    asyncio.run(coro, debug=args.debug or None)
    return 0


def _plugins() -> int:
    rows = [("KIND", "NAME", "DISTRIBUTION", "VERSION", "DESCRIPTION")]
    for info in load_registry():
        try:
            description = info.description
        except ConnicError as exc:
            description = f"(failed to load: {exc.message})"
        rows.append((info.kind, info.name, info.distribution, info.version, description))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        print("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row[:4])) + "  " + row[4])
    return 0


def _check(args: argparse.Namespace) -> int:
    _check_environment()
    config = load_config(args.config)
    config, generated = _generate_secrets(config)
    runtime = build_runtime(config)
    install_routes(web.Application(), runtime, None)  # a route another's would hide is an error here too
    paths = ", ".join(t.connector.path for t in runtime.transports)
    print(f"{args.config}: ok ({len(runtime.agents)} agent(s); connectors at {paths})")
    if generated:
        print(
            "note: a connector requires auth but has no secret: `connic run` will generate one; "
            "create_app(), setup() and gunicorn will refuse it (set secrets or CONNIC_SECRET)"
        )
    return 0


def _new(args: argparse.Namespace) -> int:
    folder = Path(args.name)
    write_starter(folder)
    config = folder / "connic.toml"
    print(f"wrote {folder / 'agent.py'} and {config}")
    print(f"next: python -m connic run --config {shlex.quote(str(config))}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``connic`` command; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    try:
        if args.command == "run":
            return _run(args, argv)
        if args.command == "plugins":
            return _plugins()
        if args.command == "new":
            return _new(args)
        return _check(args)
    except (ConfigError, ConnicError) as exc:
        print(f"connic: error: {exc.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        # Ctrl+C before serve() took SIGINT over (an agent's SDK still importing): a quiet exit,
        # with the status a second Ctrl+C during the drain gives, not a traceback.
        return 128 + signal.SIGINT
    except OSError as exc:
        # The one bind error a user can fix from the command line: say how.
        hint = ""
        if exc.errno == errno.EADDRINUSE:
            hint = "; pick another with --port N, or --port 0 for any free port (the banner shows it)"
        print(f"connic: error: {exc.strerror or exc}{hint}", file=sys.stderr)
        return 1
