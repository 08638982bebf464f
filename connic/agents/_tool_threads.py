"""The threads sync function tools run in: a bounded set of daemon threads per agent.

Not ``asyncio.to_thread``: it uses the event loop's default executor (``min(32, cores + 4)``
workers), which aiohttp's DNS resolver (``loop.getaddrinfo``) and every other
``to_thread`` share. A few sync tools hung on a dead socket would take all of its workers,
so no provider host could be resolved any more, and ``asyncio.run`` waits for the default
executor's threads at exit, forever.

Not a ``ThreadPoolExecutor`` of our own either: ``concurrent.futures`` joins every one of
its threads at interpreter exit (``threading._register_atexit``), even after
``shutdown(wait=False, cancel_futures=True)``, so one hung tool would still keep
``connic run`` from exiting on SIGTERM. Instead, as connic/agents/_gemini_legacy.py does for
the legacy SDK's streams: one daemon thread per call, at most ``size`` at once. A call that is
cancelled (``tool_timeout``, ``cancel``, shutdown) is abandoned: Python cannot stop a thread,
so it keeps its slot until the function returns, and ends with the process at the latest.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import threading
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["DEFAULT_THREADS", "ToolThreads"]

log = logging.getLogger("connic.agents.tools")

DEFAULT_THREADS = 32
"""The default ``tool_threads``: sync tool calls of one agent running at once."""

T = TypeVar("T")


class ToolThreads:
    """Runs sync functions in daemon threads, at most ``size`` at once; :meth:`close` abandons the rest.

    ``agent`` names the agent in log lines. Usable once built; :meth:`open` starts a new
    lifetime after :meth:`close` (the agent started again, perhaps on another event loop).
    """

    def __init__(self, size: int = DEFAULT_THREADS, agent: str = "?") -> None:
        if size < 1:
            raise ValueError(f"size must be at least 1, got {size}")
        self.size = size
        self.agent = agent
        self._slots = asyncio.Semaphore(size)  # binds to an event loop only once a call waits
        self._running: set[object] = set()  # one token per thread still running its function
        self._closed = False
        self._warned = False

    @property
    def running(self) -> int:
        """How many threads are running a function now (abandoned calls included)."""
        return len(self._running)

    def open(self) -> None:
        """Start a lifetime: a fresh bound (threads abandoned before count no more), calls accepted."""
        self._slots = asyncio.Semaphore(self.size)
        self._running = set()
        self._closed = False
        self._warned = False

    def close(self) -> int:
        """Refuse new calls and abandon the running ones; returns (and logs) how many were abandoned.

        Nothing waits for them: their threads are daemons, they cannot keep the process alive.
        """
        self._closed = True
        abandoned = len(self._running)
        if abandoned:
            log.warning(
                "agent %s: %d sync tool call(s) still running abandoned (a thread cannot be stopped; "
                "it ends when its function returns or with the process)",
                self.agent,
                abandoned,
            )
        return abandoned

    async def run(self, function: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """``function(*args, **kwargs)`` in a thread of its own, with the caller's contextvars.

        Waits for a free slot first (all ``size`` busy: hung tools, or a burst). Cancelling
        the caller abandons the thread; its result or exception is dropped.
        """
        if self._closed:
            raise RuntimeError("the agent's tools are closed")
        slots, running = self._slots, self._running
        if slots.locked() and not self._warned:
            self._warned = True  # once each time they fill up, not once per waiting call
            log.warning("agent %s: all %d tool_threads are busy; sync tool calls wait for one", self.agent, self.size)
        await slots.acquire()
        if self._closed or slots is not self._slots:
            slots.release()
            raise RuntimeError("the agent's tools are closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        context = contextvars.copy_context()  # the turn's ids reach the tool's own log lines
        token = object()

        def finished(value: Any, failed: bool) -> None:  # on the event loop
            running.discard(token)
            slots.release()
            if slots is self._slots and not slots.locked():
                self._warned = False
            if not future.done():  # else the caller was cancelled: nobody wants it
                if failed:
                    future.set_exception(value)
                else:
                    future.set_result(value)

        def work() -> None:
            try:
                value: Any = context.run(function, *args, **kwargs)
                failed = False
            except BaseException as exc:  # given to the caller, as to_thread would
                value, failed = exc, True
            with contextlib.suppress(RuntimeError):  # the event loop is closed: nobody is waiting
                loop.call_soon_threadsafe(finished, value, failed)

        name = getattr(function, "__name__", "function")
        thread = threading.Thread(target=work, name=f"connic-tool-{self.agent}-{name}", daemon=True)
        running.add(token)
        try:
            thread.start()
        except BaseException:
            running.discard(token)
            slots.release()
            raise
        return await future
