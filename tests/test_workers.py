"""``python -m connic run --workers N``, black-box: a supervising parent and N worker processes on one port.

Real subprocesses on loopback. Which worker served a connection is read from the
workers' log lines (``open session=ID`` carries ``[worker N pid P]``); the kernel
picks the worker (SO_REUSEPORT), so tests open connections until each worker
they need has one, within a bound.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import aiohttp
import pytest
from test_cli import assert_echo, connic_cmd, one_error_line, write

from conftest import ROOT, Client, CliServer, Connect

Cli = Callable[..., CliServer]
THIRTY_WORDS = " ".join(f"word{i}" for i in range(30))
MAX_TRIES = 48
"""Connections opened at most while waiting for one to land on a given worker (each is a coin toss)."""


def config(tmp_path: Path, *, delay: float = 0.0, grace: float = 10, server: str = "", extra: str = "") -> Path:
    return write(
        tmp_path / "workers.toml",
        f'[server]\nshutdown_grace = {grace}\n{server}\n[agents.echo]\nuse = "echo"\ndelay = {delay}\n\n'
        f"[[connectors]]\nresume_window = 0\n{extra}",
    )


class Output:
    """Everything the server prints after its banner, read in a thread (stdout and stderr together)."""

    def __init__(self, server: CliServer) -> None:
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._ended = False
        self._thread = threading.Thread(target=self._read, args=(server,), daemon=True)
        self._thread.start()

    def _read(self, server: CliServer) -> None:
        assert server.proc.stdout is not None
        try:
            for line in server.proc.stdout:
                with self._changed:
                    self.lines.append(line.rstrip("\n"))
                    self._changed.notify_all()
        except ValueError:
            pass  # the fixture closed the pipe after a failed test
        with self._changed:
            self._ended = True
            self._changed.notify_all()

    def _search(self, pattern: str, timeout: float) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for line in self.lines:
                    if m := re.search(pattern, line):
                        return m
                left = deadline - time.monotonic()
                if self._ended or left <= 0:
                    raise AssertionError(f"no line matches {pattern!r}:\n" + "\n".join(self.lines))
                self._changed.wait(left)

    async def wait_for(self, pattern: str, timeout: float = 20) -> re.Match[str]:
        """The first line matching ``pattern``, waiting for it up to ``timeout`` seconds."""
        return await asyncio.to_thread(self._search, pattern, timeout)

    def text(self) -> str:
        self._thread.join(timeout=30)
        return "\n".join(self.lines)


def worker_pids(server: CliServer) -> list[int]:
    """The workers' pids, from the banner line ``workers: N (pids P1 P2)``."""
    for line in server.banner:
        if m := re.search(r"workers: \d+ \(pids ([\d ]+)\)", line):
            return [int(p) for p in m.group(1).split()]
    raise AssertionError("no workers line in the banner:\n" + "\n".join(server.banner))


def exited(pid: int) -> bool:
    """The process is gone or a zombie (its parent may be gone too, and nobody reaps it)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def process_group(pid: int) -> int:
    """The process group of a live process, from /proc."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
        return int(stat.read().rsplit(")", 1)[1].split()[2])


async def wait_exited(pids: list[int], timeout: float = 30) -> None:
    """Every process in ``pids`` exits within ``timeout`` seconds."""

    def poll() -> None:
        deadline = time.monotonic() + timeout
        while not all(exited(pid) for pid in pids):
            assert time.monotonic() < deadline, [pid for pid in pids if not exited(pid)]
            time.sleep(0.1)

    await asyncio.to_thread(poll)


@pytest.fixture
def workers_cli(cli: Cli) -> Iterator[Cli]:
    """``cli`` with ``--workers 2``; workers left behind by a failed test are killed."""
    started: list[CliServer] = []

    def run(*args: str, env: Mapping[str, str] | None = None) -> CliServer:
        server = cli("--workers", "2", *args, env=env)
        started.append(server)
        return server

    yield run
    for server in started:
        if server.proc.poll() is None:
            server.proc.kill()
        for pid in worker_pids(server):
            if not exited(pid):
                os.kill(pid, signal.SIGKILL)


async def served_by(output: Output, client: Client) -> int:
    """The pid of the worker that logged the opening of this client's session."""
    session = client.connected["session_id"]  # type: ignore[attr-defined]
    m = await output.wait_for(rf"\[worker \d+ pid (\d+)\]: open session={re.escape(session)} ")
    return int(m.group(1))


