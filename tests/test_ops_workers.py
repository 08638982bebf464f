"""``--workers N`` on the ``redis`` store when Redis is down: at start, one line per worker and exit 1;
while running, a worker that dies waits for Redis instead of taking the server down.

Real ``python -m connic run --workers 2`` processes on a private ``redis-server``
(tests/redis_server.py), real clients on loopback; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis_server import (
    RedisServer,
    redis_server_fixture,  # noqa: F401  (a fixture)
    store_plugin_env,
)
from resume_helpers import (
    Clients,
    ResumeSession,
    clients_fixture,  # noqa: F401  (a fixture)
)
from test_cli import connic_cmd, one_error_line, write
from test_redis_fleet import chat, status_within
from test_workers import THIRTY_WORDS, Output, clients_on, config, exited, wait_exited, worker_pids

from conftest import ROOT, SECRET, CliServer, Connect, start_cli

pytest.importorskip("redis.asyncio", reason="redis-py is not installed (pip install 'connic[redis]')")


def redis_config(tmp_path: Path, url: str) -> Path:
    path = tmp_path / "connic.toml"
    path.write_text(
        f'[agents.assistant]\nuse = "echo"\n[[connectors]]\npath = "/ws"\nsecrets = ["{SECRET}"]\n'
        f'[store]\nuse = "redis"\nurl = "{url}"\ntimeout = 1\n'
    )
    return path


@pytest.fixture
def started(tmp_path: Path) -> Iterator[list[CliServer]]:
    """Servers a test starts; killed (with their workers) if the test left them running."""
    servers: list[CliServer] = []
    yield servers
    for server in servers:
        if server.proc.poll() is None:
            server.proc.kill()
        for pid in worker_pids(server):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_redis_down_at_start_with_workers_is_one_line_per_worker_and_exit_1(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    url = redis_server.url
    redis_server.stop()
    config = redis_config(tmp_path, url)
    done = connic_cmd("run", "--port", "0", "--workers", "2", "--config", str(config), env=store_plugin_env(tmp_path))
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.strip().splitlines()
    assert all(line.startswith("connic: error: ") for line in lines), done.stderr
    assert any("[store] url" in line and url in line for line in lines), done.stderr


async def test_a_worker_that_dies_while_redis_is_down_waits_for_it_and_the_server_stays_up(
    tmp_path: Path, redis_server: RedisServer, clients: Clients, started: list[CliServer]
) -> None:
    config = redis_config(tmp_path, redis_server.url)
    env = store_plugin_env(tmp_path / "plugins")
    server = await asyncio.to_thread(start_cli, "--config", str(config), "--workers", "2", env=env)
    started.append(server)
    first, second = worker_pids(server)
    output = Output(server)
    redis_server.stop()
    os.kill(first, signal.SIGKILL)
    # Restarted, it cannot reach Redis: started again later and later, as many times as it takes,
    # never counted towards giving up (that was 3 exits within 10 s, and the whole server down).
    for attempt in (1, 2, 4):
        await output.wait_for(
            rf"connic: worker 1 \(pid \d+\) could not reach the session store; starting it again in {attempt} s",
            timeout=30,
        )
    assert server.proc.poll() is None, output.text()
    assert not re.search(r"giving up", "\n".join(output.lines)), output.lines
    assert not exited(second)  # the worker that never died serves on
    redis_server.start()
    m = await output.wait_for(r"connic: worker 1 \(pid (\d+)\) listening", timeout=30)
    new = int(m.group(1))
    assert await status_within(server.url, None, 10)
    for _ in range(4):  # a few new sessions, wherever the kernel puts them
        session = ResumeSession(clients, server.url)
        assert (await chat(await session.start(), "m1", "back"))["full_response"] == "back"
    code, _ = await asyncio.to_thread(server.stop)
    assert code == 0, output.text()
    await wait_exited([new, second])


async def test_signal_while_a_worker_waits_for_redis_still_exits_0(
    tmp_path: Path, redis_server: RedisServer, started: list[CliServer]
) -> None:
    config = redis_config(tmp_path, redis_server.url)
    env = store_plugin_env(tmp_path / "plugins")
    server = await asyncio.to_thread(start_cli, "--config", str(config), "--workers", "2", env=env)
    started.append(server)
    first, second = worker_pids(server)
    output = Output(server)
    redis_server.stop()
    os.kill(first, signal.SIGKILL)
    await output.wait_for(r"connic: worker 1 \(pid \d+\) could not reach the session store; starting it again in 1 s")
    code, _ = await asyncio.to_thread(server.stop)
    assert code == 0, output.text()
    await wait_exited([second])


def test_a_second_server_with_workers_on_the_same_port_is_refused(tmp_path: Path, started: list[CliServer]) -> None:
    # SO_REUSEPORT lets any process of the same user bind the port: the second server used to
    # start, and the kernel split new connections between two servers (two configurations,
    # two generated secrets). Without --workers the second one is refused; so it is with them.
    config = write(tmp_path / "connic.toml", '[agents.echo]\nuse = "echo"\n[[connectors]]\nresume_window = 0\n')
    first = start_cli("--config", str(config), "--workers", "2", "--secret", "s")
    started.append(first)
    for workers in ("2", "1"):
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "connic",
                "run",
                "--port",
                str(first.port),
                "--config",
                str(config),
                "--workers",
                workers,
            ],
            capture_output=True,
            text=True,
            timeout=20,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH", "")},
        )
        line = one_error_line(done)
        assert "address already in use" in line and str(first.port) in line, line
    assert first.proc.poll() is None  # the first server serves on


async def test_sigterm_to_every_process_at_once_still_drains_then_exit_0(
    tmp_path: Path, started: list[CliServer], connect: Connect
) -> None:
    # What systemd's default KillMode=control-group (or `pkill`) does: SIGTERM to the parent and to
    # every worker together. The parent's own SIGTERM to each worker used to be that worker's second
    # signal: it stopped at once, cutting the replies under way (1006), and the parent exited 1.
    server = start_cli("--config", str(config(tmp_path, delay=0.05)), "--workers", "2", "--secret", "s")
    started.append(server)
    pids = worker_pids(server)
    output = Output(server)
    clients = await clients_on(output, connect, server, set(pids), "s")
    for client in clients.values():
        await client.send({"id": "slow", "message": THIRTY_WORDS})
    befores = {pid: await client.until("stream_chunk") for pid, client in clients.items()}
    for pid in (server.proc.pid, *pids):
        os.kill(pid, signal.SIGTERM)
    for pid, client in clients.items():
        code, after = await client.closed(timeout=20)
        ends = [f for f in befores[pid] + after if f["type"] == "stream_end"]
        assert [e["full_response"] for e in ends] == [THIRTY_WORDS], (pid, after)
        assert code == 1001, (pid, after)
    assert await asyncio.to_thread(server.proc.wait, 30) == 0, output.text()
    assert "again, stopping at once" not in output.text()
    await wait_exited(pids)
