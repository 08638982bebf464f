"""The connection's low-level pieces that black-box tests cannot single out: the shared flusher."""

from __future__ import annotations

import asyncio
import contextvars
from typing import Any

from connic.transports.ws_io import Flusher

who: contextvars.ContextVar[str] = contextvars.ContextVar("who")


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


async def test_a_failing_flush_does_not_keep_the_others() -> None:
    loop = asyncio.get_running_loop()
    reported: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: reported.append(context))
    flusher = Flusher()
    ran: list[str] = []

    def broken() -> None:
        raise RuntimeError("boom")

    flusher.add(loop, broken)
    flusher.add(loop, lambda: ran.append("after"))
    await asyncio.sleep(0)
    assert ran == ["after"]
    # Reported like a failing callback of its own would be: to the loop's exception handler.
    assert [(c["message"], str(c["exception"])) for c in reported] == [("flushing a connection failed", "boom")]


async def test_no_flush_runs_in_another_connections_context() -> None:
    # The shared callback is scheduled by whichever connection asks first; its context
    # (contextvars: a request id for logging, say) must not become the others'.
    loop = asyncio.get_running_loop()
    flusher = Flusher()
    seen: dict[str, str | None] = {}

    async def connection(name: str) -> None:
        who.set(name)
        flusher.add(loop, lambda: seen.setdefault(name, who.get(None)))

    await asyncio.gather(connection("a"), connection("b"))
    await asyncio.sleep(0)
    assert seen == {"a": None, "b": None}


def test_flushes_of_two_live_loops_each_run_on_their_own() -> None:
    flusher = Flusher()
    ran: list[tuple[str, asyncio.AbstractEventLoop]] = []
    first, second = asyncio.new_event_loop(), asyncio.new_event_loop()
    try:
        flusher.add(first, lambda: ran.append(("first", asyncio.get_running_loop())))
        flusher.add(second, lambda: ran.append(("second", asyncio.get_running_loop())))
        first.run_until_complete(asyncio.sleep(0))
        second.run_until_complete(asyncio.sleep(0))
    finally:
        first.close()
        second.close()
    assert ran == [("first", first), ("second", second)]


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
