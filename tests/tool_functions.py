"""Plain functions the tool tests give the agents as ``tools = ["tool_functions:NAME"]``.

They record what they were called with (and in which thread), so a test sees the
function run with the arguments the fake model chose. :func:`reset` starts each test
afresh (events belong to the test's event loop).
"""

from __future__ import annotations

import asyncio
import threading
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field


class State:
    """What the tools did during one test."""

    calls: ClassVar[list[tuple[str, dict[str, Any]]]] = []
    threads: ClassVar[list[str]] = []
    arrived: ClassVar[list[str]] = []
    together: asyncio.Event
    started: asyncio.Event
    cancelled: asyncio.Event
    release: threading.Event = threading.Event()  # lets every hang() call return
    hanging: threading.Semaphore = threading.Semaphore(0)  # one release per hang() call begun


def reset() -> None:
    State.calls = []
    State.threads = []
    State.arrived = []
    State.together = asyncio.Event()
    State.started = asyncio.Event()
    State.cancelled = asyncio.Event()
    State.release.set()  # the last test's hung calls end
    State.release = threading.Event()
    State.hanging = threading.Semaphore(0)


async def get_weather(
    city: Annotated[str, Field(description="The city, e.g. Oslo")], unit: Literal["C", "F"] = "C"
) -> dict[str, Any]:
    """The current weather in a city."""
    State.calls.append(("get_weather", {"city": city, "unit": unit}))
    return {"city": city, "temperature": 21, "unit": unit}


def word_count(text: str) -> int:
    """How many words a text has (a sync function: it runs in a worker thread)."""
    State.calls.append(("word_count", {"text": text}))
    State.threads.append(threading.current_thread().name)
    return len(text.split())


async def meet(who: str) -> str:
    """Returns once two calls of it are running at the same time: a sequential loop never gets there."""
    State.arrived.append(who)
    if len(State.arrived) == 2:
        State.together.set()
    await State.together.wait()
    return f"{who} met {next(w for w in State.arrived if w != who)}"


async def explode(reason: str) -> str:
    """Always fails."""
    State.calls.append(("explode", {"reason": reason}))
    raise RuntimeError(reason)


async def wait_forever() -> str:
    """Never returns by itself; records being cancelled."""
    State.started.set()
    try:
        await asyncio.Event().wait()
    except asyncio.CancelledError:
        State.cancelled.set()
        raise
    return "unreachable"


def hang() -> str:
    """A sync tool stuck in a blocking call (a dead socket): returns only once the test releases it."""
    State.hanging.release()
    State.threads.append(threading.current_thread().name)
    State.release.wait(60)  # bounded, so that a failing test cannot keep pytest from exiting
    return "released"
