"""Shared helpers of the reliability suite: subprocess servers watched through /proc, metrics scraping.

Every server listens on 127.0.0.1 with an ephemeral port; every test bounds its own
work (counts and timeouts) and stops by itself.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

import connic
from conftest import MEASURED, CliServer, start_cli

# --- numbers a test reports, collected into one table at the end of the run -------------


def report(name: str, value: str) -> None:
    """Record a measured number; the run prints them all at the end (tests/conftest.py)."""
    MEASURED.append((name, value))


# --- metrics -----------------------------------------------------------------------------

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*(?:\{[^}]*\})?) (\S+)$")


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus exposition text as ``{'name{labels}': value}``."""
    samples = {}
    for line in text.splitlines():
        if line.startswith("#") or not line:
            continue
        match = _SAMPLE.match(line)
        assert match, f"not a valid exposition line: {line!r}"
        samples[match.group(1)] = float(match.group(2))
    return samples


async def scrape(base: str, path: str = "/metrics") -> dict[str, float]:
    """GET /metrics from ``base`` (``http://127.0.0.1:PORT``) and parse it."""
    async with aiohttp.ClientSession() as http, http.get(base + path) as response:
        assert response.status == 200
        return parse_metrics(await response.text())


async def wait_metric(base: str, series: str, value: float, timeout: float = 10.0) -> dict[str, float]:
    """Scrape until ``series`` reaches ``value`` (the server accounts for a close after its handler ends)."""
    deadline = time.monotonic() + timeout
    while True:
        samples = await scrape(base)
        if samples.get(series, 0) >= value or time.monotonic() > deadline:
            return samples
        await asyncio.sleep(0.05)


# --- a subprocess server watched through /proc -------------------------------------------


class Proc:
    """``python -m connic run`` whose output is drained (so logging never blocks) and kept."""

    def __init__(self, server: CliServer) -> None:
        self.server = server
        self.proc = server.proc
        self.pid = server.proc.pid
        self.port = server.port
        self.lines: list[str] = list(server.banner)
        self._drain = threading.Thread(target=self._read, daemon=True)
        self._drain.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def rss_kib(self) -> int:
        """The server's resident set size (VmRSS) in KiB."""
        with open(f"/proc/{self.pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise AssertionError("no VmRSS in /proc status")

    def sockets(self) -> int:
        """How many sockets the server process holds open (listening ones included)."""
        count = 0
        for fd in os.listdir(f"/proc/{self.pid}/fd"):
            try:
                if os.readlink(f"/proc/{self.pid}/fd/{fd}").startswith("socket:"):
                    count += 1
            except OSError:
                pass
        return count

    def signal(self, sig: int = signal.SIGTERM) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        """Wait for the process to exit by itself; its exit status."""
        code = self.proc.wait(timeout=timeout)
        self._drain.join(timeout=5)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._drain.join(timeout=5)


@pytest.fixture
def run_cli(tmp_path: Path) -> Iterator[Any]:
    """Start ``python -m connic run --config FILE`` from TOML text; killed at the end if still running."""
    started: list[Proc] = []

    def run(toml: str, *args: str) -> Proc:
        path = tmp_path / f"server{len(started)}.toml"
        path.write_text(toml, encoding="utf-8")
        proc = Proc(start_cli("--config", str(path), *args))
        started.append(proc)
        return proc

    yield run
    for proc in started:
        proc.kill()


class RssSampler:
    """Samples a process's RSS every ``every`` seconds in a thread; keeps the peak."""

    def __init__(self, proc: Proc, every: float = 0.02) -> None:
        self.proc = proc
        self.every = every
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, self.proc.rss_kib())
            except (OSError, AssertionError):
                return
            self.samples += 1
            self._stop.wait(self.every)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# --- in-process checks -------------------------------------------------------------------


def connic_tasks() -> list[asyncio.Task[Any]]:
    """Tasks still running connic or agent code (connections, writers, processors, agents)."""
    package = os.path.dirname(connic.__file__)
    me = asyncio.current_task()
    found = []
    for task in asyncio.all_tasks():
        if task is me or task.done():
            continue
        code = getattr(task.get_coro(), "cr_code", None)
        name = getattr(code, "co_qualname", "")
        filename = getattr(code, "co_filename", "")
        if filename.startswith(package) or "respond" in name or "Connection" in name:
            found.append(task)
    return found


async def eventually(predicate: Callable[[], bool], timeout: float = 10.0, every: float = 0.05) -> bool:
    """Poll ``predicate`` until it holds or ``timeout`` passes; whether it held."""
    for _ in range(max(1, int(timeout / every))):
        if predicate():
            return True
        await asyncio.sleep(every)
    return predicate()


def runtime(app: web.Application) -> connic.Runtime:
    return app[connic.RUNTIME]


def assert_no_traceback(caplog: pytest.LogCaptureFixture) -> None:
    """No log record carries an exception, and nothing logged at ERROR or above."""
    bad = [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert not bad, "\n".join(caplog.text.splitlines()[-40:])
    assert "Traceback" not in caplog.text


def kib(value: float) -> str:
    return f"{value / 1024:.1f} MiB"
