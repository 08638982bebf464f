"""Operations under attack, second round: what a service manager and a broken network do to connic.

Real ``python -m connic run`` processes (``--workers 2`` for the supervisor), real clients on
loopback, a real ``redis-server`` (tests/redis_server.py): a fleet whose every worker keeps
failing to start, a replacement worker whose process cannot be made, ``--workers`` far too
large, SIGHUP (a closed terminal, a service manager's reload), and the redis store's pub/sub
listener cut off by the network without a word. Every wait is bounded; nothing is timed,
but for the listener: a cancel must reach the owner well before its lease renewal would take
it (a bound far below the renewal, far above what the check takes).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import site
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

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
from test_cli import connic_cmd, write
from test_ops_attack_workers import FLAKY_AGENT, _kill_leftovers
from test_workers import THIRTY_WORDS, Cli, Output, clients_on, config, wait_exited, worker_pids

from conftest import ROOT, SECRET, CliServer, Connect, start_cli

# --- --workers: a bound ------------------------------------------------------------------


def test_workers_beyond_the_bound_are_refused_at_once_with_exit_2() -> None:
    # --workers 100000 was taken as it came: the parent started worker after worker until the
    # machine ran out of memory or process slots. It is bad usage, refused as argparse refuses
    # `--workers abc`: exit 2, one line, before the configuration is even read.
    done = connic_cmd("run", "--port", "0", "--workers", "100000", "--config", "/nonexistent/connic.toml")
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert done.stderr.splitlines() == ["connic: error: --workers: at most 1024, got 100000"], done.stderr


# --- --workers: every worker keeps failing to start ---------------------------------------


def _flaky_env(tmp_path: Path) -> tuple[Path, Path, dict[str, str]]:
    """A configuration serving the flaky agent (tests/test_ops_attack_workers.py), its flag, and the environment."""
    site_dir = tmp_path / "site"
    site_dir.mkdir()
    (site_dir / "flaky_agent.py").write_text(FLAKY_AGENT)
    path = write(
        tmp_path / "connic.toml", '[agents.flaky]\nuse = "flaky_agent:Flaky"\n[[connectors]]\nresume_window = 0\n'
    )
    flag = tmp_path / "down"
    pythonpath = os.pathsep.join([str(site_dir), os.environ.get("PYTHONPATH", "")])
    return path, flag, {"FLAKY_FLAG": str(flag), "PYTHONPATH": pythonpath}


async def test_a_fleet_whose_every_worker_keeps_failing_to_start_exits_1_naming_the_cause(
    tmp_path: Path, connect: Connect
) -> None:
    # Every worker died (the OOM killer took them all, say) while a service the agent needs at
    # start() was down for good. Each was started again every 10 s, for ever: the parent served
    # nothing and never exited, so systemd's Restart= or a Kubernetes probe never saw a failure.
    # Once every worker has failed 5 starts in a row the parent gives up: one line, exit 1.
    path, flag, env = _flaky_env(tmp_path)
    server = await asyncio.to_thread(start_cli, "--config", str(path), "--workers", "2", "--secret", "s", env=env)
    output = Output(server)
    pids = worker_pids(server)
    try:
        flag.write_text("")
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        code = await asyncio.to_thread(server.proc.wait, 90)  # some 15 s of retries, and the start-ups
    except subprocess.TimeoutExpired:
        pytest.fail("the parent never gave up on workers that cannot start:\n" + "\n".join(output.lines))
    finally:
        _kill_leftovers(server.proc, *pids)
    text = output.text()
    assert code == 1, text
    errors = [line for line in text.splitlines() if "giving up" in line]
    assert len(errors) == 1, text
    assert errors[0].startswith(
        "connic: error: every worker failed its last 5 starts in a row and none is listening"
    ), text
    assert errors[0].endswith("could not start: flaky: the service it needs is down)"), text
    assert "Traceback" not in text, text
    # Every delay was tried, for both workers, before giving up.
    for delay in (1, 2, 4, 8):
        assert f"could not start; starting it again in {delay} s" in text, text


# --- --workers: a replacement worker whose process cannot be made --------------------------


def _python_link(tmp_path: Path) -> Path:
    """A symbolic link to this Python: a parent started through it starts its workers through it too."""
    link = tmp_path / "bin" / "python"
    link.parent.mkdir()
    link.symlink_to(sys.executable)
    return link


def _start_through(python: Path, path: Path, env: dict[str, str], timeout: float = 60) -> CliServer:
    """``PYTHON -m connic run --workers 2 --config PATH``, its banner read within ``timeout`` seconds."""
    proc = subprocess.Popen(
        [str(python), "-m", "connic", "run", "--port", "0", "--workers", "2", "--config", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "CONNIC_SECRET": "s", **env},
        cwd=ROOT,
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
    port = int(next(line for line in banner if "listening on" in line).rsplit(":", 1)[1].strip("/"))
    return CliServer(proc, port, "s", banner)


async def test_a_replacement_worker_whose_process_cannot_be_made_is_started_again_later(
    tmp_path: Path, connect: Connect
) -> None:
    # The parent's spawn of a replacement worker failed at the OS level (fork's EAGAIN at a
    # process limit, ENOMEM; here exec's ENOENT: the interpreter it runs is gone for a while).
    # The OSError escaped the supervisor: the parent printed one bare line and exited 1, taking
    # the worker that was serving down with it. It is a failed start: said, and tried again later.
    python = _python_link(tmp_path)
    path = config(tmp_path)
    env = {}
    if sys.prefix != sys.base_prefix:  # in a virtualenv: the link resolves to the base interpreter
        env["PYTHONPATH"] = os.pathsep.join([os.environ.get("PYTHONPATH", ""), *site.getsitepackages()])
    server = await asyncio.to_thread(_start_through, python, path, env)
    output = Output(server)
    pids = worker_pids(server)
    try:
        clients = await clients_on(output, connect, server, {pids[1]}, "s")
        python.unlink()
        os.kill(pids[0], signal.SIGKILL)
        await output.wait_for(r"connic: worker 1 could not be started \(\[Errno 2\] .*\); starting it again in 1 s")
        await output.wait_for(r"connic: worker 1 could not be started \(.*\); starting it again in 2 s")
        assert server.proc.poll() is None, output.text()
        frames = await clients[pids[1]].reply({"message": "still here"})
        assert frames[-1]["full_response"] == "still here"  # the worker that never died serves on
        python.symlink_to(sys.executable)
        await output.wait_for(r"connic: worker 1 \(pid \d+\) listening", timeout=30)
        server.proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(server.proc.wait, 30) == 0, output.text()
    finally:
        _kill_leftovers(server.proc, *pids)
    assert "Traceback" not in output.text()


# --- SIGHUP drains as SIGTERM does ----------------------------------------------------------


async def test_sighup_drains_a_single_process_and_exits_0(tmp_path: Path, cli: Cli, connect: Connect) -> None:
    # SIGHUP (a terminal closed, `systemctl reload`, `kill -HUP`) kept its default action: the
    # process ended at once, replies in flight cut off, clients seeing 1006. It drains as SIGTERM.
    server = cli("--config", str(config(tmp_path, delay=0.05)), "--secret", "s")
    output = Output(server)
    client = await connect(server.url, secret="s")
    await client.send({"id": "slow", "message": THIRTY_WORDS})
    before = await client.until("stream_chunk")
    server.proc.send_signal(signal.SIGHUP)
    code, after = await client.closed(timeout=20)
    ends = [f for f in before + after if f["type"] == "stream_end"]
    assert [e["full_response"] for e in ends] == [THIRTY_WORDS], before + after
    assert code == 1001
    assert await asyncio.to_thread(server.proc.wait, 30) == 0, output.text()
    assert "connic: shutting down" in output.text()


@pytest.fixture
def fleet() -> Iterator[list[CliServer]]:
    """Servers with --workers a test starts; their workers are killed if the test left them running."""
    servers: list[CliServer] = []
    yield servers
    for server in servers:
        _kill_leftovers(server.proc, *worker_pids(server))


async def test_sighup_to_the_workers_parent_drains_every_worker_and_exits_0(
    tmp_path: Path, connect: Connect, fleet: list[CliServer]
) -> None:
    # The parent of --workers died of SIGHUP at once; its workers, finding their parent gone,
    # drained on their own, but the service's main process had died of a signal (status -1).
    server = await asyncio.to_thread(
        start_cli, "--config", str(config(tmp_path, delay=0.05)), "--workers", "2", "--secret", "s"
    )
    fleet.append(server)
    pids = worker_pids(server)
    output = Output(server)
    clients = await clients_on(output, connect, server, set(pids), "s")
    for client in clients.values():
        await client.send({"id": "slow", "message": THIRTY_WORDS})
    befores = {pid: await client.until("stream_chunk") for pid, client in clients.items()}
    server.proc.send_signal(signal.SIGHUP)
    for pid, client in clients.items():
        code, after = await client.closed(timeout=20)
        ends = [f for f in befores[pid] + after if f["type"] == "stream_end"]
        assert [e["full_response"] for e in ends] == [THIRTY_WORDS], (pid, befores[pid] + after)
        assert code == 1001
    assert await asyncio.to_thread(server.proc.wait, 30) == 0, output.text()
    text = output.text()
    assert "connic: shutting down" in text and "parent is gone" not in text, text
    for index, pid in enumerate(pids, 1):
        assert f"connic: worker {index} (pid {pid}): shutting down" in text, text
    await wait_exited(pids)


# --- the redis store's pub/sub listener, its connection broken -------------------------------


class SilencingProxy:
    """A TCP proxy to Redis that can silence the pub/sub connections: a network that drops them without a word.

    A connection that sent SUBSCRIBE is a listener's. Silenced, what either end sends is read
    and dropped: no reset, no end-of-file, so neither end's socket ever fails.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.subscribed = 0
        """How many connections have sent SUBSCRIBE so far."""
        self._listeners: set[int] = set()  # the ids of the connections that sent SUBSCRIBE
        self._silenced: set[int] = set()
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self._handlers: set[asyncio.Task[Any]] = set()

    async def start(self) -> SilencingProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def silence(self) -> int:
        """Silence every listener's connection open now; how many."""
        self._silenced |= self._listeners
        return len(self._listeners)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in self._writers:
            writer.transport.abort()
        if self._handlers:  # each ends once both its ends are aborted
            await asyncio.wait(self._handlers, timeout=10)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._writers += [writer, up_writer]
        key = id(writer)
        await asyncio.gather(
            self._pump(reader, up_writer, key, outgoing=True),
            self._pump(up_reader, writer, key, outgoing=False),
            return_exceptions=True,
        )

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, key: int, *, outgoing: bool
    ) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await reader.read(65536):
                if outgoing and b"SUBSCRIBE" in data.upper() and key not in self._listeners:
                    self._listeners.add(key)
                    self.subscribed += 1
                if key in self._silenced:
                    continue
                writer.write(data)
                await writer.drain()
        writer.transport.abort()


