"""Helpers of the AG-UI tests (tests/test_agui*.py); this module has no tests of its own.

Two real clients: :func:`post_run`, a plain aiohttp POST whose SSE stream is parsed,
event by event, with ``ag-ui-protocol``'s own models; and :func:`js_run`, the official
``@ag-ui/client`` ``HttpAgent`` in Node (tests/agui_js, installed by scripts/test), which
validates the events itself.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import uuid
from collections.abc import Mapping
from typing import Any

import aiohttp
import pytest
from pydantic import TypeAdapter

from conftest import ROOT
from connic.registry import Registry
from connic.transports.agui import AguiTransport
from helpers import test_registry

ag_ui = pytest.importorskip("ag_ui.core", reason="ag-ui-protocol is not installed (pip install 'connic[agui]')")

SECRET = "agui-secret"
JS = ROOT / "tests" / "agui_js"
EVENT: TypeAdapter[Any] = TypeAdapter(ag_ui.Event)
AUTH = {"Authorization": f"Bearer {SECRET}"}


def agui_registry() -> Registry:
    """The test registry, with the agui transport even where the installed connic predates its entry point."""
    registry = test_registry()
    if "agui" not in registry.names("transports"):
        registry.register("transports", "agui", AguiTransport)
    return registry


def agui_config(
    connector: Mapping[str, Any] | None = None,
    agents: Mapping[str, Any] | None = None,
    *,
    websocket: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """An agui connector at /agui (secret ``agui-secret``), and a websocket one at /ws if ``websocket`` is given."""
    connectors = [{"transport": "agui", "path": "/agui", "secrets": [SECRET], **(connector or {})}]
    if websocket is not None:
        connectors.append({"transport": "websocket", "path": "/ws", "secrets": [SECRET], **websocket})
    return {"agents": dict(agents) if agents is not None else {"assistant": {"use": "echo"}}, "connectors": connectors}


def run_input(thread_id: str, text: str, *, run_id: str | None = None, **extra: Any) -> dict[str, Any]:
    """A RunAgentInput whose last message is the user's ``text``."""
    return {
        "threadId": thread_id,
        "runId": run_id or str(uuid.uuid4()),
        "state": {},
        "messages": [*extra.pop("before", []), {"id": str(uuid.uuid4()), "role": "user", "content": text}],
        "tools": [],
        "context": [],
        "forwardedProps": {},
        **extra,
    }


def parse_sse(text: str) -> list[Any]:
    """Every event of an SSE body, each parsed and validated with ag-ui-protocol's models."""
    events = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        lines = [line[len("data: ") :] for line in block.split("\n") if line.startswith("data: ")]
        assert lines, f"an SSE block without data: {block!r}"
        events.append(EVENT.validate_json("\n".join(lines)))
    return events


async def post_run(
    url: str, body: Any, headers: Mapping[str, str] | None = None, timeout: float = 20
) -> tuple[int, list[Any] | str]:
    """POST a run; the status and its parsed events (a 2xx) or its text (a refusal)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as http,
        http.post(
            url, data=data, headers={"Content-Type": "application/json", **(headers if headers is not None else AUTH)}
        ) as response,
    ):
        text = await response.text()
        if response.status >= 300:
            return response.status, text
        assert response.headers["Content-Type"].startswith("text/event-stream")
        return response.status, parse_sse(text)


def kinds(events: list[Any]) -> list[str]:
    """The events' types, as AG-UI names them."""
    return [event.type.value for event in events]


def text_of(events: list[Any]) -> str:
    """The text the events stream, all messages together."""
    return "".join(event.delta for event in events if event.type.value == "TEXT_MESSAGE_CONTENT")


async def js_run(spec: Mapping[str, Any], timeout: float = 60) -> list[dict[str, Any]]:
    """Run tests/agui_js/run.mjs (the official HttpAgent) with ``spec``; what it printed, one object a line."""
    node = shutil.which("node")
    if node is None or not (JS / "node_modules" / "@ag-ui" / "client").is_dir():
        if os.environ.get("CONNIC_REQUIRE_AGUI_JS"):
            pytest.fail("CONNIC_REQUIRE_AGUI_JS is set but node or tests/agui_js/node_modules is missing")
        pytest.skip("node or tests/agui_js/node_modules is missing (scripts/test installs them with npm ci)")
    proc = await asyncio.create_subprocess_exec(
        node,
        str(JS / "run.mjs"),
        json.dumps(spec),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=JS,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode == 0, err.decode()
    return [json.loads(line) for line in out.decode().splitlines() if line.strip()]


def js_events(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The events the HttpAgent accepted."""
    return [line["event"] for line in lines if "event" in line]
