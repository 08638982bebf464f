"""The ``redis`` store from an operator's side: a mistyped ``[store] url`` is one line at start, never a traceback
and never a silently different database.

Black-box: ``python -m connic run`` in a subprocess, against a real ``redis-server`` (tests/redis_server.py).
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
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
from test_redis_store import chat, process

from conftest import ROOT, StartServer

pytest.importorskip("redis.asyncio", reason="redis-py is not installed (pip install 'connic[redis]')")


def run_with_store(tmp_path: Path, url: str) -> subprocess.CompletedProcess[str]:
    """``connic run`` with ``[store] url = url``; a server that starts anyway is killed after 20 s (the test fails)."""
    path = tmp_path / "connic.toml"
    path.write_text(
        '[agents.assistant]\nuse = "echo"\n[[connectors]]\npath = "/ws"\nsecrets = ["s"]\n'
        f'[store]\nuse = "redis"\nurl = "{url}"\ntimeout = 1\n'
    )
    return subprocess.run(
        [sys.executable, "-m", "connic", "run", "--port", "0", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=20,
        cwd=ROOT,
        env=store_plugin_env(tmp_path / "plugins"),
    )


@pytest.mark.parametrize(
    ("tail", "problem"),
    [
        ("/sessions", "the path '/sessions' is not a database number"),  # redis-py: database 0
        ("/1/2", "the path '/1/2' is not a database number"),  # redis-py: database 12
        ("/0?bogus=1", "unknown query parameter 'bogus'"),  # redis-py: a TypeError at the first call
    ],
)
def test_a_mistyped_store_url_is_one_line_naming_store_url(
    tmp_path: Path, redis_server: RedisServer, tail: str, problem: str
) -> None:
    base = redis_server.url.rpartition("/")[0]
    done = run_with_store(tmp_path, base + tail)
    assert done.returncode == 1, (done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    # Refused as the file is read (naming it: `connic check` refuses it too), or as the store starts.
    named = (f"{tmp_path / 'connic.toml'}: store: url: ", "connic: error: [store] url ")
    assert any(name in lines[0] for name in named) and problem in lines[0], lines[0]


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("http://127.0.0.1:6379/0", "Redis URL must specify one of the following schemes"),
        ("/sessions", "Redis URL must specify one of the following schemes"),
        ("redis://127.0.0.1:6379/sessions", "the path '/sessions' is not a database number"),
    ],
)
def test_check_refuses_a_store_url_that_run_would(tmp_path: Path, url: str, problem: str) -> None:
    path = tmp_path / "connic.toml"
    path.write_text(
        '[agents.assistant]\nuse = "echo"\n[[connectors]]\npath = "/ws"\nsecrets = ["s"]\n'
        f'[store]\nuse = "redis"\nurl = "{url}"\n'
    )
    done = subprocess.run(
        [sys.executable, "-m", "connic", "check", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=20,
        cwd=ROOT,
        env=store_plugin_env(tmp_path / "plugins"),
    )
    assert done.returncode == 1, (done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert lines == [f"connic: error: {path}: store: url: {lines[0].partition('store: url: ')[2]}"], done.stderr
    assert problem in lines[0], lines[0]


def test_a_database_number_in_the_path_or_the_query_still_starts(tmp_path: Path, redis_server: RedisServer) -> None:
    # What the check must let through: /N, a bare host, and redis-py's own query options.
    base = redis_server.url.rpartition("/")[0]
    for url in (base + "/3?socket_keepalive=true", base + "?db=2", base + "/"):
        path = tmp_path / "connic.toml"
        path.write_text(
            '[agents.assistant]\nuse = "echo"\n[[connectors]]\npath = "/ws"\nsecrets = ["s"]\n'
            f'[store]\nuse = "redis"\nurl = "{url}"\ntimeout = 1\n'
        )
        proc = subprocess.Popen(
            [sys.executable, "-m", "connic", "run", "--port", "0", "--config", str(path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env=store_plugin_env(tmp_path / "plugins"),
        )
        try:
            assert proc.stdout is not None
            first = proc.stdout.readline()  # the banner's first line once it listens; "" if it exited
            assert "listening on" in first, (url, first, proc.stderr.read() if proc.poll() is not None else "")
        finally:
            proc.terminate()
            proc.wait(20)


async def test_the_first_sessions_after_redis_restarts_are_served(
    redis_server: RedisServer, start_server: StartServer, clients: Clients
) -> None:
    # redis-py 8 (RESP3 by default) hands out a pooled connection the old Redis closed without
    # checking it: the first call on each failed, and with it a session (1011) or a handshake (503).
    server = await process(start_server, redis_server.url)
    for i in range(3):
        await chat(await ResumeSession(clients, server.url()).start(), "m1", f"before {i}")
    await asyncio.to_thread(redis_server.stop)  # the event loop runs on meanwhile, as in a served process
    await asyncio.to_thread(redis_server.start)
    for i in range(3):
        await chat(await ResumeSession(clients, server.url()).start(), "m1", f"after {i}")


@pytest.mark.parametrize(
    ("maxmemory", "policy", "warned"),
    [
        ("64mb", "allkeys-lru", True),
        ("64mb", "volatile-ttl", True),  # session keys expire: a volatile policy may evict them too
        ("64mb", "noeviction", False),
        ("0", "allkeys-lru", False),  # no maxmemory: nothing is ever evicted
    ],
)
def test_a_redis_that_may_evict_sessions_is_named_in_one_warning_at_start(
    tmp_path: Path, redis_server: RedisServer, maxmemory: str, policy: str, warned: bool
) -> None:
    import redis

    admin = redis.Redis.from_url(redis_server.url)
    try:
        admin.config_set("maxmemory", maxmemory)
        admin.config_set("maxmemory-policy", policy)
    finally:
        admin.close()
    path = tmp_path / "connic.toml"
    path.write_text(
        '[agents.assistant]\nuse = "echo"\n[[connectors]]\npath = "/ws"\nsecrets = ["s"]\n'
        f'[store]\nuse = "redis"\nurl = "{redis_server.url}"\ntimeout = 1\n'
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "connic", "run", "--port", "0", "--config", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=store_plugin_env(tmp_path / "plugins"),
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()  # the banner's first line once it listens (the check ran before)
        assert "listening on" in first, (first, proc.stderr.read() if proc.poll() is not None else "")
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=20)
    evicting = [line for line in err.splitlines() if "maxmemory-policy" in line]
    if warned:
        assert len(evicting) == 1, err
        assert policy in evicting[0] and "noeviction" in evicting[0] and "[store] url" in evicting[0], evicting[0]
    else:
        assert evicting == [], err