def _owner_config(tmp_path: Path, url: str) -> Path:
    # producer_timeout = 300: the lease renewal, the fallback that takes a lost cancel, comes every
    # 100 s. A cancel that reaches the owner within 30 s came through the pub/sub listener.
    return write(
        tmp_path / "owner.toml",
        '[agents.assistant]\nuse = "echo"\n'
        f'[[connectors]]\npath = "/ws"\nsecrets = ["{SECRET}"]\nproducer_timeout = 300\n'
        f'[store]\nuse = "redis"\nurl = "{url}"\n',
    )


@contextlib.asynccontextmanager
async def _owner(tmp_path: Path, url: str) -> AsyncIterator[CliServer]:
    server = await asyncio.to_thread(
        start_cli, "--config", str(_owner_config(tmp_path, url)), env=store_plugin_env(tmp_path / "plugins")
    )
    try:
        yield server
    finally:
        server.stop(signal.SIGKILL if server.proc.poll() is None else signal.SIGTERM)


async def _pass_a_cancel(redis_url: str, session_id: str, message_id: str) -> None:
    """What a follower does to pass a cancel to the owner: the session's cancel set, then the channel."""
    import redis.asyncio as aioredis

    from connic.stores.redis.keys import cancel_channel, cancel_key

    redis = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        await redis.rpush(cancel_key("connic:", session_id), f'"{message_id}"')
        await redis.publish(cancel_channel("connic:"), session_id)
    finally:
        await redis.aclose()


