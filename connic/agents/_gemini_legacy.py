"""google-generativeai's blocking streams, run in threads that connic can stop at any moment.

The SDK's only working transport here is REST over ``requests``, which blocks. Each stream
runs in a daemon thread of its own, at most ``legacy_threads`` of them per agent at once
(the default executor of the event loop would cap them at ``min(32, cores + 4)`` for the whole
process and make ``asyncio.run`` wait for them at exit). Its chunks reach the event loop
through a queue.

A thread blocked in a socket read does not notice anything but that socket, so stopping a
request means shutting its socket down. The socket is reached through the SDK's own
``requests`` session: :func:`make_cancellable` mounts an adapter whose urllib3 pools record,
per request, each connection the request takes (a thread-local names the request, since the
pools are shared by every thread). :meth:`LegacyRequest.cancel` then shuts those sockets down,
whether the request waits for its first byte or reads its body, and a connection that finishes
connecting after the cancel is shut down before anything is sent on it.

This module imports ``requests`` and ``urllib3``: it is imported only when a legacy gemini
agent starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
from collections.abc import AsyncGenerator, Callable, Iterable
from typing import Any

import requests
import requests.adapters
import urllib3
import urllib3.connection

__all__ = ["LegacyRequest", "LegacyStreams", "make_cancellable"]

log = logging.getLogger("connic.agents.gemini")

_local = threading.local()
_lock = threading.Lock()  # guards every request's connections and each connection's owner


class LegacyRequest:
    """One request of one thread: the connections it took, and whether it was cancelled.

    A connection belongs to the request that last took it from a pool, until it is handed
    back (``_connic_owner``). Shutting a socket down (another thread) and closing it (the
    owning thread) both happen under ``_lock``, so a shutdown never reaches a closed socket's
    file descriptor reused by someone else.
    """

    def __init__(self) -> None:
        self.cancelled = False
        self.finished = False
        self.connections: list[Any] = []

    def attach(self, conn: Any) -> None:
        """Record a connection this request uses; refuse it if the request was cancelled."""
        with _lock:
            conn._connic_owner = self
            if not (self.cancelled or self.finished):
                self.connections.append(conn)
                return
            _shutdown(conn)
        raise ConnectionAbortedError("the request was cancelled")

    def end(self) -> None:
        """In the request's thread, once the SDK is done: close what it did not hand back.

        The SDK stops reading at the ``]`` of its JSON array and leaves the rest of the
        response (and so the connection) to the garbage collector; a cancelled request
        leaves its shut-down connection behind.
        """
        with _lock:
            self.finished = True
            for conn in self.connections:
                if getattr(conn, "_connic_owner", None) is self:
                    conn._connic_owner = None
                    with contextlib.suppress(Exception):
                        conn.close()
            self.connections.clear()

    def cancel(self) -> None:
        """Stop the request: shut down every socket it still holds (no-op once it finished)."""
        with _lock:
            if self.cancelled or self.finished:
                return
            self.cancelled = True
            for conn in self.connections:
                if getattr(conn, "_connic_owner", None) is self:
                    _shutdown(conn)


def _shutdown(conn: Any) -> None:
    """Wake the thread reading ``conn``: closing a socket would not, shutting it down does.

    The plain ``socket`` method, not ``SSLSocket.shutdown``, which also drops the TLS state
    the reading thread is using.
    """
    sock = getattr(conn, "sock", None)
    if isinstance(sock, socket.socket):
        with contextlib.suppress(OSError):
            socket.socket.shutdown(sock, socket.SHUT_RDWR)


def _attach(conn: Any) -> None:
    request: LegacyRequest | None = getattr(_local, "request", None)
    if request is not None:
        request.attach(conn)


class _HTTPConnection(urllib3.connection.HTTPConnection):
    def connect(self) -> None:
        super().connect()
        _attach(self)  # a cancel that came while connecting finds the socket here


class _HTTPSConnection(urllib3.connection.HTTPSConnection):
    def connect(self) -> None:
        super().connect()
        _attach(self)


def _detach(conn: Any) -> None:
    if conn is not None:
        with _lock:
            conn._connic_owner = None


class _HTTPPool(urllib3.HTTPConnectionPool):
    ConnectionCls = _HTTPConnection

    def _get_conn(self, timeout: float | None = None) -> Any:
        conn = super()._get_conn(timeout)
        _attach(conn)  # a kept-alive connection is not connected again
        return conn

    def _put_conn(self, conn: Any) -> None:
        _detach(conn)
        super()._put_conn(conn)


class _HTTPSPool(urllib3.HTTPSConnectionPool):
    ConnectionCls = _HTTPSConnection

    def _get_conn(self, timeout: float | None = None) -> Any:
        conn = super()._get_conn(timeout)
        _attach(conn)
        return conn

    def _put_conn(self, conn: Any) -> None:
        _detach(conn)
        super()._put_conn(conn)


_POOLS = {"http": _HTTPPool, "https": _HTTPSPool}
_connections = 0  # the legacy_threads of the legacy agents running in this process, added up


class _Adapter(requests.adapters.HTTPAdapter):
    """requests' adapter with urllib3 pools that record each request's connections."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = _POOLS

    def proxy_manager_for(self, proxy: str, **kwargs: Any) -> Any:
        manager = super().proxy_manager_for(proxy, **kwargs)
        if not proxy.lower().startswith("socks"):  # SOCKS has pool classes of its own
            manager.pool_classes_by_scheme = _POOLS
        return manager