async def clients_on(
    output: Output, connect: Connect, server: CliServer, pids: set[int], secret: str | None
) -> dict[int, Client]:
    """Open connections until one has landed on each of ``pids``; each chats once."""
    found: dict[int, Client] = {}
    for _ in range(MAX_TRIES):
        client = await connect(server.url, secret=secret)
        pid = await served_by(output, client)
        found.setdefault(pid, client)
        if pids <= set(found):
            return found
    raise AssertionError(f"{MAX_TRIES} connections and none on {pids - set(found)}: {sorted(found)}")


# --- serving -------------------------------------------------------------------------


async def test_two_workers_share_the_port_and_the_generated_secret(
    tmp_path: Path, workers_cli: Cli, connect: Connect
) -> None:
    server = workers_cli("--config", str(config(tmp_path)))
    pids = worker_pids(server)
    assert len(set(pids)) == 2 and server.proc.pid not in pids, pids
    assert server.secret, server.banner  # generated once, by the parent
    assert sum("listening on" in line for line in server.banner) == 1, server.banner
    output = Output(server)
    clients = await clients_on(output, connect, server, set(pids), server.secret)
    # Both workers accept the one secret the banner shows, and answer.
    for client in clients.values():
        await assert_echo(client)
    code, _ = server.stop()
    assert code == 0, output.text()
    await wait_exited(pids)


async def test_a_killed_worker_is_restarted(tmp_path: Path, workers_cli: Cli, connect: Connect) -> None:
    server = workers_cli("--config", str(config(tmp_path)), "--secret", "s")
    first, second = worker_pids(server)
    output = Output(server)
    os.kill(first, signal.SIGKILL)
    m = await output.wait_for(
        rf"connic: worker 1 \(pid {first}\) exited with signal 9 \(SIGKILL\); restarted as pid (\d+)"
    )
    new = int(m.group(1))
    await output.wait_for(rf"connic: worker 1 \(pid {new}\) listening")
    # New connections keep working, on the new worker and on the one that never died.
    clients = await clients_on(output, connect, server, {new, second}, "s")
    for client in clients.values():
        await assert_echo(client)
    assert server.proc.poll() is None
    code, _ = server.stop()
    assert code == 0, output.text()
    await wait_exited([new, second])


async def test_workers_that_keep_dying_stop_the_server(tmp_path: Path, workers_cli: Cli) -> None:
    server = workers_cli("--config", str(config(tmp_path)), "--secret", "s")
    first, second = worker_pids(server)
    output = Output(server)
    # Three deaths in well under 10 s: two restarts are allowed (one per worker), not a third.
    os.kill(first, signal.SIGKILL)
    os.kill(second, signal.SIGKILL)
    m = await output.wait_for(r"connic: worker 1 \(pid \d+\) exited with .*; restarted as pid (\d+)")
    os.kill(int(m.group(1)), signal.SIGKILL)
    code = await asyncio.to_thread(server.proc.wait, 30)
    text = output.text()
    assert code == 1, text
    assert re.search(
        r"connic: error: worker \d \(pid \d+\) exited with .*: 3 workers exited within 10 s, giving up", text
    )
    assert "Traceback" not in text, text
    restarted = [int(p) for p in re.findall(r"restarted as pid (\d+)", text)]
    await wait_exited([first, second, *restarted])


async def test_parent_killed_the_workers_drain_and_exit(tmp_path: Path, workers_cli: Cli, connect: Connect) -> None:
    server = workers_cli("--config", str(config(tmp_path, delay=0.05)), "--secret", "s")
    pids = worker_pids(server)
    output = Output(server)
    client = await connect(server.url, secret="s")
    await client.send({"id": "m1", "message": THIRTY_WORDS})
    before = await client.until("stream_chunk")
    server.proc.kill()  # SIGKILL: the parent cannot tell anyone
    code, after = await client.closed(timeout=20)
    ends = [f for f in before + after if f["type"] == "stream_end"]
    assert [e["full_response"] for e in ends] == [THIRTY_WORDS], after
    assert code == 1001, after
    await wait_exited(pids)
    assert re.search(r"connic: worker \d \(pid \d+\): the supervising parent is gone", output.text())


# --- shutting down -------------------------------------------------------------------


@pytest.mark.parametrize("sig", [pytest.param(signal.SIGTERM, id="SIGTERM"), pytest.param(signal.SIGINT, id="SIGINT")])
async def test_signal_drains_every_worker_then_exit_0(
    tmp_path: Path, workers_cli: Cli, connect: Connect, sig: signal.Signals
) -> None:
    server = workers_cli("--config", str(config(tmp_path, delay=0.05)), "--secret", "s")
    pids = worker_pids(server)
    output = Output(server)
    clients = await clients_on(output, connect, server, set(pids), "s")
    for client in clients.values():
        await client.send({"id": "slow", "message": THIRTY_WORDS})
    befores = {pid: await client.until("stream_chunk") for pid, client in clients.items()}

    server.proc.send_signal(sig)
    for pid, client in clients.items():
        code, after = await client.closed(timeout=20)
        frames = befores[pid] + after
        ends = [f for f in frames if f["type"] == "stream_end"]
        assert [e["full_response"] for e in ends] == [THIRTY_WORDS], (pid, frames)
        assert ends[0]["finish_reason"] == "stop"
        assert code == 1001, (pid, frames)
    assert await asyncio.to_thread(server.proc.wait, 30) == 0, output.text()
    text = output.text()
    for index, pid in enumerate(pids, 1):
        assert f"connic: worker {index} (pid {pid}): shutting down" in text, text
    assert "Traceback" not in text and "error" not in text, text
    await wait_exited(pids)


