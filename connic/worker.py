"""One worker process of ``connic run --workers N``, and the link to its supervising parent.

Kept apart from :mod:`connic.workers`, the parent that starts, restarts and drains
the workers, because this is the other end: what runs in the worker process (started
as ``python -m connic.workers``, whose ``__main__`` calls :func:`worker_main`), and
the format of the link, which both ends use. The worker's standard input is one end
of a socket pair (the worker moves it to a descriptor that the processes it starts do not
inherit, and puts ``/dev/null`` in its place): the parent writes the :class:`WorkerSpec`
into it (:func:`pack_spec`: a 4-byte length, then the pickle; it is the parent's own
configuration, generated secret included, so every worker accepts the same secret),
the worker says what it starts (:data:`STARTING`), then answers :data:`READY` once it
listens (or :data:`FAILED` and why, if it could not start), the parent writes :data:`STOP` to
have it drain, and end-of-file tells the worker that its parent is gone, so it drains
instead of serving on as an orphan.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pickle
import select
import signal
import socket
import struct
import subprocess
import sys
import threading

import attrs

from connic.app import STARTING as STARTING_KEY
from connic.app import create_app
from connic.config import Config
from connic.errors import ConnicError, StoreUnavailable
from connic.logs import configure_logging
from connic.serving import say, serve, write_line

__all__ = [
    "ALIVE",
    "FAILED",
    "READY",
    "STOP",
    "STORE_UNAVAILABLE",
    "STARTING",
    "WorkerSpec",
    "error_line",
    "next_line",
    "pack_spec",
    "worker_command",
    "worker_main",
]

READY = b"ready\n"
"""What a worker writes to its parent once it listens."""
ALIVE = b"alive\n"
"""What a listening worker writes to its parent every few seconds, from its event loop, until it exits.

The parent kills a worker that writes nothing for ``server.worker_timeout`` seconds: its event
loop is blocked (an agent calling ``time.sleep`` or waiting on a lock), every connection it holds
is stalled, and the kernel still gives it its share of the new ones.
"""
FAILED = b"failed "
"""What a worker that could not start writes to its parent instead of :data:`READY`, then its error and a newline.

