"""docs/writing-transports.md's example transport, run for real on the session core."""

from __future__ import annotations

import re
import types
from pathlib import Path
from typing import Any

import aiohttp

from conftest import StartServer
from helpers import test_registry

DOC = Path(__file__).resolve().parent.parent / "docs" / "writing-transports.md"


def example_module() -> types.ModuleType:
    """The page's ```python block, as the module ``mypkg.http``."""
    (code,) = re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S)
    module = types.ModuleType("mypkg_http")
    exec(compile(code, str(DOC), "exec"), module.__dict__)
    return module


async def test_the_example_transport_keeps_sessions_across_requests(start_server: StartServer) -> None:
    registry = test_registry()
    registry.register("transports", "http", example_module().HTTPTransport)
    config = {
        "agents": {"assistant": {"use": "inspect"}},
        "connectors": [{"transport": "http", "path": "/message", "max_messages": 2}],
    }
    server = await start_server(config, registry=registry)
    url = server.http + "/message"
    async with aiohttp.ClientSession() as http:

        async def post(body: Any, headers: dict[str, str] | None = None) -> tuple[Any, dict[str, str]]:
            async with http.post(url, json=body, headers=headers or {}) as response:
                return await response.json(), {k: v for k, v in response.headers.items() if k.startswith("X-")}

        frames, headers = await post({"id": "m1", "message": "hello"})
        assert [(f["type"], f["seq"]) for f in frames] == [("ack", 1), ("response", 2)]
        frames, _ = await post({"id": "m2", "message": "again"}, headers)
        ack, response = frames
        assert ack == {"type": "ack", "id": "m2", "message_number": 2, "seq": 3}
        assert '"text": "hello"' in response["response"]  # the agent saw the first exchange
        frames, _ = await post({"id": "m3", "message": "over"}, headers)
        assert [(f["type"], f.get("code")) for f in frames] == [("error", "message_limit_reached")]
        frames, other = await post({"message": "x"}, {"X-Session": headers["X-Session"], "X-Session-Token": "nope"})
        assert other["X-Session"] != headers["X-Session"]  # a wrong token gets a session of its own
        assert frames[0]["message_number"] == 1
        frames, _ = await post("not json")
        assert frames["code"] == "invalid_json"