async def _idle_session(clients: Clients, server: CliServer, redis_url: str) -> Any:
    """A session answered ``m1``, once the owner's first lease renewal is past (the next is 100 s away).

    The renewer, idle, looks every second: its first round with the session would take a cancel
    passed now. Its PEXPIRE of the lease is what shows that round done: the lease's time to live
    goes up.
    """
    import redis.asyncio as aioredis

    from connic.stores.redis.keys import every_key

    session = ResumeSession(clients, server.url)
    conn = await session.start()
    await conn.send({"type": "message", "id": "m1", "payload": {"message": "hello"}})
    await conn.until_ended({"m1": ["assistant"]})
    lease = every_key("connic:", session.session_id)[0]
    redis = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        last = await redis.pttl(lease)
        for _ in range(400):  # ≤ 20 s
            await asyncio.sleep(0.05)
            now = await redis.pttl(lease)
            if now > last:
                break
            last = now
        else:
            raise AssertionError("the owner did not renew its lease within 20 s")
    finally:
        await redis.aclose()
    return session, conn


async def test_a_cancel_after_the_listeners_connection_went_silent_reaches_the_owner_promptly(
    tmp_path: Path, redis_server: RedisServer, clients: Clients
) -> None:
    # A network that breaks silently (a NAT entry expired, a firewall dropping the flow): the
    # listener's connection neither errs nor ends, and the listener waited on it for ever. Every
    # cancel passed from another process then waited for the lease renewal (a third of
    # producer_timeout). The listener PINGs a silent connection, replaces one that does not
    # answer, and takes what was passed meanwhile.
    pytest.importorskip("redis.asyncio")
    proxy = await SilencingProxy(redis_server.port).start()
    try:
        async with _owner(tmp_path, f"redis://127.0.0.1:{proxy.port}/0") as server:
            session, conn = await _idle_session(clients, server, redis_server.url)
            assert proxy.silence() == 1
            await _pass_a_cancel(redis_server.url, session.session_id, "m1")
            frames = await conn.until(lambda f: f["type"] == "error", timeout=30)
            assert (frames[-1]["code"], frames[-1]["id"]) == ("not_found", "m1"), frames
            assert proxy.subscribed == 2  # the listener subscribed again, on a new connection
    finally:
        await proxy.close()
    session.transcript.assert_complete()


async def test_a_cancel_right_after_the_listeners_connection_was_killed_reaches_the_owner_promptly(
    tmp_path: Path, redis_server: RedisServer, clients: Clients
) -> None:
    # CLIENT KILL (or Redis's own client-output-buffer limit) closes the listener's connection. It
    # subscribed again a second later, but what was published meanwhile reached nobody: that
    # cancel waited for the lease renewal. Subscribed again, the listener takes what waits.
    aioredis = pytest.importorskip("redis.asyncio")
    async with _owner(tmp_path, redis_server.url) as server:
        session, conn = await _idle_session(clients, server, redis_server.url)
        redis = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
        try:
            assert await redis.client_kill_filter(_type="pubsub") == 1
        finally:
            await redis.aclose()
        await _pass_a_cancel(redis_server.url, session.session_id, "m1")
        frames = await conn.until(lambda f: f["type"] == "error", timeout=30)
        assert (frames[-1]["code"], frames[-1]["id"]) == ("not_found", "m1"), frames
    session.transcript.assert_complete()
