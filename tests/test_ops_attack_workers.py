"""Operations under attack, ``--workers`` side: the supervisor and its workers mishandled.

Real ``python -m connic run --workers 2`` processes, real clients on loopback: a worker
restarted while an agent or the store cannot start, the parent killed while its workers
start, signals at awkward moments, the fleet's one standard output. The Redis side is
tests/test_ops_attack.py. Every wait is bounded; nothing is timed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from redis_server import (
    RedisServer,
    redis_server_fixture,  # noqa: F401  (a fixture)
    store_plugin_env,
)
from test_workers import Output, clients_on, exited, worker_pids

from conftest import ROOT, start_cli

# --- a fleet's status lines on its one standard output -------------------------------------


class Records:
    """What a process writes to its standard output, one record per ``write()``: a SOCK_SEQPACKET pair keeps them."""

    def __init__(self) -> None:
        self.ours, self.theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.records: list[str] = []
        self._changed = threading.Condition()
        self._ended = False
        self._thread = threading.Thread(target=self._read, daemon=True)

    def start(self) -> None:
        """Read (in a thread) once the process holds its end (ours closed: end-of-file once every writer exits)."""
        self.theirs.close()
        self._thread.start()

    def _read(self) -> None:
        while data := self.ours.recv(1 << 16):
            with self._changed:
                self.records.append(data.decode())
                self._changed.notify_all()
        with self._changed:
            self._ended = True
            self._changed.notify_all()

    def wait_for(self, pattern: str, timeout: float = 30) -> int:
        """The index of the first record after which the text so far matches ``pattern`` (waiting ≤ ``timeout`` s)."""
        with self._changed:
            ok = self._changed.wait_for(
                lambda: self._ended or re.search(pattern, "".join(self.records)) is not None, timeout
            )
            text = "".join(self.records)
            assert ok and re.search(pattern, text), f"no {pattern!r} in:\n{text}"
            return len(self.records)

    def wait_ended(self, timeout: float = 30) -> list[str]:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "".join(self.records)
        self.ours.close()
        return self.records


def test_a_fleets_status_lines_are_each_written_whole(tmp_path: Path) -> None:
    # The parent and every worker share standard output. Python run unbuffered (PYTHONUNBUFFERED=1,
    # usual in containers) makes print() two writes, the text and then its newline, so two workers
    # saying "shutting down" at once printed `...: shutting downconnic: worker 2 ...: shutting down`
    # and an empty line. Each status line must be one write.
    config = tmp_path / "connic.toml"
    config.write_text('[agents.echo]\nuse = "echo"\n[[connectors]]\nresume_window = 0\n')
    records = Records()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("CONNIC_SECRET", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "connic", "run", "--port", "0", "--workers", "2", "--config", str(config)],
        stdout=records.theirs.fileno(),
        stderr=subprocess.DEVNULL,
        cwd=ROOT,
        env=env,
    )
    records.start()
    pids: list[int] = []
    try:
        banner_end = records.wait_for(r"Press Ctrl\+C to stop\.\n")
        pids = [int(p) for p in re.findall(r"pids ([\d ]+)\)", "".join(records.records))[0].split()]
        os.kill(pids[0], signal.SIGKILL)  # the parent says it restarts it, the new one that it listens
        records.wait_for(r"worker 1 \(pid \d+\) listening\n")
        proc.send_signal(signal.SIGTERM)  # the parent, then each worker, says it shuts down
        assert proc.wait(30) == 0
        after = records.wait_ended()[banner_end:]
    finally:
        _kill_leftovers(proc, *pids)
    assert any("restarted as pid" in r for r in after), after
    assert sum("shutting down" in r for r in after) == 3, after  # the parent and both workers
    assert all(r.endswith("\n") and r.count("\n") == 1 for r in after), after


# --- the supervising parent killed while its workers start ---------------------------------


def _kill_leftovers(proc: subprocess.Popen[str], *pids: int) -> None:
    """At a test's end: kill ``proc`` (the parent) and each of ``pids`` (its workers) still running."""
    if proc.poll() is None:
        proc.kill()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            if not exited(pid):
                os.kill(pid, signal.SIGKILL)


def _children(pid: int) -> list[int]:
    """The live processes whose parent is ``pid``, from /proc, oldest first."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(fields[1]) == pid and fields[0] not in ("Z", "X"):
            found.append(int(entry))
    return sorted(found)


def _started_workers(pid: int, count: int, timeout: float = 30) -> list[int]:
    """The ``count`` workers of the parent ``pid`` once each runs ``connic.workers`` (waiting ≤ ``timeout`` s)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        workers = []
        for child in _children(pid):
            with contextlib.suppress(FileNotFoundError), open(f"/proc/{child}/cmdline", "rb") as cmdline:
                if b"connic.workers" in cmdline.read():
                    workers.append(child)
        if len(workers) == count:
            return workers
        time.sleep(0.005)
    raise AssertionError(f"no {count} workers of {pid} within {timeout} s")


