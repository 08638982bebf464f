"""``connic run --workers N`` supervised as a deployer needs: a worker stuck starting, a parent killed outright.

Real ``python -m connic run --workers 2`` processes, real WebSocket clients on loopback.
Every wait is bounded; nothing is timed.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import pytest
from test_workers import (
    Cli,
    Output,
    clients_on,
    config,
    exited,
    wait_exited,
    worker_pids,
    workers_cli,  # noqa: F401  (a fixture)
)

from conftest import ROOT, Connect

STUCK_AGENT = '''
import asyncio
import os
import time

import connic


class Stuck(connic.Agent):
    """Its start() never returns while the file STUCK_MARK exists (awaiting, or blocking the loop: STUCK_HOW).

    Stuck, it says so in STUCK_MARK.PID.
    """

    async def start(self):
        mark = os.environ["STUCK_MARK"]
        if os.path.exists(mark):
            open(f"{mark}.{os.getpid()}", "w").close()
        while os.path.exists(mark):
            if os.environ.get("STUCK_HOW") == "blocking":
                time.sleep(3600)
            await asyncio.sleep(3600)

    async def respond(self, turn):
        yield turn.message
'''


def stuck_site(tmp_path: Path, *, server: str = "") -> tuple[Path, dict[str, str]]:
    """A configuration serving the Stuck agent (as 'stuck'), and the environment its workers need."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "stuck_agent.py").write_text(STUCK_AGENT)
    path = tmp_path / "connic.toml"
    path.write_text(
        f'[server]\n{server}\n[agents.echo]\nuse = "echo"\n[agents.stuck]\nuse = "stuck_agent:Stuck"\n'
        "[[connectors]]\nresume_window = 0\n"
    )
    env = {
        "STUCK_MARK": str(tmp_path / "stuck"),
        "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]),
    }
    return path, env


