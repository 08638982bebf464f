"""Starting benchmark servers as subprocesses on 127.0.0.1, and reading their RSS and CPU time.

Shared by run.py and the scenario modules (llm_pace.py, resume.py, memory.py), so that
each starts, waits for and stops a server the same way.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SECRET = "bench"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def raise_fd_limit() -> None:
    """Allow as many sockets as the hard limit permits (also run in each server subprocess)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def free_port() -> int:
    """A port nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_for_port(port: int, timeout: float = 20.0) -> float:
    """Seconds until something accepts connections on ``port``."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return time.monotonic() - started
        time.sleep(0.005)
    raise RuntimeError(f"nothing listens on {port} after {timeout} s")


@contextlib.contextmanager
def serve(cmd: list[str], port: int, env: dict[str, str] | None = None) -> Iterator[int]:
    """Run ``cmd`` (a server listening on ``port``) until the block ends; yields its pid. ``env``: its environment."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, preexec_fn=raise_fd_limit, env=env)
    try:
        try:
            wait_for_port(port)
        except RuntimeError:
            proc.kill()
            _, err = proc.communicate(timeout=5)
            raise RuntimeError(f"{' '.join(cmd)} did not start: {err.decode(errors='replace')[-2000:]}") from None
        yield proc.pid
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def connic_inprocess(
    agent: str, *, store: dict[str, Any] | None = None, **connector: Any
) -> Iterator[tuple[str, int, int]]:
    """connic with the benchmarks' own agents (benchmarks/connic_server.py); yields (url, port, pid).

    ``agent`` is ``pace`` (benchmarks/pace_agent.py), ``echo`` or ``echo-slow`` (the echo agent,
    50 ms before each word): see connic_server.py. ``connector`` adds keys to the connector table;
    ``store`` is the ``[store]`` table (default: the memory store).
    """
    port = free_port()
    cmd = [
        sys.executable,
        str(HERE / "connic_server.py"),
        "--port",
        str(port),
        "--agent",
        agent,
        "--connector",
        json.dumps(connector),
        "--store",
        json.dumps(store or {}),
    ]
    with serve(cmd, port) as pid:
        yield f"ws://127.0.0.1:{port}/ws", port, pid


@contextlib.contextmanager
def baseline_pace() -> Iterator[tuple[str, int, int]]:
    """The aiohttp baseline in its LLM-pace mode (history read per turn, 20 chunks 50 ms apart)."""
    port = free_port()
    cmd = [sys.executable, str(HERE / "baseline_aiohttp.py"), "--port", str(port), "--secret", SECRET, "--pace"]
    with serve(cmd, port) as pid:
        yield f"ws://127.0.0.1:{port}/ws", port, pid


def stats(port: int) -> dict[str, Any]:
    """The in-process connic server's session and replay-log figures (GET /bench/stats)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/bench/stats", timeout=30) as response:
        data: dict[str, Any] = json.load(response)
        return data


def rss_kib(pid: int) -> int:
    """Resident set size of a process, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def descendants(pid: int) -> list[int]:
    """``pid`` and every process under it (``--workers N``: the parent and its workers)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            text = stat.read_text()
            parents[int(stat.parent.name)] = int(text[text.rindex(")") + 2 :].split()[1])
    found = [pid]
    for parent in found:
        found += [child for child, ppid in parents.items() if ppid == parent]
    return found


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU time so far of ``pid`` and every process under it."""
    total = 0.0
    for each in descendants(pid):
        with contextlib.suppress(OSError):
            total += cpu_seconds(each)
    return total


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (from /proc/PID/stat)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()  # the command name may contain spaces
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime: fields 14 and 15 of stat


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``values`` by the nearest-rank method; NaN if empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]
