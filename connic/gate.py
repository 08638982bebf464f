"""Connection caps, checked at the handshake before any upgrade."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

__all__ = ["ConnectionGate", "Slot", "default_unauthenticated_cap"]


def default_unauthenticated_cap(max_total: int) -> int:
    """``[server] max_unauthenticated`` when it is not set.

    A tenth of ``max_connections``, but at least 100 (a burst of clients
    reconnecting at once is not held up) and at most half (authenticated clients
    always keep the other half); 0 (no cap) when ``max_connections`` is 0, as then
    there is no authenticated capacity to take away.
    """
    if not max_total:
        return 0
    return max(1, min(max_total // 2, max(100, max_total // 10)))


class Slot:
    """One admitted connection: its address, and whether it still counts as unauthenticated."""

    __slots__ = ("evict", "ip", "unauthenticated")

    def __init__(self, ip: str, unauthenticated: bool, evict: Callable[[], None] | None) -> None:
        self.ip = ip
        self.unauthenticated = unauthenticated
        self.evict = evict


class ConnectionGate:
    """Counts open connections in total, per client address, and those not yet authenticated.

    :meth:`enter` answers a :class:`Slot`, or the HTTP status that refuses the
    handshake (503 over the server's cap, 429 over the per-address cap).

    A connection counts as unauthenticated from the upgrade until
    :meth:`authenticated`. Those have a smaller cap of their own, so sockets that
    never authenticate cannot take every slot of ``max_total``: authenticated
    clients keep at least ``max_total - max_unauthenticated``. When that cap is
    full, a new handshake that still has to authenticate pushes out the oldest
    unauthenticated connection (its ``evict`` callback drops it): clients
    authenticate within a round trip, so the oldest is the one most surely
    squatting, and a real client is let in even while sockets keep coming to
    fill the cap. Without an ``evict`` callback to call, the handshake gets 503.
    A cap of 0 means no cap; ``max_unauthenticated=None`` takes
    :func:`default_unauthenticated_cap`.
    """

    def __init__(self, max_total: int, max_per_ip: int, max_unauthenticated: int | None = None) -> None:
        self.max_total = max_total
        self.max_per_ip = max_per_ip
        self.max_unauthenticated = (
            default_unauthenticated_cap(max_total) if max_unauthenticated is None else max_unauthenticated
        )
        self.total = 0
        self.unauthenticated = 0
        self.evicted = 0  # unauthenticated connections pushed out so far
        self.per_ip: Counter[str] = Counter()
        self._waiting: dict[Slot, None] = {}  # unauthenticated slots, oldest first

    def enter(self, ip: str, *, authenticated: bool = False, evict: Callable[[], None] | None = None) -> Slot | int:
        """Count a connection from ``ip`` in, or say which status refuses it.

        ``authenticated``: the handshake itself carried a valid secret (or the
        connector needs none), so the connection never counts as unauthenticated.
        ``evict`` drops the connection if it has to make room while unauthenticated.
        """
        if self.max_total and self.total >= self.max_total:
            return 503
        if self.max_per_ip and self.per_ip[ip] >= self.max_per_ip:
            return 429
        if not authenticated and self.max_unauthenticated and self.unauthenticated >= self.max_unauthenticated:
            oldest = next(iter(self._waiting), None)
            push_out = oldest.evict if oldest is not None else None
            if oldest is None or push_out is None:
                return 503
            self._settle(oldest)  # its slot is the newcomer's now; it still counts in total until it leaves
            self.evicted += 1
            push_out()
        slot = Slot(ip, not authenticated, evict)
        self.total += 1
        self.per_ip[ip] += 1
        if not authenticated:
            self.unauthenticated += 1
            self._waiting[slot] = None
        return slot

    def authenticated(self, slot: Slot) -> None:
        """The connection of ``slot`` has authenticated."""
        if slot.unauthenticated:
            self._settle(slot)

    def leave(self, slot: Slot) -> None:
        """Count the connection of ``slot`` out."""
        if slot.unauthenticated:
            self._settle(slot)
        self.total -= 1
        self.per_ip[slot.ip] -= 1
        if self.per_ip[slot.ip] <= 0:
            del self.per_ip[slot.ip]

    def _settle(self, slot: Slot) -> None:
        slot.unauthenticated = False
        slot.evict = None  # never evicted now: the callback need not live as long as the connection
        self.unauthenticated -= 1
        del self._waiting[slot]
