"""What the supervising parent of ``connic run --workers N`` does once, before any worker starts.

Kept apart from :mod:`connic.workers` (the supervisor): refuse a configuration that cannot
work with several processes (:func:`check_workers`), and reserve the port (:func:`reserve`):
bind every address the host names, on one port, with ``SO_REUSEPORT`` and without listening,
so that ``--port 0`` becomes one real port that every worker then binds, a port already served
is refused in one line before any worker starts, and nobody else takes the port while a
worker restarts.
"""

from __future__ import annotations

import socket
from typing import Any

from connic.app import Runtime
from connic.errors import ConfigError

__all__ = ["check_workers", "reserve"]


def check_workers(runtime: Runtime, workers: int) -> None:
    """Refuse, with one line (a :class:`ConfigError`), what cannot work with several worker processes.

    ``runtime`` is built from the configuration, as ``connic check`` does, and not started.
    """
    config = runtime.config
    if not hasattr(socket, "SO_REUSEPORT"):
        raise ConfigError(f"--workers {workers}: this platform has no SO_REUSEPORT; run one process per port instead")
    server = config.server
    if server.metrics and server.metrics_port:
        # Only one worker could bind the metrics port, and a scrape would see that one only.
        raise ConfigError(
            f"--workers {workers}: {config.where}: server.metrics_port is set; with several workers serve "
            "metrics on the main port (metrics_port = 0), where each scrape reads one worker"
        )
    if config.store.use != "memory":
        return
    for index, transport in enumerate(runtime.transports):
        window = getattr(transport.options, "resume_window", 0)
        if window:
            raise ConfigError(
                f"--workers {workers}: {config.where}: connectors[{index}].resume_window is {window:g}, but with "
                '[store] use = "memory" sessions live in one process, so a client resuming on another worker '
                "would lose its session; set resume_window = 0 on each connector, "
                "or use a [store] shared between processes"
            )


def reserve(host: str, port: int, host_key: str) -> list[socket.socket]:
    """Bind (without listening) every address ``host`` names, on one port, with SO_REUSEPORT.

    Port 0 becomes the port the kernel picks for the first address. A socket that
    is bound but not listening takes no connections; it only keeps the port from
    anyone who does not set SO_REUSEPORT as our own user.
    """
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(f"{host_key}: cannot resolve {host!r}: {exc.strerror}") from None
    except ValueError as exc:  # UnicodeError from the idna codec; ValueError for a NUL
        raise ConfigError(f"{host_key}: {host!r} is not a valid host name ({exc})") from None
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)  # as asyncio binds it
            if port == 0 and len(sockets) > 1:
                address = (address[0], sockets[0].getsockname()[1], *address[2:])
            try:
                if port != 0:
                    _probe(family, kind, proto, address)
                sock.bind(address)
            except OSError as exc:
                why = (exc.strerror or str(exc)).lower()  # worded as asyncio words it without --workers
                raise OSError(exc.errno, f"error while attempting to bind on address {address[:2]!r}: {why}") from None
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def _probe(family: int, kind: int, proto: int, address: tuple[Any, ...]) -> None:
    """Bind ``address`` as a server without ``--workers`` would (SO_REUSEADDR, no SO_REUSEPORT), then let it go.

    OSError (EADDRINUSE) when anything listens there. Our reserving socket alone would not
    find out: SO_REUSEPORT lets every process of the same user bind the port, so a second
    ``connic run --workers N`` on a port another one serves would start, and the kernel would
    split new connections between the two servers.
    """
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a TIME_WAIT left by a restart is no conflict
        if family == socket.AF_INET6:
            probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        probe.bind(address)
