"""``connic run --workers N`` attacked as a user deploying it would: a worker signalled alone (drained,
killed by an unnamed signal), the processes a worker's agent starts, a worker dying during start-up,
Ctrl+C while the configuration loads.

Real ``python -m connic run --workers 2`` processes, real WebSocket clients on loopback.
Every wait is bounded; nothing is timed.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import pytest
import websockets
from test_workers import (
    Cli,
    Output,
    clients_on,
    config,
    exited,
    served_by,
    wait_exited,
    worker_pids,
    workers_cli,  # noqa: F401  (a fixture)
)

from conftest import ROOT, Connect

NEW_CONNECTIONS = 16
"""Connections opened while one worker drains: with one of two workers still listening, each
is a coin toss, so all 16 reaching the worker that serves on by chance is one time in 65,536."""


async def test_a_worker_draining_alone_stops_listening_and_the_others_take_its_new_connections(
    tmp_path: Path,
    workers_cli: Cli,  # noqa: F811  (the fixture imported above)
    connect: Connect,
) -> None:
    # `kill -TERM <worker>` (recycling one worker, as gunicorn users do): the worker drains its
    # replies while the other serves on. It kept its SO_REUSEPORT listener during the drain, so
    # the kernel still gave it half of the new connections, each refused with 503 "server is
    # shutting down", while the other worker could have served them.
    words = " ".join(f"w{i}" for i in range(150))  # 15 s at 0.1 s a word: the drain outlasts the checks
    server = workers_cli("--config", str(config(tmp_path, delay=0.1, grace=60)), "--secret", "s")
    first, second = worker_pids(server)
    output = Output(server)
    draining = (await clients_on(output, connect, server, {first}, "s"))[first]
    await draining.send({"id": "long", "message": words})
    before = await draining.until("stream_chunk")
    os.kill(first, signal.SIGTERM)
    await output.wait_for(rf"connic: worker 1 \(pid {first}\): shutting down")

    refused = []
    for _ in range(NEW_CONNECTIONS):
        try:
            client = await connect(server.url, secret="s")
        except websockets.InvalidStatus as exc:
            refused.append(exc.response.status_code)
            continue
        assert await served_by(output, client) == second
        await client.ws.close()
    assert not exited(first), "the drain ended before the checks: they proved nothing"
    assert refused == [], f"{len(refused)} of {NEW_CONNECTIONS} new connections refused: {refused}"

    code, after = await draining.closed(timeout=60)
    ends = [f for f in before + after if f["type"] == "stream_end"]
    assert [e["full_response"] for e in ends] == [words], after
    assert code == 1001, after
    m = await output.wait_for(rf"connic: worker 1 \(pid {first}\) exited with status 0; restarted as pid (\d+)")
    new = int(m.group(1))
    await output.wait_for(rf"connic: worker 1 \(pid {new}\) listening", timeout=60)
    code, _ = server.stop(timeout=60)
    assert code == 0, output.text()
    await wait_exited([first, second, new])
    assert "Traceback" not in output.text()
    assert not re.search(r"error", output.text()), output.text()


async def test_a_worker_killed_by_a_signal_without_a_name_is_restarted(
    tmp_path: Path,
    workers_cli: Cli,  # noqa: F811  (the fixture imported above)
    connect: Connect,
) -> None:
    # A real-time signal (SIGRTMIN+6, 40 on Linux) terminates a process by default, but has no
    # name in Python's signal.Signals. The parent, saying which signal killed the worker, raised
    # ValueError: a traceback, exit 1, and the other worker, serving, drained and stopped with it.
    number = signal.SIGRTMIN + 6
    server = workers_cli("--config", str(config(tmp_path)), "--secret", "s")
    first, second = worker_pids(server)
    output = Output(server)
    os.kill(first, number)
    m = await output.wait_for(rf"connic: worker 1 \(pid {first}\) exited with signal {number}; restarted as pid (\d+)")
    new = int(m.group(1))
    await output.wait_for(rf"connic: worker 1 \(pid {new}\) listening", timeout=60)
    assert server.proc.poll() is None, output.text()
    for client in (await clients_on(output, connect, server, {new, second}, "s")).values():
        frames = await client.reply({"message": "still here"})
        assert frames[-1]["full_response"] == "still here", frames
    code, _ = server.stop(timeout=60)
    assert code == 0, output.text()
    await wait_exited([second, new])
    assert "Traceback" not in output.text(), output.text()


STDIN_AGENT = '''
import asyncio
import subprocess
import sys

import connic

HELPER = """
import asyncio
import os
try:
    print(repr(os.read(0, 100)))
except OSError as exc:
    print(type(exc).__name__)
