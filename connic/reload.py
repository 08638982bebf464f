"""``python -m connic run --reload``: restart the server when its source changes.

The parent process serves nothing: it watches files with ``watchfiles`` (the library
uvicorn uses) and runs the server as a child, ``python -m connic run`` with the same
arguments minus ``--reload``. On a change it sends the child SIGHUP, which the child
takes as "restart": it drains as on SIGTERM but closes connections with 1012 (service
restart), so clients know to come back. The parent waits for the drain (bounded), then
starts a new child. A child that cannot start (a syntax error in the agent file) prints
its one error line and exits; the parent says it waits for a change and tries again on
the next one.

SIGINT, SIGTERM and SIGHUP to the parent (a terminal closing, ``kill -HUP``) all stop it the
same way: it has the child drain as a plain ``run`` does (close 1001), waits, and exits 0.

What must not change between restarts is decided once, here: the generated secret
(handed down in an environment variable the child reads) and the port (``--port 0``
becomes one free port, picked here).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import logging
import os
import secrets
import signal
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

from connic.config import Config
from connic.errors import ConfigError
from connic.serving import stop_signals

__all__ = ["CHILD_ENV", "RESTART_WAIT", "SECRET_ENV", "Reloader", "run_reloading", "watched_folders"]

CHILD_ENV = "CONNIC_RELOAD_CHILD"
"""Set in the child's environment: SIGHUP then means "restart" (drain, close 1012), not the default."""
SECRET_ENV = "CONNIC_RELOAD_SECRET"
"""The secret the parent generated, for the child to use (and print) in place of a fresh one."""
RESTART_WAIT = 5.0
"""Seconds the parent waits for a child to drain on a change before it kills it: reloading is for
development, where a long reply is not worth waiting for."""
WATCHED_SUFFIXES = (".py", ".toml", ".html", ".jinja", ".jinja2", ".j2")
"""What a change to restarts for: Python, the configuration, templates."""


def watched_folders(config: str | None, agents: Sequence[str], cwd: Path) -> list[Path]:
    """The folders to watch: the configuration file's; else each ``--agent FILE.py:CLASS`` file's;
    else ``cwd``."""
    if config:
        return [(cwd / Path(config).expanduser()).resolve().parent]
    folders: list[Path] = []
    for value in agents:
        where, _, attr = value.rpartition(":")
        if attr and where.endswith(".py"):
            folder = (cwd / Path(where).expanduser()).resolve().parent
            if folder not in folders:
                folders.append(folder)
    return folders or [cwd.resolve()]


