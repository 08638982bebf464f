"""The connection's low-level pieces that black-box tests cannot single out: the shared flusher."""

from __future__ import annotations

import asyncio
import logging

import pytest

from connic.transports.ws_io import Flusher


async def test_flushes_asked_for_in_one_step_run_in_one_callback() -> None:
    loop = asyncio.get_running_loop()
    flusher = Flusher()
    ran: list[str] = []
    flusher.add(loop, lambda: ran.append("a"))
    flusher.add(loop, lambda: ran.append("b"))
    assert ran == []  # not before the current step is over
    await asyncio.sleep(0)
    assert ran == ["a", "b"]
    flusher.add(loop, lambda: ran.append("c"))  # a later step schedules a new callback
    await asyncio.sleep(0)
    assert ran == ["a", "b", "c"]


async def test_a_failing_flush_does_not_keep_the_others(caplog: pytest.LogCaptureFixture) -> None:
    loop = asyncio.get_running_loop()
    flusher = Flusher()
    ran: list[str] = []

    def broken() -> None:
        raise RuntimeError("boom")

    flusher.add(loop, broken)
    flusher.add(loop, lambda: ran.append("after"))
    with caplog.at_level(logging.ERROR, logger="connic.websocket"):
        await asyncio.sleep(0)
    assert ran == ["after"]
    assert "flushing a connection failed" in caplog.text


def test_a_flusher_outlives_its_event_loop() -> None:
    # A flush asked for on a loop that stopped before running it must not stall the next loop.
    flusher = Flusher()
    ran: list[str] = []
    first = asyncio.new_event_loop()
    flusher.add(first, lambda: ran.append("lost"))
    first.close()

    async def later() -> None:
        flusher.add(asyncio.get_running_loop(), lambda: ran.append("second"))
        await asyncio.sleep(0)

    asyncio.run(later())
    assert ran == ["second"]
