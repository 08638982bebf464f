"""``connic run --workers N`` attacked as a deployer would: its output's reader gone, signals, odd environments.

Real ``python -m connic run --workers 2`` processes, real WebSocket clients on loopback.
Every wait is bounded; nothing is timed.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import websockets
from test_workers import config, wait_exited

from conftest import ROOT


class Log:
    """A file a process writes its standard error to, read back as it grows."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file = path.open("w")

    def text(self) -> str:
        return self.path.read_text()

    def wait_for(self, pattern: str, timeout: float = 60) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while not (m := re.search(pattern, self.text())):
            assert time.monotonic() < deadline, f"no {pattern!r} in:\n{self.text()}"
            time.sleep(0.05)
        return m


def children(pid: int) -> set[int]:
    """The live children of ``pid``, from /proc."""
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", encoding="ascii") as stat:
                    fields = stat.read().rsplit(")", 1)[1].split()
            except (FileNotFoundError, ProcessLookupError):
                continue
            if int(fields[1]) == pid and fields[0] not in ("Z", "X"):
                found.add(int(entry))
    return found


async def served_by(port: int, log: Log, secret: str) -> int:
    """The pid of the worker that serves a new connection, from its log line (the connection is closed)."""
    async with websockets.connect(f"ws://127.0.0.1:{port}/ws", open_timeout=30) as ws:
        await ws.send(json.dumps({"secret": secret}))
        connected = json.loads(await asyncio.wait_for(ws.recv(), 30))
    session = re.escape(connected["session_id"])
    m = await asyncio.to_thread(log.wait_for, rf"\[worker \d+ pid (\d+)\]: open session={session} ")
    return int(m.group(1))


def start(args: list[str], *, stdout: int, log: Log, env: dict[str, str]) -> subprocess.Popen[str]:
    """``python -m connic run ARGS``, its standard output ``stdout``, its standard error ``log``."""
    return subprocess.Popen(
        [sys.executable, "-m", "connic", "run", *args], stdout=stdout, stderr=log.file, env=env, cwd=ROOT, text=True
    )


async def test_the_server_outlives_the_reader_of_its_standard_output(tmp_path: Path) -> None:
    # `connic run --workers 2 | some-log-shipper`, and the shipper dies: the next status line the
    # parent wrote (a worker restarted) failed with EPIPE, and the parent stopped with
    # "connic: error: Broken pipe", exit 1, taking the workers down; the worker it had just
    # started failed with a traceback, its metrics directory removed under it.
    read, write = os.pipe()
    log = Log(tmp_path / "stderr.txt")
    env = {**os.environ, "CONNIC_SECRET": "s", "PYTHONUNBUFFERED": "1"}
    args = ["--port", "0", "--workers", "2", "--config", str(config(tmp_path))]
    proc = start(args, stdout=write, log=log, env=env)
    os.close(write)
    try:
        with os.fdopen(read) as out:
            banner = ""
            while not banner.endswith("Press Ctrl+C to stop.\n"):
                line = out.readline()
                assert line, banner + log.text()
                banner += line
        # The reader is gone. The parent's next line: a worker exited and was restarted.
        port = int(re.search(r"listening on http://[^:]+:(\d+)", banner).group(1))  # type: ignore[union-attr]
        first, second = (int(p) for p in re.search(r"pids (\d+) (\d+)", banner).groups())  # type: ignore[union-attr]
        os.kill(first, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while not (new := children(proc.pid) - {first, second}):
            assert proc.poll() is None and time.monotonic() < deadline, (proc.poll(), log.text())
            await asyncio.sleep(0.05)
        [new_pid] = new
        seen = set()
        while new_pid not in seen:  # the new worker serves (each connection is a coin toss)
            assert len(seen) < 48 and proc.poll() is None, (seen, log.text())
            seen.add(await served_by(port, log, "s"))
        assert proc.poll() is None, log.text()
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(proc.wait, 60)
        await wait_exited([second, new_pid])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in children(proc.pid):
            os.kill(pid, signal.SIGKILL)
        log.file.close()
    assert code == 0, log.text()
    assert "Traceback" not in log.text() and "error" not in log.text(), log.text()
