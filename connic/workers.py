"""``python -m connic run --workers N``: N worker processes on one port, and the parent that supervises them.

Every worker is ``python -m connic.workers``: a process of its own serving the whole
application on a listening socket bound with ``SO_REUSEPORT``, so that the kernel
spreads new connections over the workers. The parent serves nothing. It validates
the configuration once, reserves the port (binding, not listening, with
``SO_REUSEPORT``: this turns ``--port 0`` into one real port and keeps the port ours
while a worker restarts), starts the workers, prints the banner once all of them
listen, restarts a worker that dies, and on SIGTERM/SIGINT/SIGHUP has every worker drain.

The worker's side, and the link between the two (a socket pair on the worker's
standard input: its configuration one way, ``ready`` the other, end-of-file when the
parent is gone), is :mod:`connic.worker`; ``WorkerSpec`` and ``worker_main`` are
re-exported here. What the parent knows of each worker and hears from it (the steps of its
start-up, its heartbeats) is :mod:`connic.worker_handle`; when a worker is started again, and
when the parent gives up, :mod:`connic.restarts`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import sys
from collections.abc import Callable

from prometheus_client import multiprocess

from connic.app import build_runtime
from connic.banner import print_banner
from connic.config import Config
from connic.metrics import MULTIPROC_ENV
from connic.metrics_dir import make_metrics_dir, remove_stale_metrics_dirs
from connic.reserve import check_workers, reserve
from connic.restarts import GIVE_UP_STARTS, RESTART_WINDOW, STORE_RETRY_MAX, Restarts, asked_to_stop, exit_status
from connic.serving import say, stop_signals
from connic.worker import (
    FAILED,
    READY,
    STOP,
    STORE_UNAVAILABLE,
    WorkerSpec,
    error_line,
    pack_spec,
    worker_command,
    worker_main,
)
from connic.worker_handle import (
    WorkerHandle,
    because,
    end_group,
    exited,
    hear_heartbeats,
    hear_start,
    os_error,
    stuck,
)

__all__ = [
    "GIVE_UP_STARTS",
    "RESTART_WINDOW",
    "STORE_RETRY_MAX",
    "Supervisor",
    "WorkerSpec",
    "check_workers",
    "worker_main",
]


_mark_process_dead: Callable[[int, str], None] = multiprocess.mark_process_dead  # untyped upstream


class Supervisor:
    """The parent of ``connic run --workers N``: starts, restarts and drains the workers."""

    def __init__(self, config: Config, workers: int, *, generated: str | None, host_key: str) -> None:
        # Validated once here, so a bad configuration is one error, not N workers failing;
        # the runtime also gives the banner its URLs. It is never started.
        self._runtime = build_runtime(config)
        check_workers(self._runtime, workers)
        self.config = config
        self.workers = workers
        self.generated = generated
        self.host_key = host_key
        self._live: dict[int, WorkerHandle] = {}
        self._restarts = Restarts(workers)
        self._waiting: dict[int, asyncio.Task[None]] = {}  # worker index: its start, after a delay
        self._sleeping: set[int] = set()  # the indexes in _waiting still in their delay
        self._started = False
        self._stopping = False
        self._give_up: str | None = None  # set once every worker keeps failing to start: the error line
        self._changed = asyncio.Event()
        self._metrics_dir: str | None = None
        self._scratch: str | None = None  # the metrics directory made here

    def run(self, *, log_level: str, debug: bool) -> int:
        """Serve until a signal; the exit status of ``connic run``."""
        server = self.config.server
        sockets = reserve(server.host, server.port, self.host_key)
        # One scrape of any worker shows the sum over all of them: prometheus-client's
        # multiprocess mode, in a directory of the workers' own unless the user gave one.
        given = os.environ.get(MULTIPROC_ENV)
        if not given:
            remove_stale_metrics_dirs()
        scratch = None if given else make_metrics_dir()
        self._scratch = scratch
        self._metrics_dir = given or scratch
        if scratch is not None:
            os.environ[MULTIPROC_ENV] = scratch
        try:
            host, port = sockets[0].getsockname()[:2]
            status = asyncio.run(self._supervise(str(host), port, log_level, debug))
        finally:
            for sock in sockets:
                sock.close()
            if scratch is not None:
                del os.environ[MULTIPROC_ENV]
        # Not on an exception: workers may still run, each draining once it sees its parent gone,
        # and one creating a metric file in a removed directory failed. The next start removes it.
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
        return status

    async def _supervise(self, host: str, port: int, log_level: str, debug: bool) -> int:
        loop = asyncio.get_running_loop()
        self._changed = asyncio.Event()
        stop = asyncio.Event()
        for sig in stop_signals():
            loop.add_signal_handler(sig, stop.set)

        def spec(index: int) -> WorkerSpec:
            # Workers bind the configured host: "" or a name may stand for several addresses.
            config, pythonpath = self.config, os.environ.get("PYTHONPATH")
            return WorkerSpec(config, index, config.server.host, port, self.host_key, log_level, debug, pythonpath)

        for index in range(1, self.workers + 1):
            try:
                await self._start(spec(index))
            except OSError as exc:
                error_line(f"worker {index} could not be started: {os_error(exc)}")
                return await self._stop_all(loop, 1)
        stopper = asyncio.create_task(stop.wait())
        try:
            # Start-up: the banner once every worker listens; a worker that fails now fails the start.
            while not stop.is_set() and not all(w.ready for w in self._live.values()):
                await self._next_change(stopper)
                for worker in list(self._live.values()):
                    code = worker.process.returncode
                    if code is not None and exited(worker):
                        self._forget(worker)
                        if worker.timed_out:
                            error_line(f"{self._stuck(worker)}; stopped it")
                            return await self._stop_all(loop, 1)
                        when = "every worker was" if worker.ready else "it was"  # it listened: no start error
                        error_line(
                            f"worker {worker.index} (pid {worker.process.pid}) exited with "
                            f"{exit_status(code)} before {when} listening{because(worker.why)}",
                        )
                        return await self._stop_all(loop, 1)
            if not stop.is_set():
                pids = " ".join(str(w.process.pid) for w in sorted(self._live.values(), key=lambda w: w.index))
                print_banner(self._runtime, host, port, self.generated, [f"workers: {self.workers} (pids {pids})"])
                self._started = True
            while not stop.is_set():
                await self._next_change(stopper)
                for worker in list(self._live.values()):
                    code = worker.process.returncode
                    if code is None or not exited(worker):
                        continue
                    if not worker.ready and (code > 0 or worker.timed_out):
                        # It exited before it listened: it could not start (the store, an agent's
                        # start()), as its error line says. Not a worker that cannot stay up.
                        self._forget(worker, counted=False)
                        if worker.timed_out:
                            self._start_later(spec(worker.index), self._stuck(worker), "")
                            continue
                        why = "could not reach the session store" if code == STORE_UNAVAILABLE else "could not start"
                        cause = worker.why or f"exited with {exit_status(code)}"
                        self._start_later(
                            spec(worker.index), f"worker {worker.index} (pid {worker.process.pid}) {why}", cause
                        )
                        continue
                    self._forget(worker, counted=not asked_to_stop(code))
                    if not self._restarts.may_restart():
                        error_line(
                            f"worker {worker.index} (pid {worker.process.pid}) exited with "
                            f"{exit_status(code)}: {self._restarts.recent_exits} workers exited "
                            f"within {RESTART_WINDOW:g} s, giving up (see the errors above)",
                        )
                        return await self._stop_all(loop, 1)
                    try:
                        new = await self._start(spec(worker.index))
                    except OSError as exc:
                        say(f"connic: worker {worker.index} (pid {worker.process.pid}) exited with {exit_status(code)}")
                        self._spawn_failed(spec(worker.index), exc)
                        continue
                    say(
                        f"connic: worker {worker.index} (pid {worker.process.pid}) exited with {exit_status(code)}; "
                        f"restarted as pid {new.process.pid}"
                    )
                if self._give_up is not None:
                    error_line(self._give_up)
                    return await self._stop_all(loop, 1)
            return await self._stop_all(loop, 0)
        finally:
            stopper.cancel()

    async def _start(self, spec: WorkerSpec) -> WorkerHandle:
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        data = pack_spec(spec)
        try:
            # A process group of its own: a Ctrl+C in the terminal reaches the parent only,
            # which forwards one SIGTERM; two signals would make a worker stop at once.
            command, env = worker_command()
            process = await asyncio.create_subprocess_exec(*command, stdin=theirs.fileno(), env=env, process_group=0)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        # Sent once the worker runs: a configuration larger than the pair's buffer would block.
        # An OSError: the worker died at once, and _watch sees it exit.
        with contextlib.suppress(OSError):
            await asyncio.get_running_loop().sock_sendall(ours, data)
        worker = WorkerHandle(spec.index, process, ours)
        self._live[spec.index] = worker
        worker.watch = asyncio.create_task(self._watch(worker))
        return worker

    def _spawn_failed(self, spec: WorkerSpec, exc: OSError) -> None:
        """The process of worker ``spec.index`` could not be made (fork/exec failed): a failed start."""
        why = os_error(exc)
        self._start_later(spec, f"worker {spec.index} could not be started ({why})", why)

    def _start_later(self, spec: WorkerSpec, failed: str, cause: str) -> None:
        """Start worker ``spec.index`` again after a delay that grows while it keeps failing to start.

        ``failed`` says what failed (``worker 1 (pid 4250) could not start``), ``cause`` why, for
        the line that gives up once every worker has failed :data:`GIVE_UP_STARTS` starts in a row.
        """
        if self._stopping:
            return
        delay = self._restarts.start_failed(spec.index)
        if delay is None:
            say(f"connic: {failed}")
            self._give_up = (
                f"every worker failed its last {GIVE_UP_STARTS} starts in a row and none is listening, "
                f"giving up (the last: {failed}{': ' if cause else ''}{cause})"
            )
            self._changed.set()
            return
        say(f"connic: {failed}; starting it again in {delay:g} s")

        async def later() -> None:
            try:
                await asyncio.sleep(delay)
                self._sleeping.discard(spec.index)  # starting: _stop_all waits for it, then stops it
                try:
                    await self._start(spec)
                except OSError as exc:
                    self._spawn_failed(spec, exc)
            finally:
                if self._waiting.get(spec.index) is task:  # not the next try _spawn_failed scheduled
                    del self._waiting[spec.index]

        self._sleeping.add(spec.index)
        task = asyncio.create_task(later())
        self._waiting[spec.index] = task

    async def _watch(self, worker: WorkerHandle) -> None:
        gone = asyncio.ensure_future(worker.process.wait())
        said = bytearray()
        line = await hear_start(worker, said, gone, self.config.server.start_timeout)
        if line == READY:
            worker.ready = True
            self._restarts.listening(worker.index)
            if self._started:
                say(f"connic: worker {worker.index} (pid {worker.process.pid}) listening")
            self._changed.set()
            await hear_heartbeats(worker, said, gone, self.config.server.worker_timeout)
        elif line.startswith(FAILED):
            worker.why = line[len(FAILED) :].decode("utf-8", "replace").strip()
        await gone
        self._changed.set()

    async def _next_change(self, stopper: asyncio.Task[bool]) -> None:
        changed = asyncio.ensure_future(self._changed.wait())
        await asyncio.wait([changed, stopper], return_when=asyncio.FIRST_COMPLETED)
        changed.cancel()
        self._changed.clear()

    def _stuck(self, worker: WorkerHandle) -> str:
        return stuck(worker, self.config.server.start_timeout)

    def _forget(self, worker: WorkerHandle, *, counted: bool = True) -> None:
        """``worker`` exited: no longer live; ``counted`` towards giving up unless it found no store."""
        del self._live[worker.index]
        worker.link.close()
        end_group(worker, signal.SIGTERM)  # before a new process (its replacement) could take its number
        if counted:
            self._restarts.exited()
        if self._metrics_dir is not None:
            # Its open connections and sessions no longer count; its counters stay in the sums.
            _mark_process_dead(worker.process.pid, self._metrics_dir)

    async def _stop_all(self, loop: asyncio.AbstractEventLoop, status: int) -> int:
        """Have every worker drain (:data:`~connic.worker.STOP`) and wait; a second signal kills them at once."""
        self._stopping = True
        for sig in stop_signals():
            loop.add_signal_handler(sig, self._kill_all, sig)
        if status == 0:
            say("connic: shutting down")
        for index, waiting in list(self._waiting.items()):
            if index in self._sleeping:
                waiting.cancel()  # still in its delay: there is no process to stop
        await asyncio.gather(*self._waiting.values(), return_exceptions=True)
        workers = list(self._live.values())
        for worker in workers:
            if worker.process.returncode is None:
                # Over the link, not a signal (connic.worker.STOP says why). One still starting
                # reads it once it listens, then drains at once: it has nothing under way.
                with contextlib.suppress(OSError):  # it has just exited: the wait below sees it
                    await loop.sock_sendall(worker.link, STOP)
        for worker in workers:
            code = await worker.process.wait()
            worker.link.close()
            end_group(worker, signal.SIGTERM)
            # Killed by a SIGTERM (a service manager signals every process) before it installed
            # its handler: it was not serving yet. Nor was one started again once the server had
            # started that never listened (it could not start: the store, an agent): it had no
            # drain to fail, and its own error line says why it stopped.
            could_not_start = self._started and not worker.ready
            if worker.timed_out:
                error_line(f"{self._stuck(worker)}; stopped it")
                status = status if could_not_start else 1
            elif code not in (0, -signal.SIGTERM) and status == 0 and not could_not_start:
                error_line(
                    f"worker {worker.index} (pid {worker.process.pid}) exited with "
                    f"{exit_status(code)} while shutting down",
                )
                status = 1
        return status

    def _kill_all(self, signum: int) -> None:
        """A second SIGINT/SIGTERM/SIGHUP: kill every worker and exit now with 128 + the signal number."""
        say(f"connic: {signal.Signals(signum).name} again, stopping at once")
        for worker in self._live.values():
            end_group(worker, signal.SIGKILL)
        if self._scratch is not None:
            # os._exit skips run()'s cleanup: without this, each stop at once left a directory in /tmp.
            shutil.rmtree(self._scratch, ignore_errors=True)
        logging.shutdown()
        sys.stderr.flush()
        os._exit(128 + signum)


if __name__ == "__main__":
    # A worker (the parent starts `python -m connic.workers`): connic.worker is its code.
    sys.exit(worker_main())