So that the parent, giving up on workers that keep failing to start, names the cause in its
own error line (the worker's line, above it on standard error, may be far up by then).
"""
STARTING = b"starting "
"""What a worker writes to its parent as its start-up begins a step, then the step and a newline.

So that the parent, stopping a worker that did not listen within ``server.start_timeout``,
names what it was stuck in (an agent's ``start()``): a worker blocked there cannot say so itself.
"""
STOP = b"stop\n"
"""What the parent writes to a worker to have it drain and exit.

Not a SIGTERM: a service manager that signals every process of the service at once (systemd's
default ``KillMode=control-group``, ``pkill``) has already sent each worker one, and a second
signal makes a worker stop at once, without draining.
"""
STORE_UNAVAILABLE = 3
"""A worker's exit status when the session store cannot be reached as it starts.

The parent tells this apart from a broken worker: once the server has started, such a worker
is started again, later and later, until the store answers, and never counts towards giving up.
"""


@attrs.frozen
class WorkerSpec:
    """What the parent hands a worker: everything ``connic run`` decided before serving."""

    config: Config
    index: int
    host: str
    port: int
    host_key: str
    log_level: str
    debug: bool
    pythonpath: str | None = None  # the parent's PYTHONPATH, which worker_command() replaced


def worker_command() -> tuple[list[str], dict[str, str]]:
    """The command and environment that start a worker: the parent's interpreter, flags and module path.

    A worker runs as the parent does, not as a fresh ``python -m``: with its flags (``-O``,
    ``-W error``, ``-X dev``, ``-I``), and importing from its ``sys.path``, in its order (given
    as ``PYTHONPATH``, with ``-P`` so that the current directory does not come first). Started
    by the ``connic`` script, the parent has no current directory on ``sys.path``: a worker
    importing a module there instead of the one the parent checked the configuration with
    served another agent. The worker puts the parent's own ``PYTHONPATH`` back as it starts.
    """
    flags: list[str] = subprocess._args_from_interpreter_flags()  # type: ignore[attr-defined]  # multiprocessing's
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(entry or os.getcwd() for entry in sys.path)
    return [sys.executable, *flags, "-P", "-m", "connic.workers"], env


def pack_spec(spec: WorkerSpec) -> bytes:
    """``spec`` as the parent writes it to the worker's link: its length (4 bytes, big-endian), then its pickle."""
    data = pickle.dumps(spec)
    return struct.pack("!I", len(data)) + data


def _read_spec(link: socket.socket) -> WorkerSpec:
    def exactly(n: int) -> bytes:
        data = b""
        while len(data) < n:
            more = link.recv(n - len(data))
            if not more:
                raise EOFError("the parent closed the link before sending the configuration")
            data += more
        return data

    (size,) = struct.unpack("!I", exactly(4))
    spec = pickle.loads(exactly(size))  # from our own parent, over a private socket pair
    if not isinstance(spec, WorkerSpec):
        raise TypeError(f"expected a WorkerSpec, got {type(spec).__name__}")
    return spec


async def next_line(link: socket.socket, said: bytearray, exited: asyncio.Future[int]) -> bytes:
    """The next line a worker says on its (non-blocking) link, read by its parent; empty once it says no more.

    :data:`STARTING` lines, then READY, or FAILED and why. ``said`` keeps what was read past the
    line for the next call. Its exit (``exited``) ends the wait as the link's end-of-file does,
    whichever the parent sees first; a last line without its newline is returned as it is.
    """
    loop = asyncio.get_running_loop()
    ended = False

    def pull() -> bool:
        # Read at once into `said` (no task to cancel, which could drop a read in flight).
        nonlocal ended
        try:
            more = link.recv(4096)
        except BlockingIOError:
            return False
        except OSError:
            more = b""
        ended = ended or not more
        said.extend(more)
        return bool(more)

    def readable(heard: asyncio.Future[None]) -> None:
        pull()
        if (ended or b"\n" in said or len(said) >= 4096) and not heard.done():
            heard.set_result(None)

    while b"\n" not in said and not ended and len(said) < 4096:
        heard: asyncio.Future[None] = loop.create_future()  # done once there is a whole line, or the link ended
        loop.add_reader(link, readable, heard)
        try:
            await asyncio.wait((heard, exited), return_when=asyncio.FIRST_COMPLETED)
        finally:
            loop.remove_reader(link)
        if not heard.done():  # it exited: what it said is in the link already
            while pull():
                pass
            break
    end = said.find(b"\n") + 1 or len(said)
    line = bytes(said[:end])
    del said[:end]
    return line


def error_line(text: str) -> None:
    """``connic: error: TEXT`` on standard error, in one write.

    The parent and every worker share standard error, and print() writes the newline
    apart: two workers failing together made one line of two errors.
    """
    write_line("stderr", f"connic: error: {text}")


def worker_main() -> int:
    """One worker (``python -m connic.workers``, standard input linked to the parent)."""
    try:
        # Off standard input (os.dup: not inherited), which becomes /dev/null: every process an
        # agent starts inherits fd 0, and on the link (a non-blocking socket) its read failed with
        # EAGAIN instead of reading end-of-file, or took the parent's STOP from this worker.
        link = socket.socket(fileno=os.dup(0))
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        spec = _read_spec(link)
    except (OSError, EOFError, pickle.UnpicklingError, TypeError):
        error_line("python -m connic.workers is a worker of `connic run --workers N`, not run by hand")
        return 2
    if spec.pythonpath is None:
        os.environ.pop("PYTHONPATH", None)  # what the processes its agents start inherit
    else:
        os.environ["PYTHONPATH"] = spec.pythonpath
    name = f"connic: worker {spec.index} (pid {os.getpid()})"
    configure_logging(
        spec.log_level,
        spec.config.server.log_format,
        text_format=f"%(asctime)s %(levelname)s %(name)s [worker {spec.index} pid %(process)d]: %(message)s",
        worker=spec.index,
        pid=os.getpid(),
    )

    listened = threading.Event()
    beating: list[asyncio.Task[None]] = []  # the heartbeat, kept alive past listening()
    threading.Thread(target=_orphaned, args=(link, listened, name), daemon=True).start()

    async def listening(stop: asyncio.Event) -> None:
        listened.set()  # from now on the link's end-of-file has it drain, below
        loop = asyncio.get_running_loop()
        link.setblocking(False)
        # The parent writes only STOP; end-of-file (or an error) means it is gone. So does a
        # failing READY (EPIPE: it died while this worker started): else the worker served on,
        # unsupervised, for ever.
        try:
            await loop.sock_sendall(link, READY)
            if limit := spec.config.server.worker_timeout:  # a few beats within the parent's bound
                beating.append(asyncio.create_task(_heartbeat(link, min(5.0, limit / 4))))
            if await loop.sock_recv(link, len(STOP)):
                stop.set()  # serve() says "shutting down" and drains
                return
        except OSError:
            pass
        if not stop.is_set():
            say(f"{name}: the supervising parent is gone")
            stop.set()

    def starting(what: str) -> None:
        with contextlib.suppress(OSError):  # the parent is gone: listening() finds out
            link.sendall(STARTING + what.encode("utf-8", "replace") + b"\n")

    try:
        starting("create_app() (importing the plugins, making the agents)")
        app = create_app(spec.config)
        app[STARTING_KEY] = starting
        coro = serve(app, spec.host, spec.port, spec.host_key, reuse_port=True, listening=listening, name=name)
        asyncio.run(coro, debug=spec.debug or None)
    except StoreUnavailable as exc:
        _failed(link, exc.why)
        return STORE_UNAVAILABLE
    except ConnicError as exc:  # a ConfigError, or an agent's start failing (PluginError ...)
        _failed(link, exc.message)
        return 1
    except OSError as exc:
        _failed(link, str(exc.strerror or exc))
        return 1
    return 0


async def _heartbeat(link: socket.socket, interval: float) -> None:
    """:data:`ALIVE` to the parent every ``interval`` seconds, until this worker exits or the link ends.

    A task of its own, not part of listening(): it goes on through the drain and the agents'
    close(), which the parent's bound covers as well.
    """
    loop = asyncio.get_running_loop()
    with contextlib.suppress(OSError):
        while True:
            await asyncio.sleep(interval)
            await loop.sock_sendall(link, ALIVE)


def _orphaned(link: socket.socket, listened: threading.Event, name: str) -> None:
    """In a thread: kill this worker's process group if its parent is gone before it listens.

    Until then nothing reads the link, and a worker stuck in an agent's start() (awaiting, or
    blocking its event loop) stayed for ever once its parent was killed, an orphan holding
    whatever its agent had opened. It serves nothing yet, so there is nothing to drain.
    """
    poller = select.poll()
    poller.register(link, 0)  # end-of-file only (POLLHUP): the parent's STOP stays for listening()
    while not poller.poll():
        pass
    if not listened.is_set():
        say(f"{name}: the supervising parent is gone before this worker listened; stopping at once")
        os.killpg(os.getpgrp(), signal.SIGKILL)


def _failed(link: socket.socket, text: str) -> None:
    """Say why this worker stops: its error line, and :data:`FAILED` with the text to the parent (if it listens)."""
    error_line(text)
    line = FAILED + " ".join(text.split()).encode("utf-8", "replace") + b"\n"
    with contextlib.suppress(OSError):  # the parent is gone, or read READY already and no longer reads
        link.settimeout(1.0)
        link.sendall(line)
