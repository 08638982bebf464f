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
from typing import IO

import websockets
from test_workers import (
    Cli,
    Output,
    clients_on,
    config,
    wait_exited,
    worker_pids,
    workers_cli,  # noqa: F401  (a fixture)
)

from conftest import ROOT, Connect


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


PROBE_AGENT = """
import connic
import shadow


class Probe(connic.Agent):
    \"\"\"Answers with what its process imports and how its interpreter runs.\"\"\"

    async def respond(self, turn):
        yield f"debug={__debug__} shadow={shadow.WHO}"
"""


async def ask(port: int, log: Log, secret: str) -> tuple[int, str]:
    """One new connection's one turn: the pid of the worker that served it (0 alone), and its answer."""
    async with websockets.connect(f"ws://127.0.0.1:{port}/ws", open_timeout=30) as ws:
        await ws.send(json.dumps({"secret": secret}))
        connected = json.loads(await asyncio.wait_for(ws.recv(), 30))
        await ws.send(json.dumps({"message": "who are you?"}))
        while (frame := json.loads(await asyncio.wait_for(ws.recv(), 30)))["type"] != "stream_end":
            pass
    session = re.escape(connected["session_id"])
    m = await asyncio.to_thread(log.wait_for, rf"(?:\[worker \d+ pid (\d+)\]: )?open session={session} ")
    return int(m.group(1) or 0), frame["full_response"]


def banner_of(out: IO[str], log: Log) -> str:
    """What a server wrote to its standard output up to ``Press Ctrl+C to stop.``."""
    banner = ""
    while not banner.endswith("Press Ctrl+C to stop.\n"):
        line = out.readline()
        assert line, banner + log.text()
        banner += line
    return banner


def launch(args: list[str], *, cwd: Path, log: Log, env: dict[str, str]) -> subprocess.Popen[str]:
    """``ARGS``, standard output in a pipe, standard error in ``log``."""
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=log.file, env=env, cwd=cwd, text=True)


async def test_workers_run_with_the_parents_interpreter_flags_and_module_path(tmp_path: Path) -> None:
    # Workers were `python -m connic.workers`, whatever the parent was: `python -O` (asserts
    # stripped in production) served with asserts on; a parent started by the `connic` script
    # (not on sys.path: the current directory) had workers import a module of the current
    # directory that shadowed the one the parent had checked the configuration with.
    site, here, bin_dir = tmp_path / "site", tmp_path / "here", tmp_path / "bin"
    for folder in (site, here, bin_dir):
        folder.mkdir()
    (site / "probe_agent.py").write_text(PROBE_AGENT)
    (site / "shadow.py").write_text('WHO = "site"\n')
    (here / "shadow.py").write_text('WHO = "current directory"\n')
    # As the `connic` console script starts: its own folder, not the current directory, on sys.path.
    (bin_dir / "connic").write_text("import sys\nfrom connic.cli import main\nsys.exit(main())\n")
    path = tmp_path / "connic.toml"
    path.write_text('[agents.probe]\nuse = "probe_agent:Probe"\n[[connectors]]\nresume_window = 0\n')
    env = {**os.environ, "CONNIC_SECRET": "s", "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)])}
    answers = {}
    for workers in ("1", "2"):
        log = Log(tmp_path / f"stderr-{workers}.txt")
        args = ["run", "--port", "0", "--workers", workers, "--config", str(path)]
        proc = launch([sys.executable, "-O", str(bin_dir / "connic"), *args], cwd=here, log=log, env=env)
        try:
            assert proc.stdout is not None
            banner = await asyncio.to_thread(banner_of, proc.stdout, log)
            port = int(re.search(r"listening on http://[^:]+:(\d+)", banner).group(1))  # type: ignore[union-attr]
            pids = [int(p) for p in re.findall(r"\d+", banner.split("pids", 1)[1])] if workers == "2" else [0]
            served: dict[int, str] = {}
            for _ in range(48):  # until each worker has answered (each connection is a coin toss)
                pid, answer = await ask(port, log, "s")
                served[pid] = answer
                if set(served) == set(pids):
                    break
            assert set(served) == set(pids), (served, pids)
            answers[workers] = served
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(proc.wait, 60) == 0, log.text()
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()
            log.file.close()
    assert answers["1"] == {0: "debug=False shadow=site"}, answers
    assert set(answers["2"].values()) == {"debug=False shadow=site"}, answers


BLOCKING_AGENT = """
import time

import connic


class Blocking(connic.Agent):
    \"\"\"Echoes, but "block" blocks its worker's event loop for an hour (time.sleep in a coroutine).\"\"\"

    async def respond(self, turn):
        if turn.message == "block":
            time.sleep(3600)
        yield turn.message
"""


async def test_a_worker_whose_event_loop_blocks_is_killed_and_restarted(
    tmp_path: Path,
    workers_cli: Cli,  # noqa: F811  (the fixture imported above)
    connect: Connect,
) -> None:
    # An agent blocking its worker's event loop (time.sleep, a lock, a synchronous SDK call that
    # never returns): every connection on that worker stalled for ever, and the kernel kept giving
    # the worker its share of the new ones, whose handshakes hung. The parent saw a live process.
    site = tmp_path / "site"
    site.mkdir()
    (site / "blocking_agent.py").write_text(BLOCKING_AGENT)
    path = tmp_path / "connic.toml"
    path.write_text(
        '[server]\nworker_timeout = 10\n[agents.b]\nuse = "blocking_agent:Blocking"\n'
        "[[connectors]]\nresume_window = 0\n"
    )
    env = {"PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    server = workers_cli("--config", str(path), "--secret", "s", env=env)
    first, second = worker_pids(server)
    output = Output(server)
    blocked = (await clients_on(output, connect, server, {first}, "s"))[first]
    await blocked.send({"message": "block"})
    await output.wait_for(
        rf"connic: worker 1 \(pid {first}\) sent no heartbeat for 10 s \(server.worker_timeout\): "
        "its event loop is blocked, killing it",
        timeout=90,
    )
    m = await output.wait_for(
        rf"connic: worker 1 \(pid {first}\) exited with signal 9 \(SIGKILL\); restarted as pid (\d+)"
    )
    new = int(m.group(1))
    await output.wait_for(rf"connic: worker 1 \(pid {new}\) listening", timeout=60)
    code, _ = await blocked.closed(timeout=30)
    assert code != 1000, code  # dropped with its worker
    for client in (await clients_on(output, connect, server, {new, second}, "s")).values():
        frames = await client.reply({"message": "still here"})
        assert frames[-1]["full_response"] == "still here", frames
    code, _ = server.stop(timeout=60)
    assert code == 0, output.text()
    await wait_exited([second, new])
