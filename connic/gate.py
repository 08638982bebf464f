"""Connection caps, checked at the handshake before any upgrade."""

from __future__ import annotations

from collections import Counter

__all__ = ["ConnectionGate", "default_unauthenticated_cap"]


def default_unauthenticated_cap(max_total: int) -> int:
    """``[server] max_unauthenticated`` when it is not set.

    A tenth of ``max_connections``, but at least 100 (a burst of clients
    reconnecting at once is not refused) and at most half (authenticated clients
    always keep the other half); 0 (no cap) when ``max_connections`` is 0, as then
    there is no authenticated capacity to take away.
    """
    if not max_total:
        return 0
    return max(1, min(max_total // 2, max(100, max_total // 10)))


class ConnectionGate:
    """Counts open connections in total, per client address, and those not yet authenticated.

    :meth:`enter` answers the HTTP status that refuses a handshake (503 over the
    server's cap or over the cap of unauthenticated connections, 429 over the
    per-address cap), or ``None`` and counts it in. A connection counts as
    unauthenticated from the upgrade until its transport calls
    :meth:`authenticated`; giving those their own, smaller cap keeps sockets that
    never authenticate from taking every slot of ``max_total`` (authenticated
    clients keep at least ``max_total - max_unauthenticated``). A cap of 0 means
    no cap; ``max_unauthenticated=None`` takes :func:`default_unauthenticated_cap`.
    """

    def __init__(self, max_total: int, max_per_ip: int, max_unauthenticated: int | None = None) -> None:
        self.max_total = max_total
        self.max_per_ip = max_per_ip
        self.max_unauthenticated = (
            default_unauthenticated_cap(max_total) if max_unauthenticated is None else max_unauthenticated
        )
        self.total = 0
        self.unauthenticated = 0
        self.per_ip: Counter[str] = Counter()

    def enter(self, ip: str, *, authenticated: bool = False) -> int | None:
        """Count a connection from ``ip`` in, or say which status refuses it.

        ``authenticated``: the handshake itself carried a valid secret (or the
        connector needs none), so the connection never counts as unauthenticated.
        """
        if self.max_total and self.total >= self.max_total:
            return 503
        if not authenticated and self.max_unauthenticated and self.unauthenticated >= self.max_unauthenticated:
            return 503
        if self.max_per_ip and self.per_ip[ip] >= self.max_per_ip:
            return 429
        self.total += 1
        self.per_ip[ip] += 1
        if not authenticated:
            self.unauthenticated += 1
        return None

    def authenticated(self) -> None:
        """One connection counted in as unauthenticated has authenticated."""
        self.unauthenticated -= 1

    def leave(self, ip: str, *, authenticated: bool = False) -> None:
        """Count a connection from ``ip`` out (``authenticated``: it is no longer counted as unauthenticated)."""
        self.total -= 1
        if not authenticated:
            self.unauthenticated -= 1
        self.per_ip[ip] -= 1
        if self.per_ip[ip] <= 0:
            del self.per_ip[ip]