def _free_port(host: str, host_key: str) -> int:
    """A port free on ``host`` now, for every child to bind in turn (``--port 0``).

    A host that does not resolve, or is not this machine's, is a ConfigError naming
    ``host_key``, as the server itself words it: here it came first, as a bare
    "Name or service not known".
    """
    try:
        infos = socket.getaddrinfo(host or None, 0, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(f"{host_key}: cannot resolve {host!r}: {exc.strerror}") from None
    except ValueError as exc:  # UnicodeError from the idna codec; ValueError for a NUL
        raise ConfigError(f"{host_key}: {host!r} is not a valid host name ({exc})") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        try:
            sock.bind(address)
        except OSError as exc:
            why = (exc.strerror or str(exc)).lower()
            raise ConfigError(f"{host_key}: cannot listen on {host!r}: {why}") from None
        return int(sock.getsockname()[1])


def _status(code: int) -> str:
    if code < 0:
        return f"signal {-code} ({signal.Signals(-code).name})"
    return f"status {code}"


class Reloader:
    """The parent of ``connic run --reload``: watches ``folders`` and runs ``argv`` as the server."""

    def __init__(
        self, argv: Sequence[str], folders: Sequence[Path], *, host: str, port: int, host_key: str = "--host"
    ) -> None:
        # The child's arguments: ours without --reload; a later --port wins in argparse.
        self.argv = [a for a in argv if a != "--reload"]
        if port == 0:
            self.argv += ["--port", str(_free_port(host, host_key))]
        self.folders = list(folders)
        self.env = dict(os.environ)
        self.env[CHILD_ENV] = "1"
        self.env.setdefault(SECRET_ENV, secrets.token_urlsafe(18))
        self._child: asyncio.subprocess.Process | None = None
        self._reports: set[asyncio.Task[None]] = set()

    def _shown(self, path: str) -> str:
        """``path`` relative to the watched folder it is in, for the restart line."""
        for folder in self.folders:
            if Path(path).is_relative_to(folder):
                return str(Path(path).relative_to(folder))
        return path

    def run(self) -> int:
        """Serve until SIGINT/SIGTERM/SIGHUP; the exit status of ``connic run --reload``."""
        return asyncio.run(self._supervise())

    async def _supervise(self) -> int:
        # Imported here: a compiled wheel only ``--reload`` needs (the ``reload`` extra).
        from watchfiles import PythonFilter, awatch

        # Its "N changes detected" lines at INFO: ours already say what changed.
        logging.getLogger("watchfiles").setLevel(logging.WARNING)
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        # SIGHUP too, as for a plain `run` (unless ignored: nohup): a closed terminal must not end the
        # parent alone and leave its child (a process group of its own, so not hung up) serving on.
        signals = stop_signals()
        for sig in signals:
            loop.add_signal_handler(sig, stop.set)
        where = ", ".join(str(f) for f in self.folders)
        print(f"connic: reload: watching {where} for changes to {', '.join(WATCHED_SUFFIXES)}", flush=True)
        watch_filter = PythonFilter(extra_extensions=WATCHED_SUFFIXES[1:])
        await self._start()
        try:
            async for changes in awatch(*self.folders, watch_filter=watch_filter, stop_event=stop, step=50):
                names = sorted({self._shown(path) for _, path in changes})
                print(f"connic: reload: {', '.join(names)} changed; restarting", flush=True)
                await self._stop(signal.SIGHUP)
                await self._start()
        finally:
            # A second signal while the child drains reaches it too: it then stops at once.
            child = self._child
            for sig in signals:
                loop.add_signal_handler(sig, self._forward, child, sig)
            await self._stop(signal.SIGTERM)
        return 0

    @staticmethod
    def _forward(child: asyncio.subprocess.Process | None, sig: signal.Signals) -> None:
        # The child takes SIGHUP as "restart" (a drain again, not a stop at once): a second
        # SIGHUP reaches it as SIGTERM, which it does take as "stop now".
        if sig == signal.SIGHUP:
            sig = signal.SIGTERM
        if child is not None and child.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(sig)

    async def _start(self) -> None:
        # A process group of its own: a Ctrl+C in the terminal reaches the parent only, which
        # forwards one SIGTERM; two signals would make the child stop at once, without a drain.
        self._child = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "connic", *self.argv, env=self.env, process_group=0
        )
        report = asyncio.create_task(self._report(self._child))
        self._reports.add(report)
        report.add_done_callback(self._reports.discard)

    async def _report(self, child: asyncio.subprocess.Process) -> None:
        """A child that exits on its own (it failed to start): say so, and that we wait for a change."""
        code = await child.wait()
        if child is self._child:
            print(
                f"connic: reload: the server exited with {_status(code)}; waiting for a change to restart it",
                file=sys.stderr,
                flush=True,
            )

    async def _stop(self, sig: signal.Signals) -> None:
        """Have the child drain (SIGHUP: to restart, SIGTERM: to stop); kill it after RESTART_WAIT."""
        child, self._child = self._child, None
        if child is None or child.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            child.send_signal(sig)
        try:
            async with asyncio.timeout(RESTART_WAIT if sig == signal.SIGHUP else None):
                await child.wait()
        except TimeoutError:
            print(f"connic: reload: the server did not stop within {RESTART_WAIT:g} s; killing it", flush=True)
            with contextlib.suppress(ProcessLookupError):
                child.kill()
            await child.wait()


def run_reloading(args: argparse.Namespace, argv: Sequence[str], config: Config, config_file: str | None) -> int:
    """``run --reload`` (``argv``, parsed as ``args``): the watching parent; its exit status.

    It imports no agent: its children do, each afresh. ``config`` is the loaded configuration
    (for the host and port), ``config_file`` its path when there is one (the folder to watch).
    """
    if args.workers != 1:
        # As uvicorn: each worker would need a watcher of its own, and restarts would race.
        raise ConfigError(f"--reload cannot be combined with --workers {args.workers}: use one or the other")
    if importlib.util.find_spec("watchfiles") is None:
        raise ConfigError("--reload needs the watchfiles package: pip install 'connic[reload]'")
    host = args.host if args.host is not None else config.server.host
    host_key = "--host" if args.host is not None else f"{config.where}: server.host"
    port = args.port if args.port is not None else config.server.port
    folders = watched_folders(config_file, args.agent or (), Path.cwd())
    return Reloader(argv, folders, host=host, port=port, host_key=host_key).run()
