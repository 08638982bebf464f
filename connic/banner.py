"""The start-up banner: where connic listens, its connectors, the secret and the playground link."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Sequence

from connic import __version__
from connic.app import Runtime
from connic.playground import page_link

__all__ = ["print_banner"]


_WILDCARDS = {"0.0.0.0": socket.AF_INET, "::": socket.AF_INET6, "": socket.AF_UNSPEC}
_WILDCARD_WORDS = {socket.AF_INET: "all IPv4 interfaces", socket.AF_INET6: "all IPv6 interfaces"}


def _reachable_hosts(host: str) -> list[str]:
    """Where a browser can reach a server bound to ``host``: ``host`` itself, or for a wildcard
    (``0.0.0.0``, ``::``) loopback first, then this machine's other addresses.

    ``0.0.0.0`` in a URL works on some systems and not others, and is no use from another
    machine. The addresses come from the host name's own entries (``/etc/hosts``, the
    system's resolver), never from a request to the network; link-local IPv6 addresses
    are left out (a URL would need the interface's zone).
    """
    family = _WILDCARDS.get(host)
    if family is None:
        return [host]
    found = []
    if family in (socket.AF_INET, socket.AF_UNSPEC):
        found.append("127.0.0.1")
    if family in (socket.AF_INET6, socket.AF_UNSPEC) and socket.has_ipv6:
        found.append("::1")
    try:
        infos = socket.getaddrinfo(socket.gethostname(), None, family, socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        infos = []
    for info in infos:
        address = str(info[4][0])
        ip = ipaddress.ip_address(address.split("%", 1)[0])
        if not (ip.is_loopback or ip.is_link_local or ip.is_unspecified) and address not in found:
            found.append(address)
    return found


def print_banner(runtime: Runtime, host: str, port: int, generated: str | None, extra: Sequence[str] = ()) -> None:
    """The start-up banner on standard output (docs/cli.md), ending with ``Press Ctrl+C to stop.``.

    Every URL in it works in a browser: a wildcard ``host`` is shown as the addresses that
    reach it, and the playground's link carries the generated secret in its fragment.
    """
    hosts = [f"[{h}]" if ":" in h else h for h in _reachable_hosts(host)]
    wildcard = _WILDCARDS.get(host)
    where = f" ({_WILDCARD_WORDS.get(wildcard, 'all interfaces')})" if wildcard is not None else ""
    print(f"connic {__version__} listening on http://{hosts[0]}:{port}{where}", flush=True)
    for other in hosts[1:]:
        print(f"  also reachable at http://{other}:{port}", flush=True)
    base = f"ws://{hosts[0]}:{port}"
    for transport in runtime.transports:
        agents = ", ".join(transport.agents)
        print(f"  {transport.connector.transport}: {transport.describe(base)}  agents: {agents}", flush=True)
    if generated:
        print(f"  secret (generated, set CONNIC_SECRET or --secret to choose one): {generated}", flush=True)
    if runtime.config.server.playground:
        for shown in hosts:
            print(f"  playground: {page_link(runtime, f'http://{shown}:{port}/', generated)}", flush=True)
    for line in extra:
        print(f"  {line}", flush=True)
    print("Press Ctrl+C to stop.", flush=True)
