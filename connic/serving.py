"""Serving one application on its port until SIGINT/SIGTERM/SIGHUP, then draining it.

Kept apart from :mod:`connic.cli`, which parses the command line and makes the
configuration, because three callers serve alike: ``connic run``, each worker of
``connic run --workers N`` (:mod:`connic.workers`: it binds with ``SO_REUSEPORT``
and tells its parent it listens instead of printing the banner), and the
benchmarks' servers. Here are the served process's settings (signal handlers, the
garbage collector's thresholds, asyncio's slow-callback hint with ``--debug``) and
its two ways out: a drain on the first signal, an immediate exit on the second.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from aiohttp import web

from connic.app import RUNTIME, drain
from connic.banner import print_banner
from connic.errors import ConfigError

__all__ = ["GC_YOUNG_THRESHOLD", "SLOW_CALLBACK", "Listening", "say", "serve", "stop_signals", "write_line"]

SLOW_CALLBACK = 0.1
"""With ``--debug``: seconds a callback may hold the event loop before asyncio logs it."""
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
"""The signals that drain the server (SIGHUP as well: a closed terminal, or a service manager's
``reload``, must not cut replies in flight off); the child of ``--reload`` takes SIGHUP as "restart"."""


def stop_signals() -> tuple[signal.Signals, ...]:
    """The signals that stop the server: SIGINT, SIGTERM and SIGHUP, but SIGHUP not while it is ignored.

    ``nohup connic run &`` ignores SIGHUP so that the server outlives the terminal it was
    started from: taking SIGHUP over regardless, to drain on it, shut it down with that
    terminal. Checked before the handlers are installed (they replace what it reads).
    """
    return tuple(s for s in _STOP_SIGNALS if s != signal.SIGHUP or signal.getsignal(s) is not signal.SIG_IGN)


GC_YOUNG_THRESHOLD = 10_000
"""The collector's first threshold in a served process (CPython's default: 700 allocations).

