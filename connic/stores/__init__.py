"""Session stores: where sessions and their replay logs live between connections.

A store plugin (entry point group ``connic.stores``, chosen by ``[store] use``)
keeps the sessions of every connector of one application, so that a client
whose connection dropped can resume its session (PROTOCOL.md §7). The interface
is asynchronous where a store in another process must go over the network
(finding a session) and synchronous where a remote store would batch the work
in the background (appending a frame, forgetting a session), so that streaming
a reply never waits for a round trip per chunk.

The built-in ``memory`` store (:mod:`connic.stores.memory`) keeps everything in
the process: sessions outlive their connections, not the process.
"""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from connic.session import ChatSession

__all__ = ["ReplayLog", "SessionStore"]


class ReplayLog(abc.ABC):
    """A session's sequenced frames, the newest ``capacity`` of them (PROTOCOL.md §7)."""

    @abc.abstractmethod
    def append(self, seq: int, data: str) -> None:
        """Log the encoded frame numbered ``seq`` (one more than the last); evict the oldest past capacity."""

    @abc.abstractmethod
    async def since(self, seq: int) -> list[str] | None:
        """Every logged frame numbered above ``seq``, oldest first; None if one of them was evicted."""

    @abc.abstractmethod
    def stats(self) -> tuple[int, int]:
        """How many frames the log holds, and their encoded size in bytes."""


class SessionStore:
    """Base class of session store plugins (entry point group ``connic.stores``).

    Subclasses implement every method below but :meth:`start` and :meth:`close`.
    Like agents, a store may declare an attrs ``Options`` class, structured
    from the ``[store]`` table (less its ``use`` key) into ``self.options``.
    """

    Options: ClassVar[type[Any] | None] = None

    def __init__(self, options: Any = None) -> None:
        self.options = options

    async def start(self) -> None:
        """Connect to the backing service when the server starts."""

    async def close(self) -> None:
        """Release what :meth:`start` acquired when the server stops."""

    async def add(self, session: ChatSession) -> None:
        """Keep a new session."""
        raise NotImplementedError

    async def get(self, session_id: str) -> ChatSession | None:
        """The live session with this id, or None if it is unknown or has ended."""
        raise NotImplementedError

    def discard(self, session_id: str) -> None:
        """Forget a session that has ended for good (a no-op if it is unknown)."""
        raise NotImplementedError

    def replay_log(self, session_id: str, capacity: int) -> ReplayLog:
        """A new, empty replay log for a session, keeping at most ``capacity`` frames."""
        raise NotImplementedError

    def __len__(self) -> int:
        """How many sessions the store keeps (attached or detached)."""
        raise NotImplementedError
