"""Connection caps, checked at the handshake before any upgrade."""

from __future__ import annotations

from collections import Counter

__all__ = ["ConnectionGate"]


class ConnectionGate:
    """Counts open connections in total and per client address.

    :meth:`enter` answers the HTTP status that refuses a handshake (503 over the
    server's cap, 429 over the per-address cap), or ``None`` and counts it in.
    A cap of 0 means no cap.
    """

    def __init__(self, max_total: int, max_per_ip: int) -> None:
        self.max_total = max_total
        self.max_per_ip = max_per_ip
        self.total = 0
        self.per_ip: Counter[str] = Counter()

    def enter(self, ip: str) -> int | None:
        """Count a connection from ``ip`` in, or say which status refuses it."""
        if self.max_total and self.total >= self.max_total:
            return 503
        if self.max_per_ip and self.per_ip[ip] >= self.max_per_ip:
            return 429
        self.total += 1
        self.per_ip[ip] += 1
        return None

    def leave(self, ip: str) -> None:
        """Count a connection from ``ip`` out."""
        self.total -= 1
        self.per_ip[ip] -= 1
        if self.per_ip[ip] <= 0:
            del self.per_ip[ip]