async def test_second_signal_kills_the_workers_at_once(tmp_path: Path, workers_cli: Cli, connect: Connect) -> None:
    # 60 words at 0.5 s each: a drain would wait 30 s (grace 60 s).
    server = workers_cli("--config", str(config(tmp_path, delay=0.5, grace=60)), "--secret", "s")
    pids = worker_pids(server)
    output = Output(server)
    client = await connect(server.url, secret="s")
    await client.send({"id": "m1", "message": " ".join(["w"] * 60)})
    await client.until("stream_chunk")
    server.proc.send_signal(signal.SIGTERM)
    await output.wait_for(r"^connic: shutting down")
    server.proc.send_signal(signal.SIGTERM)
    try:
        code = await asyncio.to_thread(server.proc.wait, 15)
    except subprocess.TimeoutExpired:
        pytest.fail("the second signal did not stop the server: it kept draining")
    assert code == 128 + signal.SIGTERM, output.text()
    assert "connic: SIGTERM again, stopping at once" in output.text()
    await wait_exited(pids, timeout=15)
    _, frames = await client.closed(timeout=10)
    assert not [f for f in frames if f["type"] == "stream_end"], frames


def start_workers(path: Path, *args: str, own_group: bool = False, timeout: float = 60) -> CliServer:
    """``connic run --workers 2 --config PATH ARGS``, its banner read within ``timeout`` seconds.

    ``own_group``: the server leads a process group of its own, as a shell runs a foreground job.
    """
    proc = subprocess.Popen(
        [sys.executable, "-m", "connic", "run", "--port", "0", "--workers", "2", "--config", str(path), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        cwd=ROOT,
        start_new_session=own_group,
    )
    banner: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            banner.append(line.rstrip("\n"))
            if line.startswith("Press Ctrl+C"):
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout)
    if reader.is_alive() or not banner or not banner[-1].startswith("Press Ctrl+C"):
        proc.kill()
        proc.communicate()
        raise AssertionError(f"no banner within {timeout:g} s:\n" + "\n".join(banner))
    m = re.search(r"listening on http://[^:]+:(\d+)", banner[0])
    assert m, banner
    return CliServer(proc, int(m.group(1)), None, banner)


async def test_ctrl_c_in_the_terminal_drains_politely(tmp_path: Path, connect: Connect) -> None:
    # A terminal's Ctrl+C sends SIGINT to the whole foreground process group. Were the workers
    # in the parent's group, each would get it and then the parent's SIGTERM: two signals,
    # which stop a worker at once, cutting the reply off, whenever the SIGTERM comes after
    # the worker has begun its drain. That is a race the worker usually wins, so the groups
    # themselves are checked too.
    server = start_workers(config(tmp_path, delay=0.05), "--secret", "s", own_group=True)
    try:
        pids = worker_pids(server)
        assert all(process_group(pid) != server.proc.pid for pid in pids), [process_group(p) for p in pids]
        output = Output(server)
        clients = await clients_on(output, connect, server, set(pids), "s")
        for client in clients.values():
            await client.send({"id": "slow", "message": THIRTY_WORDS})
            await client.until("stream_chunk")
        os.killpg(server.proc.pid, signal.SIGINT)
        for client in clients.values():
            code, frames = await client.closed(timeout=20)
            ends = [f for f in frames if f["type"] == "stream_end"]
            assert [e["full_response"] for e in ends] == [THIRTY_WORDS], frames
            assert code == 1001
        assert await asyncio.to_thread(server.proc.wait, 30) == 0, output.text()
        assert "stopping at once" not in output.text()
    finally:
        if server.proc.poll() is None:
            os.killpg(server.proc.pid, signal.SIGKILL)
            server.proc.wait()
        for pid in worker_pids(server):
            if not exited(pid):
                os.kill(pid, signal.SIGKILL)


