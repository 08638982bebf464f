"""One worker process as its supervising parent sees it: its handle, and what the parent hears from it.

:mod:`connic.workers` (the supervisor) decides what to do when a worker starts, listens, stops
sending heartbeats or exits; this module holds what it knows of each worker (:class:`WorkerHandle`)
and reads the worker's link: the steps of its start-up, bounded by ``server.start_timeout``
(:func:`hear_start`), then its heartbeats, bounded by ``server.worker_timeout``
(:func:`hear_heartbeats`). The link's protocol itself is :mod:`connic.worker`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket

import attrs

from connic.serving import say
from connic.worker import STARTING, next_line

__all__ = ["WorkerHandle", "because", "end_group", "exited", "hear_heartbeats", "hear_start", "os_error", "stuck"]


@attrs.define
class WorkerHandle:
    """A worker process of ``run --workers N``, as its parent knows it."""

    index: int
    process: asyncio.subprocess.Process
    link: socket.socket
    ready: bool = False
    why: str = ""  # what it said it failed on (connic.worker.FAILED), if it could not start
    doing: str = ""  # the step of its start-up it said it began last (connic.worker.STARTING)
    timed_out: bool = False  # it did not listen within server.start_timeout, and was killed
    watch: asyncio.Task[None] | None = None


def os_error(exc: OSError) -> str:
    """An OSError as one line: ``[Errno 11] Resource temporarily unavailable``."""
    return f"[Errno {exc.errno}] {exc.strerror}" if exc.errno and exc.strerror else str(exc) or type(exc).__name__


def because(why: str) -> str:
    """`` (WHY)``, what a worker said it failed on, or nothing if it said nothing."""
    return f" ({why})" if why else ""


def exited(worker: WorkerHandle) -> bool:
    """``worker`` exited, and its watch has read all it said (why it failed, if it did)."""
    return worker.watch is not None and worker.watch.done() and worker.process.returncode is not None


def end_group(worker: WorkerHandle, sig: signal.Signals) -> None:
    """Send ``sig`` to ``worker``'s process group: itself and what its agents started, which would outlive it.

    Also once it exited: its number is not reused while anything is left in its group.
    """
    with contextlib.suppress(ProcessLookupError, PermissionError):  # nothing left in it
        os.killpg(worker.process.pid, sig)


def stuck(worker: WorkerHandle, start_timeout: float) -> str:
    """What a worker that did not listen in time was doing: ``worker 1 (pid 42) did not start within ...``."""
    doing = f"stuck in {worker.doing}" if worker.doing else "it said nothing of its start-up"
    return (
        f"worker {worker.index} (pid {worker.process.pid}) did not start within "
        f"{start_timeout:g} s (server.start_timeout): {doing}"
    )


async def hear_start(worker: WorkerHandle, said: bytearray, gone: asyncio.Future[int], start_timeout: float) -> bytes:
    """The line that ends ``worker``'s start-up: READY, FAILED and why, or empty (it exited, or was killed).

    The :data:`~connic.worker.STARTING` lines before it set ``worker.doing``. Bounded: a worker
    stuck in an agent's start() would otherwise keep the parent waiting, the port unserved, for
    ever (gunicorn's --timeout likewise kills it). Past ``start_timeout`` it is killed, and
    ``worker.timed_out`` set.
    """
    try:
        async with asyncio.timeout(start_timeout):
            line = await next_line(worker.link, said, gone)
            while line.startswith(STARTING):
                worker.doing = line[len(STARTING) :].decode("utf-8", "replace").strip()
                line = await next_line(worker.link, said, gone)
    except TimeoutError:
        worker.timed_out = True
        end_group(worker, signal.SIGKILL)  # it serves nothing yet; blocked, it could not drain
        return b""
    return line


async def hear_heartbeats(worker: WorkerHandle, said: bytearray, gone: asyncio.Future[int], limit: float) -> None:
    """Until ``worker`` exits: kill it once it sends no heartbeat (:data:`~connic.worker.ALIVE`) for ``limit`` s.

    ``limit`` 0 listens for nothing (``server.worker_timeout = 0``: no heartbeat is checked).
    """
    while limit:
        try:
            async with asyncio.timeout(limit):
                if not await next_line(worker.link, said, gone):
                    return  # it exited
        except TimeoutError:
            say(
                f"connic: worker {worker.index} (pid {worker.process.pid}) sent no heartbeat for {limit:g} s "
                "(server.worker_timeout): its event loop is blocked, killing it"
            )
            end_group(worker, signal.SIGKILL)  # its connections are stalled already; it cannot drain
            return
