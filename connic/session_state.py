"""Where a session is in its life (its own module: the session's parts all read it)."""

from __future__ import annotations

import enum

__all__ = ["SessionState"]


class SessionState(enum.Enum):
    """Where a session is in its life."""

    ATTACHED = "attached"  # a connection receives its frames
    DETACHED = "detached"  # its connection ended; resumable until the window runs out
    ENDED = "ended"  # for good: never resumed again