def make_cancellable(client: Any, connections: int) -> requests.adapters.HTTPAdapter:
    """Mount the recording adapter on the SDK client's ``requests`` session.

    ``connections`` is the calling agent's ``legacy_threads``. The pools keep as many
    connections to an endpoint for reuse as all legacy agents may stream at once (every
    agent uses the one process-wide client), else urllib3 warns "Connection pool is full"
    and drops them. The session is a private attribute of the REST transport;
    google-generativeai is frozen upstream, so it will not move. Raises ``TypeError`` when
    it is not there. Returns the adapter mounted.
    """
    global _connections
    session = getattr(getattr(client, "transport", None), "_session", None)
    if not isinstance(session, requests.Session):
        raise TypeError("google-generativeai's REST transport has no requests session to cancel requests through")
    _connections += connections
    adapter = _Adapter(pool_maxsize=_connections)
    replaced = {id(a): a for a in (session.get_adapter("https://x"), session.get_adapter("http://x"))}
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    for old in replaced.values():
        old.close()  # its idle connections; one in use is closed when handed back
    return adapter


class LegacyStreams:
    """Runs the blocking streams of one agent, at most ``threads`` at once, through ``client``.

    ``client`` is the SDK's process-wide generative client: see :func:`make_cancellable`.
    """

    def __init__(self, agent: str, threads: int, client: Any) -> None:
        self.adapter = make_cancellable(client, threads)
        self.agent = agent
        self.threads = threads
        self.slots = asyncio.Semaphore(threads)
        self.running: set[LegacyRequest] = set()
        self.warned = False

    async def stream(self, call: Callable[[], Iterable[Any]]) -> AsyncGenerator[Any, None]:
        """Yield what iterating ``call()`` gives, computed in a thread; closing it stops the thread.

        An exception in the thread is raised here. ``StopIteration`` from ``call()`` (the SDK's
        way of saying a stream had no chunk at all) ends the stream.
        """
        if self.slots.locked() and not self.warned:
            self.warned = True  # once per time the pool fills up, not once per waiting turn
            log.warning("agent %s: all %d legacy_threads are busy; new answers wait for one", self.agent, self.threads)
        await self.slots.acquire()
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        request = LegacyRequest()

        def put(kind: str, value: Any) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is listening
                loop.call_soon_threadsafe(queue.put_nowait, (kind, value))

        def release() -> None:
            self.slots.release()
            if not self.slots.locked():
                self.warned = False

        def work() -> None:
            _local.request = request
            outcome: tuple[str, Any] = ("done", None)
            try:
                for chunk in call():
                    if request.cancelled:
                        break
                    put("chunk", chunk)
            except StopIteration:
                pass
            except BaseException as exc:
                outcome = ("error", exc)
            finally:
                _local.request = None
                request.end()
                if not request.cancelled:  # else nobody is waiting for it
                    put(*outcome)
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(release)

        thread = threading.Thread(target=work, name=f"connic-gemini-{self.agent}", daemon=True)
        try:
            thread.start()
        except BaseException:
            self.slots.release()
            raise
        self.running.add(request)
        try:
            while True:
                kind, value = await queue.get()
                if kind == "done":
                    return
                if kind == "error":
                    raise value
                yield value
        finally:
            # Not waiting for the thread: with its socket shut down it ends by itself, and
            # cancel and shutdown must not wait for a read to fail.
            request.cancel()
            self.running.discard(request)

    def close(self) -> None:
        """Stop every running request (the agent is closing)."""
        global _connections
        for request in list(self.running):
            request.cancel()
        self.running.clear()
        _connections -= self.threads
        if _connections == 0:  # the last legacy agent: nobody reuses the kept-alive connections
            self.adapter.close()