def spawn(*args: str, env: Mapping[str, str]) -> subprocess.Popen[str]:
    """``python -m connic run ARGS``, its output (standard error too) in a pipe, without waiting for a banner."""
    return subprocess.Popen(
        [sys.executable, "-m", "connic", "run", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
        cwd=ROOT,
    )


# --- a worker stuck starting ---------------------------------------------------------------


@pytest.mark.parametrize("how", ["awaiting", "blocking"])
async def test_a_worker_stuck_in_an_agents_start_fails_the_start_within_start_timeout(tmp_path: Path, how: str) -> None:
    # An agent's start() that never returns (a service that accepts the connection and never
    # answers): the parent waited for the worker to listen for ever, printing nothing, the port
    # never served, and a service manager saw a process that neither served nor exited.
    path, env = stuck_site(tmp_path, server="start_timeout = 15")
    (tmp_path / "stuck").touch()
    proc = spawn("--port", "0", "--workers", "2", "--config", str(path), env={**env, "STUCK_HOW": how})
    try:
        out, _ = await asyncio.to_thread(proc.communicate, timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            out, _ = proc.communicate()
    assert proc.returncode == 1, out
    assert "listening on" not in out and "Traceback" not in out, out
    said = (
        r"connic: error: worker \d \(pid (\d+)\) did not start within 15 s \(server.start_timeout\): "
        r"stuck in agent 'stuck' start\(\); stopped it"
    )
    m = re.search(said, out)
    assert m, out
    await wait_exited([int(p) for p in re.findall(r"worker \d \(pid (\d+)\)", out)])


async def test_a_restarted_worker_stuck_starting_is_stopped_and_started_again(
    tmp_path: Path,
    workers_cli: Cli,  # noqa: F811  (the fixture imported above)
    connect: Connect,
) -> None:
    # Once the server runs, a worker started again that gets stuck starting is a failed start:
    # stopped after start_timeout and started again later, while the other worker serves on.
    path, env = stuck_site(tmp_path, server="start_timeout = 15")
    server = workers_cli("--config", str(path), "--secret", "s", env=env)
    first, second = worker_pids(server)
    output = Output(server)
    (tmp_path / "stuck").touch()
    os.kill(first, signal.SIGKILL)
    m = await output.wait_for(rf"connic: worker 1 \(pid {first}\) exited with .*; restarted as pid (\d+)")
    stuck = int(m.group(1))
    await output.wait_for(
        rf"connic: worker 1 \(pid {stuck}\) did not start within 15 s \(server.start_timeout\): "
        r"stuck in agent 'stuck' start\(\); starting it again in 1 s",
        timeout=60,
    )
    await wait_exited([stuck])
    assert server.proc.poll() is None, output.text()
    client = (await clients_on(output, connect, server, {second}, "s"))[second]
    frames = await client.reply({"message": "still here"})
    assert frames[-1]["full_response"] == "still here", frames
    (tmp_path / "stuck").unlink()
    m = await output.wait_for(r"connic: worker 1 \(pid (\d+)\) listening", timeout=60)
    new = int(m.group(1))
    code, _ = server.stop(timeout=60)
    assert code == 0, output.text()
    await wait_exited([second, new])


# --- the parent killed outright ------------------------------------------------------------


async def test_workers_stuck_starting_exit_when_the_parent_is_killed(tmp_path: Path) -> None:
    # `kill -9` of the parent (the OOM killer, a container runtime) while its workers start: a
    # worker finds out from its link only once it listens, so one stuck in an agent's start()
    # stayed for ever, an orphan of init, holding whatever its agent had opened.
    path, env = stuck_site(tmp_path)
    (tmp_path / "stuck").touch()
    proc = spawn("--port", "0", "--workers", "2", "--config", str(path), env={**env, "CONNIC_SECRET": "s"})
    try:
        pids = await asyncio.to_thread(stuck_workers, tmp_path, proc, 2)
        proc.kill()
        await asyncio.to_thread(proc.wait, 30)
        await wait_exited(pids, timeout=60)
        out, _ = await asyncio.to_thread(proc.communicate, timeout=30)  # the workers shared the pipe
        assert "Traceback" not in out, out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        for pid in stuck_pids(tmp_path):
            if not exited(pid):
                os.kill(pid, signal.SIGKILL)


def stuck_pids(tmp_path: Path) -> list[int]:
    """The workers that got stuck in the Stuck agent's start() so far."""
    return [int(p.name.rsplit(".", 1)[1]) for p in tmp_path.glob("stuck.*")]


def stuck_workers(tmp_path: Path, proc: subprocess.Popen[str], count: int) -> list[int]:
    """The pids of ``count`` workers once each is stuck in the Stuck agent's start() (waiting ≤ 60 s)."""
    deadline = time.monotonic() + 60
    while len(pids := stuck_pids(tmp_path)) < count:
        assert proc.poll() is None and time.monotonic() < deadline, (proc.poll(), pids)
        time.sleep(0.1)
    return pids


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", ""])
    proc.wait()
    return proc.pid


async def test_a_killed_parents_metrics_directory_is_removed_by_the_next_start(
    tmp_path: Path,
    workers_cli: Cli,  # noqa: F811  (the fixture imported above)
) -> None:
    # The parent makes a temporary directory for the workers' metrics (prometheus-client's
    # multiprocess files) and removes it as it exits; killed (kill -9, the OOM killer), it left
    # the directory behind, one more per kill (/tmp filled up with connic-metrics-* directories).
    temp = tmp_path / "tmp"
    temp.mkdir()
    env = {"TMPDIR": str(temp)}
    server = workers_cli("--config", str(config(tmp_path)), "--secret", "s", env=env)
    pids = worker_pids(server)
    [stale] = temp.glob("connic-metrics-*")
    server.proc.kill()
    await asyncio.to_thread(server.proc.wait, 30)
    await wait_exited(pids)  # each noticed its parent was gone, drained and exited
    assert stale.is_dir(), "no metrics directory left behind: nothing to clean up"
    # Not removed: a directory whose parent lives, and one whose parent is gone but a worker lives (draining).
    alive = temp / f"connic-metrics-{os.getpid()}-alive"
    orphaned = temp / f"connic-metrics-{dead_pid()}-draining"
    for kept in (alive, orphaned):
        kept.mkdir()
    (orphaned / f"counter_{os.getpid()}.db").touch()

    again = workers_cli("--config", str(config(tmp_path)), "--secret", "s", env=env)
    assert not stale.exists(), list(temp.iterdir())
    assert alive.is_dir() and orphaned.is_dir(), list(temp.iterdir())
    [own] = set(temp.glob("connic-metrics-*")) - {alive, orphaned}
    code, out = again.stop(timeout=60)
    assert code == 0, out
    assert not own.exists()