async def test_a_large_configuration_reaches_every_worker(tmp_path: Path, connect: Connect) -> None:
    # Over 1 MB of secrets: more than a socket pair's buffer holds before the worker reads.
    many = [f"secret-{i:06d}-" + "x" * 100 for i in range(10_000)]
    path = config(tmp_path, extra="secrets = [" + ", ".join(f'"{s}"' for s in many) + "]\n")
    server = start_workers(path)
    try:
        pids = worker_pids(server)
        output = Output(server)
        for client in (await clients_on(output, connect, server, set(pids), many[-1])).values():
            await assert_echo(client)
        server.proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(server.proc.wait, 30) == 0, output.text()
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait()
        for pid in worker_pids(server):
            if not exited(pid):
                os.kill(pid, signal.SIGKILL)


FAILING_AGENT = """
import connic


class Failing(connic.Agent):
    \"\"\"Cannot start: its backend is down.\"\"\"

    async def start(self):
        raise RuntimeError("the backend is down")

    async def respond(self, turn):
        yield "never"
"""


def failing_agent_site(tmp_path: Path) -> dict[str, str]:
    """A directory holding an agent whose start() fails, and the entry point naming it, for PYTHONPATH."""
    site = tmp_path / "site"
    info = site / "failing_agent-0.1.dist-info"
    info.mkdir(parents=True)
    write(site / "failing_agent.py", FAILING_AGENT)
    write(info / "METADATA", "Metadata-Version: 2.1\nName: failing-agent\nVersion: 0.1\n")
    write(info / "entry_points.txt", "[connic.agents]\nfailing = failing_agent:Failing\n")
    return {"PYTHONPATH": str(site) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def test_a_worker_that_cannot_start_fails_the_start(tmp_path: Path) -> None:
    path = config(tmp_path)
    done = connic_cmd(
        "run",
        "--port",
        "0",
        "--workers",
        "2",
        "--config",
        str(path),
        "--agent",
        "failing",
        "--secret",
        "s",
        env=failing_agent_site(tmp_path),
    )
    assert done.returncode == 1, done
    assert re.search(r"connic: error: worker \d \(pid \d+\) exited with status 1 before it was listening", done.stderr)
    assert "the backend is down" in done.stderr  # the worker's own error, above
    assert "listening on" not in done.stdout, done.stdout


# --- refusals ------------------------------------------------------------------------


def test_memory_store_with_resume_refuses_several_workers() -> None:
    line = one_error_line(connic_cmd("run", "--port", "0", "--workers", "2"))
    assert "--workers 2" in line and "connectors[0].resume_window is 120" in line, line
    assert "[store]" in line and "set resume_window = 0 on each connector" in line, line


def test_resume_on_any_connector_refuses_several_workers(tmp_path: Path) -> None:
    path = config(tmp_path, extra='\n[[connectors]]\npath = "/other"\nresume_window = 5\n')
    line = one_error_line(connic_cmd("run", "--port", "0", "--workers", "3", "--config", str(path)))
    assert "connectors[1].resume_window is 5" in line, line


def test_metrics_port_refuses_several_workers(tmp_path: Path) -> None:
    path = config(tmp_path, server="metrics_port = 9\n")
    line = one_error_line(connic_cmd("run", "--port", "0", "--workers", "2", "--config", str(path)))
    assert "server.metrics_port" in line and "metrics_port = 0" in line, line


def test_zero_workers_is_refused() -> None:
    line = one_error_line(connic_cmd("run", "--port", "0", "--workers", "0"))
    assert line == "connic: error: --workers: must be at least 1, got 0"


def test_port_in_use_is_refused_before_any_worker_starts(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = connic_cmd("run", "--port", str(port), "--workers", "2", "--config", str(config(tmp_path)))
    line = one_error_line(done)
    assert f"error while attempting to bind on address ('127.0.0.1', {port})" in line, line


def test_a_worker_run_by_hand_says_what_it_is() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "connic.workers"], stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2, done
    assert done.stderr.splitlines() == [
        "connic: error: python -m connic.workers is a worker of `connic run --workers N`, not run by hand"
    ]


async def test_one_scrape_shows_every_workers_metrics(tmp_path: Path, workers_cli: Cli, connect: Connect) -> None:
    server = workers_cli("--config", str(config(tmp_path)), "--secret", "s")
    pids = set(worker_pids(server))
    output = Output(server)
    clients = await clients_on(output, connect, server, pids, "s")
    for client in clients.values():
        await assert_echo(client)
    url = f"http://127.0.0.1:{server.port}/metrics"
    async with aiohttp.ClientSession() as http:
        for _ in range(6):  # each scrape lands on one worker or the other: every one shows the sum
            async with http.get(url) as response:
                text = await response.text()
            assert re.search(r'^connic_messages_total\{connector="/ws"\} 2\.0$', text, re.M), text
    code, _ = server.stop()
    assert code == 0, output.text()
