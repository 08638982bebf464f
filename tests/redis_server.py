"""A real ``redis-server`` for the tests: on a free loopback port, in a temp dir, never persisting.

Tests that need one use :func:`running_redis` in a fixture (tests skip when Debian's
``redis-server`` is not installed; ``scripts/test`` installs it). The server is
stopped when the test ends, and can be stopped and started again on the same
port (:meth:`RedisServer.stop`, :meth:`RedisServer.start`) to test an outage.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import pytest

__all__ = ["RedisServer", "flush", "running_redis", "store_plugin_env", "with_store"]


_NO_PERSISTENCE = ("--save", "", "--appendonly", "no", "--dir")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class RedisServer:
    """One ``redis-server`` process."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start it and wait (≤ 10 s) until it accepts connections."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", *_NO_PERSISTENCE, str(self.directory)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"redis-server did not start on port {self.port}")
            time.sleep(0.02)

    def stop(self) -> None:
        """Stop it (SIGTERM, then SIGKILL after 5 s)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None


@contextlib.contextmanager
def running_redis(directory: Path) -> Iterator[RedisServer]:
    """A fresh ``redis-server`` in ``directory`` (a test is skipped when it is not installed), stopped after."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    pytest.importorskip("redis")
    server = RedisServer(directory)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def store_plugin_env(directory: Path) -> dict[str, str]:
    """Environment for a ``python -m connic`` subprocess that must find the ``redis`` store plugin.

    An installed connic that predates the plugin lacks its entry point (until it is
    installed again): then a distribution declaring only that entry point is written
    in ``directory`` and put on PYTHONPATH, where importlib.metadata finds it.
    """
    path = [os.environ.get("PYTHONPATH", "")]
    if "redis" not in {ep.name for ep in entry_points(group="connic.stores")}:
        info = directory / "connic_redis_entry_point-0.dist-info"
        info.mkdir(parents=True, exist_ok=True)
        (info / "METADATA").write_text("Metadata-Version: 2.1\nName: connic-redis-entry-point\nVersion: 0\n")
        (info / "entry_points.txt").write_text("[connic.stores]\nredis = connic.stores.redis:RedisStore\n")
        path.append(str(directory))
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in path if p)}


def flush(url: str) -> None:
    """Empty the server at ``url`` (FLUSHALL): a module's tests share one server, not its keys."""
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"FLUSHALL\r\n")
        if not sock.recv(16).startswith(b"+OK"):
            raise RuntimeError("FLUSHALL failed")


def with_store(start: Callable[..., Awaitable[Any]], url: str) -> Callable[..., Awaitable[Any]]:
    """``start_server`` (tests/conftest.py) with every app it starts keeping its sessions in Redis at ``url``."""
    from conftest import make_config
    from connic.stores.redis import RedisStore
    from helpers import test_registry

    async def start_redis(config: Any = None, *, app: Any = None, **kwargs: Any) -> Any:
        if app is not None:
            return await start(app=app, **kwargs)
        data = dict(config if config is not None else make_config())
        data["store"] = {"use": "redis", "url": url, "timeout": 2}
        registry = kwargs.pop("registry", None) or test_registry()
        registry.register("stores", "redis", RedisStore)
        return await start(data, registry=registry, **kwargs)

    return start_redis


@pytest.fixture(name="redis_server")
def redis_server_fixture(tmp_path: Path) -> Iterator[RedisServer]:
    """A private ``redis-server`` for one test, on a free loopback port in ``tmp_path``; stopped after it."""
    with running_redis(tmp_path / "redis") as server:
        yield server


@pytest.fixture(name="redis")
async def redis_client_fixture(redis_server: RedisServer) -> AsyncIterator[Any]:
    """A redis-py client of the test's ``redis-server`` (replies decoded); closed after the test."""
    import redis.asyncio as aioredis  # the tests that use it skip without redis-py

    client = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture(name="store")
async def redis_store_fixture(redis_server: RedisServer) -> AsyncIterator[Any]:
    """A started :class:`connic.stores.redis.RedisStore` on the test's ``redis-server``; closed after the test."""
    from connic.stores.redis import RedisStore

    started = RedisStore(RedisStore.Options(url=redis_server.url))
    await started.start()
    try:
        yield started
    finally:
        await started.close()
