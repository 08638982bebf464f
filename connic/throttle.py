"""A per-address brake on failed authentication: guessing a connector's secret stays slow.

After ``max_failures`` failed authentications from one address within ``window``
seconds (counted from its first failure), every handshake from that address is
refused (HTTP 429) until the window has passed; then it starts afresh.

Addresses are counted separately (IPv4 exactly; IPv6 by its /64, the block one
host or site usually holds, as anyone with one IPv6 address has 2^64 of them), so
one address's failures never refuse another. Memory is bounded: at most
``max_addresses`` addresses are remembered, the one that failed longest ago is
forgotten first, and an address whose window is over is forgotten when next seen.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections import OrderedDict
from collections.abc import Callable

__all__ = ["AuthThrottle", "address_key"]

log = logging.getLogger("connic.throttle")


def address_key(peer: str) -> str:
    """What the throttle counts by: the IPv4 address itself, an IPv6 address's /64."""
    if ":" not in peer:
        return peer
    try:
        address = ipaddress.IPv6Address(peer.split("%", 1)[0])
    except ValueError:
        return peer
    if address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(ipaddress.IPv6Network((address, 64), strict=False))


class AuthThrottle:
    """Failed authentications per address; ``max_failures`` 0 turns the brake off."""

    def __init__(
        self,
        max_failures: int,
        window: float,
        *,
        name: str = "",
        max_addresses: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_failures = max_failures
        self.window = window
        self.name = name  # for the log line (the connector's path)
        self.max_addresses = max_addresses
        self._clock = clock
        # address key -> [failures, start of its window]; oldest failure first
        self._failures: OrderedDict[str, list[float]] = OrderedDict()

    def __len__(self) -> int:
        """How many addresses are remembered."""
        return len(self._failures)

    def retry_after(self, peer: str) -> float | None:
        """``None`` when ``peer`` may try to authenticate now, else the seconds until it may."""
        if not self.max_failures or not self._failures:
            return None
        key = address_key(peer)
        entry = self._failures.get(key)
        if entry is None:
            return None
        left = entry[1] + self.window - self._clock()
        if left <= 0:
            del self._failures[key]  # the window is over: a clean slate
            return None
        return left if entry[0] >= self.max_failures else None

    def failed(self, peer: str) -> None:
        """Count one failed authentication of ``peer``."""
        if not self.max_failures:
            return
        key = address_key(peer)
        now = self._clock()
        entry = self._failures.pop(key, None)
        if entry is None or now >= entry[1] + self.window:
            entry = [0, now]
        entry[0] += 1
        self._failures[key] = entry  # now the most recent
        if len(self._failures) > self.max_addresses:
            self._failures.popitem(last=False)
        if entry[0] == self.max_failures:
            log.warning(
                "%d failed authentications from %s on %s within %g s: refusing its handshakes (429) for %.1f s",
                entry[0],
                key,
                self.name or "a connector",
                self.window,
                entry[1] + self.window - now,
            )
