"""When the parent of ``run --workers N`` starts a worker again, and when it gives up.

Bookkeeping only, no processes: :class:`connic.workers.Supervisor` tells a :class:`Restarts`
what became of each worker (it exited, it failed to start, it listens) and asks it what to do.
There are two rules, one per way a worker ends:

- One that served and exited is started again at once, but at most N times (N workers) within
  :data:`RESTART_WINDOW` seconds: more means a worker that cannot stay up, and the parent stops.
  A stop someone asked for (:func:`asked_to_stop`) is started again but not counted.
- One that could not start (its store or a service its agent needs down, or its process not
  made) is started again after a delay that doubles up to :data:`STORE_RETRY_MAX`, until every
  worker has failed :data:`GIVE_UP_STARTS` starts in a row: then the parent gives up.
"""

from __future__ import annotations

import signal
import time
from collections import deque

__all__ = ["GIVE_UP_STARTS", "RESTART_WINDOW", "STORE_RETRY_MAX", "Restarts", "asked_to_stop", "exit_status"]

RESTART_WINDOW = 10.0
"""Seconds over which worker restarts are counted: N workers may be restarted N times in it."""
STORE_RETRY_MAX = 10.0
"""At most this many seconds between two starts of a worker that could not start (once the server has).

Such a worker (the session store unreachable, an agent's start() failing: a service it needs
is down) is started again 1 s after it exits, then 2, 4, 8, then every 10 s, until it starts:
the configuration every worker started with is the same, so what fails now is not the worker's
fault, and giving up would take the other workers, which go on serving (refusing new sessions
with 503 while the store is down), down with it. A worker whose process cannot even be made
(``fork``/``exec`` failing: EAGAIN at a process limit, ENOMEM) is started again the same way.
"""
GIVE_UP_STARTS = 5
"""The parent gives up (exit 1) once every worker has failed this many starts in a row.

Then no worker serves, and none is about to: the parent staying up, serving nothing and
retrying every 10 s for ever, would hide the failure from a service manager (systemd's
``Restart=``, a Kubernetes probe), which can only act on a process that exits. Five starts
are some 15 s of retries (1 + 2 + 4 + 8 s between them), time for a store that restarts.
While any worker serves, one that cannot start is started again for ever.
"""


_STOPS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGHUP})


def asked_to_stop(code: int) -> bool:
    """Whether a worker's exit (its return code) was a stop someone asked for.

    Drained on a signal (status 0), or killed by one (SIGTERM, SIGINT, SIGHUP) before it could drain.

    Such exits (an operator or a script recycling workers one by one) are not a worker that
    cannot stay up: they do not count towards giving up.
    """
    return code == 0 or -code in _STOPS


def exit_status(code: int) -> str:
    """A worker's exit (its return code) as the parent says it: ``status 1``, ``signal 9 (SIGKILL)``, ``signal 40``."""
    if code >= 0:
        return f"status {code}"
    try:
        return f"signal {-code} ({signal.Signals(-code).name})"
    except ValueError:  # a real-time signal (SIGRTMIN+6): it kills by default, but has no name
        return f"signal {-code}"


class Restarts:
    """The restart and give-up rules for ``workers`` workers, numbered from 1."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._exits: deque[float] = deque()  # when each worker that had started exited
        self._start_failures: dict[int, int] = {}  # worker index: its starts in a row that failed

    def exited(self) -> None:
        """A worker that had started (not one that could not) exited: it counts towards the limit."""
        self._exits.append(time.monotonic())

    def may_restart(self) -> bool:
        """At most N restarts in RESTART_WINDOW seconds: a worker that cannot stay up stops the server."""
        now = time.monotonic()
        while self._exits and self._exits[0] < now - RESTART_WINDOW:
            self._exits.popleft()
        return len(self._exits) <= self.workers

    @property
    def recent_exits(self) -> int:
        """The exits :meth:`may_restart` last counted within RESTART_WINDOW."""
        return len(self._exits)

    def listening(self, index: int) -> None:
        """Worker ``index`` listens: its failed starts no longer count."""
        self._start_failures.pop(index, None)

    def start_failed(self, index: int) -> float | None:
        """Worker ``index`` failed one more start: seconds to wait before the next, or None to give up.

        None once every worker has failed its last :data:`GIVE_UP_STARTS` starts in a row.
        """
        failures = self._start_failures.get(index, 0) + 1
        self._start_failures[index] = failures
        if all(self._start_failures.get(i, 0) >= GIVE_UP_STARTS for i in range(1, self.workers + 1)):
            return None
        return min(STORE_RETRY_MAX, 2.0 ** (failures - 1))
