"""An echo agent whose replies to some messages wait for a gate the test opens (``use = "<this file>:GatedEcho"``).

A test that needs a message to stay queued (or in flight) on a server process until it has
seen something happen starts a :class:`Gate`, names its port (``gate``) and the text of such
messages (``gated``) in the agent's options, and opens it then: no reply's length has to
outlast the test's next steps.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import attrs

import connic


class GatedEcho(connic.Agent):
    """Streams the message back word by word (``delay`` apart); one naming ``gated`` waits for the gate first."""

    @attrs.frozen
    class Options:
        """Options of the gated echo agent."""

        delay: float = 0.02
        gate: int = 0  # the port of the test's Gate
        gated: str = ""

    options: Options

    async def respond(self, turn: connic.Turn) -> AsyncIterator[str | connic.Usage]:
        """Wait for the gate (a message naming ``gated``), then echo each word."""
        if self.options.gated and self.options.gated in turn.message:
            reader, writer = await asyncio.open_connection("127.0.0.1", self.options.gate)
            await reader.read(1)  # one byte, or the end: open
            writer.close()
        words = turn.message.split()
        for word in words:
            await asyncio.sleep(self.options.delay)
            yield word + " "
        yield connic.Usage(len(words), len(words))


class Gate:
    """A loopback port whose connections get a byte once :meth:`open` is called (at once after it)."""

    def __init__(self) -> None:
        self.port = 0
        self.opened = False
        self._waiting: list[asyncio.StreamWriter] = []
        self._server: asyncio.Server | None = None

    async def start(self) -> Gate:
        """Listen on a free port (``self.port``)."""
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.opened:
            writer.write(b"!")
        else:
            self._waiting.append(writer)

    def open(self) -> None:
        """Let every reply waiting for the gate go on, and those that come to it later."""
        self.opened = True
        for writer in self._waiting:
            writer.write(b"!")
        self._waiting.clear()

    async def close(self) -> None:
        """Stop listening."""
        if self._server is not None:
            self._server.close()
            self._server = None