def test_workers_whose_parent_is_killed_before_they_listen_do_not_serve_on_as_orphans(tmp_path: Path) -> None:
    # SIGKILL to the parent alone (the OOM killer, a service manager's KillMode=process) while the
    # workers start. A worker learns that its parent is gone from its link: it told the parent it
    # listened, and that write failed (EPIPE) outside the handling of the link's end-of-file. The
    # worker then served on for ever, unsupervised, holding the port (no new server could bind it).
    config = tmp_path / "connic.toml"
    config.write_text('[agents.echo]\nuse = "echo"\n[[connectors]]\nresume_window = 0\n')
    proc = subprocess.Popen(
        [sys.executable, "-m", "connic", "run", "--port", "0", "--workers", "2", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=ROOT,
        env={**os.environ, "CONNIC_SECRET": "s"},
    )
    workers: list[int] = []
    try:
        # Both started: the parent sent the first its configuration before starting the second,
        # and the first is still importing connic, far from listening.
        workers = _started_workers(proc.pid, 2)
        proc.kill()
        proc.wait(10)
        deadline = time.monotonic() + 30
        while not all(exited(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert [pid for pid in workers if not exited(pid)] == []
    finally:
        _kill_leftovers(proc, *workers)


async def test_a_stop_at_once_leaves_no_metrics_directory_behind(tmp_path: Path) -> None:
    # The parent of --workers keeps the workers' metrics in a temporary directory of its own,
    # removed once they exited. A second signal (os._exit, nothing awaited) left it behind: one
    # more /tmp/connic-metrics-* for each Ctrl+C pressed twice.
    temp = tmp_path / "tmp"
    temp.mkdir()
    config = tmp_path / "connic.toml"
    config.write_text('[agents.echo]\nuse = "echo"\n[[connectors]]\nresume_window = 0\n')
    env = {"TMPDIR": str(temp)}
    server = await asyncio.to_thread(start_cli, "--config", str(config), "--workers", "2", "--secret", "s", env=env)
    output = Output(server)
    pids = worker_pids(server)
    try:
        assert [p.name[:15] for p in temp.iterdir()] == ["connic-metrics-"]
        server.proc.send_signal(signal.SIGTERM)
        await output.wait_for(r"^connic: shutting down")
        server.proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(server.proc.wait, 30) == 128 + signal.SIGTERM
    finally:
        _kill_leftovers(server.proc, *pids)
    assert list(temp.iterdir()) == []


# --- a worker restarted while an agent cannot start ----------------------------------------

FLAKY_AGENT = '''
import os

import connic
from connic.errors import ConfigError


class Flaky(connic.Agent):
    """Echoes; its start() fails while the file FLAKY_FLAG names exists (a service it needs is down)."""

    async def start(self) -> None:
        if os.path.exists(os.environ["FLAKY_FLAG"]):
            raise ConfigError("flaky: the service it needs is down")

    async def respond(self, turn):
        yield turn.message
'''


async def test_a_worker_restarted_while_an_agent_cannot_start_waits_for_it_and_the_others_serve_on(
    tmp_path: Path, connect: Any
) -> None:
    # A worker died (killed, out of memory) while a service its agent needs at start() was down (an
    # MCP server, say): started again, it failed at once, again and again. Those exits were counted
    # as a worker that cannot stay up: within a second the parent gave up and took the other
    # workers, which were serving, down with it. As for the session store, such a worker is
    # started again later and later until it starts.
    site = tmp_path / "site"
    site.mkdir()
    (site / "flaky_agent.py").write_text(FLAKY_AGENT)
    flag = tmp_path / "down"
    config = tmp_path / "connic.toml"
    config.write_text('[agents.flaky]\nuse = "flaky_agent:Flaky"\n[[connectors]]\nresume_window = 0\n')
    env = {"FLAKY_FLAG": str(flag), "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    server = await asyncio.to_thread(start_cli, "--config", str(config), "--workers", "2", "--secret", "s", env=env)
    output = Output(server)
    pids = worker_pids(server)
    try:
        clients = await clients_on(output, connect, server, {pids[1]}, "s")
        flag.write_text("")
        os.kill(pids[0], signal.SIGKILL)
        for delay in (1, 2, 4):  # more exits than workers within 10 s: the parent used to give up
            await output.wait_for(rf"connic: worker 1 \(pid \d+\) could not start; starting it again in {delay} s")
        assert server.proc.poll() is None
        frames = await clients[pids[1]].reply({"message": "still here"})
        assert frames[-1]["full_response"] == "still here"  # the worker that never died serves on
        flag.unlink()
        await output.wait_for(r"connic: worker 1 \(pid \d+\) listening", timeout=30)
        server.proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(server.proc.wait, 30) == 0, output.text()
        assert "giving up" not in output.text()
    finally:
        _kill_leftovers(server.proc, *pids)


async def test_a_signal_while_a_worker_is_being_started_again_without_redis_still_exits_0(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    # A worker died while Redis hangs; the one started in its place cannot reach Redis and will exit 3.
    # SIGTERM arrives while it starts: it has served nothing, so there is nothing it failed to drain.
    # Its exit, seen while shutting down, was "exited with status 3 while shutting down" and exit 1.
    from test_ops_workers import redis_config

    config = redis_config(tmp_path, redis_server.url)
    env = store_plugin_env(tmp_path / "plugins")
    server = await asyncio.to_thread(start_cli, "--config", str(config), "--workers", "2", env=env)
    output = Output(server)
    first, second = worker_pids(server)
    assert redis_server.proc is not None
    os.kill(redis_server.proc.pid, signal.SIGSTOP)  # a connection opens, then no answer for `timeout`
    restarted: list[int] = []
    try:
        os.kill(first, signal.SIGKILL)
        m = await output.wait_for(r"connic: worker 1 \(pid \d+\) exited with .*; restarted as pid (\d+)")
        restarted.append(int(m.group(1)))
        server.proc.send_signal(signal.SIGTERM)  # it is still importing connic, far from Redis's answer
        code = await asyncio.to_thread(server.proc.wait, 30)
        assert code == 0, output.text()
    finally:
        os.kill(redis_server.proc.pid, signal.SIGCONT)
        _kill_leftovers(server.proc, first, second, *restarted)