Under S7's load (1,000 sessions, a turn in flight in each) the young collections that
CPython's default triggers were some 40 µs of every turn, 6-10% of the server's CPU, for
no cyclic garbage collected; at 10,000 they were some 5 µs (docs/performance.md). The
older generations keep their thresholds.
"""


async def _resolve(host: str, port: int, key: str) -> None:
    """Fail with one line naming ``key`` if ``host`` does not resolve, before anything starts.

    Without this, an unknown name surfaces as asyncio's bare ``Name or service not
    known`` (a gaierror), and a malformed one (an empty label, a label over 63
    characters) as a traceback from the idna codec.
    """
    if not host:
        return  # asyncio binds every interface for "", without a lookup
    try:
        await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(f"{key}: cannot resolve {host!r}: {exc.strerror}") from None
    except ValueError as exc:  # UnicodeError from the idna codec; ValueError for a NUL
        raise ConfigError(f"{key}: {host!r} is not a valid host name ({exc})") from None


def say(text: str) -> None:
    """``text`` as one line on standard output, in one write.

    A served process may share its standard output with others (the parent and the workers of
    ``--workers``, the watcher of ``--reload``). Run unbuffered (``PYTHONUNBUFFERED=1``, usual in
    containers), print() writes the text and its newline apart, and two workers saying
    "shutting down" at once made one line of two and an empty one.
    """
    write_line("stdout", text)


def write_line(stream: str, text: str) -> None:
    """``text`` and a newline in one write to ``sys.stdout`` or ``sys.stderr`` (``stream``), or nowhere.

    A line that cannot be written is dropped: a server does not stop serving because its output
    went away (``connic run | log-shipper``, and the shipper died: EPIPE). A pipe without a reader
    never gets one again, so ``/dev/null`` takes its place: the next lines, and the flush at exit,
    would fail the same way, and what is buffered goes there.
    """
    out = getattr(sys, stream)
    try:
        out.write(f"{text}\n")
        out.flush()
    except BrokenPipeError:
        with contextlib.suppress(OSError, ValueError):
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, out.fileno())
            os.close(null)
    except ValueError:  # closed (an agent called sys.stdout.close()): its descriptor may be another file's now
        setattr(sys, stream, open(os.devnull, "w", encoding="utf-8"))  # noqa: SIM115  (for the process's life)
    except OSError:
        pass  # another error (a full disk, a closed descriptor): this line only


def _stop_at_once(signum: int) -> None:
    """A second SIGINT/SIGTERM/SIGHUP: give up the drain and exit now, with 128 + the signal number.

    uvicorn's convention. Nothing is awaited any more, on purpose: whatever made the
    drain slow (a long reply, an agent's close()) would make a polite exit slow too.
    os._exit skips asyncio.run's cancel-and-wait of every task for the same reason.
    """
    say(f"connic: {signal.Signals(signum).name} again, stopping at once")
    logging.shutdown()
    sys.stderr.flush()
    os._exit(128 + signum)


Listening = Callable[[asyncio.Event], Coroutine[Any, Any, None]]
"""What a worker does once it listens, instead of printing the banner: it may set the stop event."""


async def serve(
    app: web.Application,
    host: str,
    port: int,
    host_key: str,
    *,
    generated: str | None = None,
    reuse_port: bool = False,
    listening: Listening | None = None,
    name: str = "connic",
    restartable: bool = False,
) -> None:
    """Serve ``app`` until SIGINT/SIGTERM/SIGHUP (or ``listening`` sets the stop event), then drain.

    Alone, this prints the banner; as one of ``--workers`` (``reuse_port``) it calls
    ``listening`` instead, and the supervising parent prints the banner once.
    ``name`` starts the shutdown line; with ``reuse_port`` the site stops listening as the drain
    begins, leaving new connections to the other listeners of the port. SIGHUP drains as SIGTERM
    does, but with ``restartable`` (the child of ``--reload``), where it means "restart":
    connections close 1012 (service restart) instead of 1001, since the server is back in a moment.
    """
    runtime = app[RUNTIME]
    grace = runtime.config.server.shutdown_grace
    # Signals are ours before anything starts: until then asyncio.run's own SIGINT handler
    # would cancel this task, and a Ctrl+C that lands while the site starts could be lost.
    # A signal during start-up now lets the start finish, then shuts down at once.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    if loop.get_debug():
        loop.slow_callback_duration = SLOW_CALLBACK
        logging.getLogger("asyncio").addFilter(_SlowCallbackHint())
    signals = 0

    def on_signal(signum: int) -> None:
        # The second SIGINT/SIGTERM/SIGHUP stops at once (the drain, the agents' close() included). Counted,
        # rather than "any signal once stopping": when the stop came otherwise (SIGHUP, a worker's
        # parent), a service manager that signals every process at once must not cut the drain short.
        nonlocal signals
        signals += 1
        if signals > 1:
            _stop_at_once(signum)
        stop.set()

    for sig in stop_signals():
        if not (restartable and sig == signal.SIGHUP):
            loop.add_signal_handler(sig, on_signal, sig)
    restarting = False
    if restartable:

        def restart() -> None:
            nonlocal restarting
            restarting = True
            stop.set()

        loop.add_signal_handler(signal.SIGHUP, restart)
    await _resolve(host, port, host_key)
    # keepalive_timeout also bounds how long a new TCP connection may take to send its
    # request: without it a silent connection would hold a socket for aiohttp's hour.
    runner = web.AppRunner(
        app,
        handle_signals=False,
        shutdown_timeout=grace + 5,
        access_log=None,
        keepalive_timeout=runtime.config.server.handshake_timeout,
    )
    await runner.setup()
    # What start-up made (the modules, the agents' SDKs, the application) lives as long as
    # the process. Frozen, the collector stops scanning it in every full collection, which
    # a server allocating per frame runs often: with OpenTelemetry's API loaded, that scan
    # was some 8% of an S7 turn's instructions (docs/performance.md).
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
    watcher: asyncio.Task[None] | None = None
    try:
        site = web.TCPSite(runner, host, port, reuse_port=reuse_port or None)
        await site.start()
        if listening is None:
            bound_host, bound_port = runner.addresses[0][:2]
            print_banner(runtime, str(bound_host), bound_port, generated)
        else:
            watcher = asyncio.create_task(listening(stop))
        await stop.wait()
        if reuse_port:
            # One of --workers: the kernel spreads new connections over every listener of the port,
            # and a draining worker could only refuse its share (503) while the others serve on
            # (a worker signalled alone). Leaving the group sends them there; once every worker
            # drains, the port refuses them. The connections already open drain as usual.
            await site.stop()
        say(f"{name}: {'restarting' if restarting else 'shutting down'}")
        # Drain before aiohttp's cleanup, which stops reading every connection.
        await drain(app, restart=restarting)
    finally:
        if watcher is not None:
            watcher.cancel()
        await runner.cleanup()


class _SlowCallbackHint(logging.Filter):
    """With ``--debug``: asyncio's "Executing <Task ...> took 2.003 seconds" says what, not why."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and record.msg.startswith("Executing ") and " took " in record.msg:
            record.msg += (
                ": the event loop was blocked, every connection waited"
                " (a blocking call in an agent? see 'Blocking calls' in docs/writing-agents.md)"
            )
        return True