"""


class StdinReader(connic.Agent):
    """Answers with what a helper process it starts reads from the standard input it inherits."""

    async def respond(self, turn):
        proc = await asyncio.create_subprocess_exec(sys.executable, "-c", HELPER, stdout=subprocess.PIPE)
        out, _ = await proc.communicate()
        yield out.decode().strip()
'''


async def test_a_helper_process_an_agent_starts_does_not_inherit_the_link_to_the_parent(
    tmp_path: Path,
    workers_cli: Cli,  # noqa: F811  (the fixture imported above)
    connect: Connect,
) -> None:
    # A worker's standard input was its link to the parent: a non-blocking socket. Every process an
    # agent started without its own stdin (a converter, a CLI tool: ffmpeg reads stdin unless told
    # not to) inherited it: a read failed at once with EAGAIN instead of reading end-of-file, and
    # a helper that waited for input could take the parent's "stop", leaving the worker serving on.
    site = tmp_path / "site"
    site.mkdir()
    (site / "stdin_agent.py").write_text(STDIN_AGENT)
    path = tmp_path / "connic.toml"
    path.write_text('[agents.reader]\nuse = "stdin_agent:StdinReader"\n[[connectors]]\nresume_window = 0\n')
    env = {"PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    server = workers_cli("--config", str(path), "--secret", "s", env=env)
    pids = worker_pids(server)
    output = Output(server)
    for client in (await clients_on(output, connect, server, set(pids), "s")).values():
        frames = await client.reply({"message": "what is on your stdin?"}, timeout=30)
        assert frames[-1]["full_response"] == "b''", frames  # end-of-file, as from /dev/null
    code, _ = server.stop(timeout=60)
    assert code == 0, output.text()
    await wait_exited(pids)


HELPER_AGENT = '''
import asyncio
import os
import subprocess
import sys

import connic


class WithHelper(connic.Agent):
    """Starts a helper process that runs until killed (its pid in HELPER_DIR), and never stops it."""

    async def start(self):
        helper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], stdin=subprocess.DEVNULL)
        with open(os.path.join(os.environ["HELPER_DIR"], f"{os.getpid()}-{helper.pid}"), "w"):
            pass

    async def respond(self, turn):
        yield turn.message
'''


def helpers(directory: Path) -> dict[int, int]:
    """The helper started in each worker so far: worker pid -> helper pid."""
    return {int(w): int(h) for w, h in (p.name.split("-") for p in directory.iterdir())}


@pytest.mark.parametrize("second_signal", [False, True], ids=["drain", "stop-at-once"])
async def test_a_workers_helper_processes_end_with_it(
    tmp_path: Path,
    workers_cli: Cli,  # noqa: F811  (the fixture imported above)
    second_signal: bool,
) -> None:
    # Each worker leads a process group of its own (so that a terminal's Ctrl+C reaches the parent
    # only), and so do the processes its agent starts: they outlived their worker. A worker killed
    # and restarted left its helpers behind, one more set each time; a second Ctrl+C killed the
    # workers but left every helper running, out of the terminal's reach.
    site = tmp_path / "site"
    site.mkdir()
    (site / "helper_agent.py").write_text(HELPER_AGENT)
    found = tmp_path / "helpers"
    found.mkdir()
    path = tmp_path / "connic.toml"
    path.write_text('[agents.h]\nuse = "helper_agent:WithHelper"\n[[connectors]]\nresume_window = 0\n')
    env = {"HELPER_DIR": str(found), "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    server = workers_cli("--config", str(path), "--secret", "s", env=env)
    first, second = worker_pids(server)
    output = Output(server)
    started = helpers(found)
    try:
        assert set(started) == {first, second}, started
        os.kill(first, signal.SIGKILL)
        m = await output.wait_for(rf"connic: worker 1 \(pid {first}\) exited with .*; restarted as pid (\d+)")
        new = int(m.group(1))
        await output.wait_for(rf"connic: worker 1 \(pid {new}\) listening", timeout=60)
        await wait_exited([started[first]])  # the killed worker's helper, not the others'
        started = helpers(found)
        assert not exited(started[second]) and not exited(started[new]), started

        server.proc.send_signal(signal.SIGTERM)
        if second_signal:
            await output.wait_for(r"^connic: shutting down")
            server.proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(server.proc.wait, 60)
        assert code == (128 + signal.SIGTERM if second_signal else 0), output.text()
        await wait_exited([second, new, *started.values()])
    finally:
        for pid in helpers(found).values():
            if not exited(pid):
                os.kill(pid, signal.SIGKILL)


FRAGILE_AGENT = '''
import asyncio
import os

import connic


class Fragile(connic.Agent):
    """The first worker to start is quick, the other takes 5 s; a message kills its worker (status 1)."""

    async def start(self):
        try:
            os.close(os.open(os.environ["FIRST_MARK"], os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            await asyncio.sleep(5)

    async def respond(self, turn):
        os._exit(1)
        yield ""
'''


def spawn(*args: str, env: Mapping[str, str]) -> subprocess.Popen[str]:
    """``python -m connic run ARGS``, its output (standard error too) in a pipe, without waiting for a banner."""
    return subprocess.Popen(
        [sys.executable, "-m", "connic", "run", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=ROOT,
    )


async def test_a_worker_that_listened_then_died_during_start_up_is_not_said_to_have_never_listened(
    tmp_path: Path,
) -> None:
    # One worker listens, serves a connection and dies while the other still starts: the start
    # fails (exit 1), but the parent said the dead worker "exited ... before it was listening",
    # sending the user looking for an error at start-up where there was none.
    site = tmp_path / "site"
    site.mkdir()
    (site / "fragile_agent.py").write_text(FRAGILE_AGENT)
    path = tmp_path / "connic.toml"
    path.write_text('[agents.f]\nuse = "fragile_agent:Fragile"\n[[connectors]]\nresume_window = 0\n')
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {
        **os.environ,
        "FIRST_MARK": str(tmp_path / "first"),
        "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]),
    }
    proc = spawn("--port", str(port), "--workers", "2", "--config", str(path), env={**env, "CONNIC_SECRET": "s"})
    try:
        deadline = asyncio.get_running_loop().time() + 60
        while True:  # the quick worker listens alone: every connection is its own
            try:
                ws = await websockets.connect(f"ws://127.0.0.1:{port}/ws", open_timeout=5)
                break
            except OSError:
                assert asyncio.get_running_loop().time() < deadline, "no worker listened within 60 s"
                await asyncio.sleep(0.05)
        await ws.send(json.dumps({"secret": "s"}))
        await ws.send(json.dumps({"message": "die"}))
        out, _ = await asyncio.to_thread(proc.communicate, timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 1, out
    assert "listening on" not in out, out
    said = r"connic: error: worker \d \(pid \d+\) exited with status 1 before every worker was listening"
    assert re.search(said, out), out
    assert "before it was listening" not in out, out


SLOW_IMPORT_AGENT = '''
import os
import time

import connic

open(os.environ["IMPORT_MARK"], "w").close()
time.sleep(60)  # a heavy SDK being imported


class Slow(connic.Agent):
    """Never gets this far in the test."""

    async def respond(self, turn):
        yield turn.message
'''


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_ctrl_c_while_the_configuration_loads_exits_130_without_a_traceback(tmp_path: Path, workers: str) -> None:
    # Ctrl+C while an agent's module is still being imported (a heavy SDK: seconds), before any
    # signal handler of connic's: a KeyboardInterrupt traceback of some forty lines, ending in
    # whatever the import was doing, where a shell expects a quiet exit 130.
    site = tmp_path / "site"
    site.mkdir()
    (site / "slow_agent.py").write_text(SLOW_IMPORT_AGENT)
    mark = tmp_path / "importing"
    path = tmp_path / "connic.toml"
    path.write_text('[agents.s]\nuse = "slow_agent:Slow"\n[[connectors]]\nresume_window = 0\n')
    env = {
        **os.environ,
        "IMPORT_MARK": str(mark),
        "CONNIC_SECRET": "s",
        "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]),
    }
    proc = spawn("--port", "0", "--workers", workers, "--config", str(path), env=env)
    try:
        deadline = asyncio.get_running_loop().time() + 60
        while not mark.exists():
            assert proc.poll() is None and asyncio.get_running_loop().time() < deadline, "the agent was never imported"
            await asyncio.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        out, _ = await asyncio.to_thread(proc.communicate, timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 128 + signal.SIGINT, out
    assert "Traceback" not in out and "KeyboardInterrupt" not in out, out


async def test_workers_recycled_one_after_another_do_not_stop_the_server(
    tmp_path: Path,
    workers_cli: Cli,  # noqa: F811  (the fixture imported above)
    connect: Connect,
) -> None:
    # `kill -TERM <worker>` for each worker, then again for their replacements (a script
    # recycling workers): each drains, exits 0 and is started again. These exits counted as a
    # worker that cannot stay up: the fourth within 10 s made the parent give up, exit 1, and
    # drain the workers just started, taking every connection with it.
    server = workers_cli("--config", str(config(tmp_path)), "--secret", "s")
    output = Output(server)
    pids = worker_pids(server)
    seen = list(pids)
    for _ in range(2):
        for pid in pids:
            os.kill(pid, signal.SIGTERM)
        new = []
        for index, pid in enumerate(pids, 1):
            m = await output.wait_for(
                rf"connic: worker {index} \(pid {pid}\) exited with status 0; restarted as pid (\d+)"
            )
            new.append(int(m.group(1)))
        for index, pid in enumerate(new, 1):
            await output.wait_for(rf"connic: worker {index} \(pid {pid}\) listening", timeout=60)
        pids = new
        seen += new
    assert server.proc.poll() is None, output.text()
    for client in (await clients_on(output, connect, server, set(pids), "s")).values():
        frames = await client.reply({"message": "still serving"})
        assert frames[-1]["full_response"] == "still serving", frames
    code, _ = server.stop(timeout=60)
    assert code == 0, output.text()
    assert "giving up" not in output.text()
    await wait_exited(seen)
