"""A small asyncio TCP proxy on 127.0.0.1 that can cut all its connections on demand.

Tests put it between a client and a real server to drop connections the way a network does:
:meth:`TcpProxy.cut` aborts both sides of every open connection at once (no WebSocket close
frame, no clean shutdown), while the proxy keeps listening so the client can connect again.

It runs on whichever event loop calls :meth:`TcpProxy.start`; a test whose server lives in a
thread starts it on that thread's loop (``asyncio.run_coroutine_threadsafe``).
"""

from __future__ import annotations

import asyncio
import contextlib


class TcpProxy:
    """Forward ``127.0.0.1:<port>`` to ``target_host:target_port``, byte for byte."""

    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.port = 0
        self.accepted = 0
        """How many client connections the proxy has accepted so far."""
        self.refusing = False
        """While true, new connections are aborted at once (the server looks unreachable)."""
        self._server: asyncio.Server | None = None
        self._pairs: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> TcpProxy:
        """Listen on a free loopback port (``self.port``)."""
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    @property
    def open_connections(self) -> int:
        """Client connections currently forwarded."""
        return len(self._pairs)

    async def cut(self) -> int:
        """Abort every open connection on both sides at once; returns how many were cut."""
        pairs = list(self._pairs)
        self._pairs.clear()
        for client, upstream in pairs:
            # abort(), not close(): nothing buffered is flushed and no orderly shutdown is
            # attempted, so neither end gets a WebSocket close frame - a dropped connection.
            client.transport.abort()
            upstream.transport.abort()
        await asyncio.sleep(0)
        return len(pairs)

    async def close(self) -> None:
        """Stop listening and cut what is still open."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        await self.cut()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        if self.refusing:
            client_writer.transport.abort()
            return
        self.accepted += 1
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(self.target_host, self.target_port)
        except OSError:
            client_writer.transport.abort()
            return
        pair = (client_writer, upstream_writer)
        self._pairs.add(pair)
        pumps = [
            asyncio.create_task(self._pump(client_reader, upstream_writer)),
            asyncio.create_task(self._pump(upstream_reader, client_writer)),
        ]
        self._tasks.update(pumps)
        try:
            await asyncio.gather(*pumps, return_exceptions=True)
        finally:
            self._tasks.difference_update(pumps)
            self._pairs.discard(pair)
            client_writer.transport.abort()
            upstream_writer.transport.abort()

    def passes(self, data: bytes) -> bool:
        """Whether ``data`` is forwarded; False ends that direction there (a subclass stalls a peer so)."""
        return True

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # One direction; an orderly end on one side is passed on (half-close), any error ends both.
        try:
            while data := await reader.read(65536):
                if not self.passes(data):
                    return  # neither this nor anything after it is forwarded
                writer.write(data)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
        except (ConnectionError, OSError):
            writer.transport.abort()
