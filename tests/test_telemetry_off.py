"""Without ``connic[otel]`` (or with ``telemetry = "off"``), nothing of OpenTelemetry is imported.

Each case runs a real server and a real client in a fresh interpreter: there,
``opentelemetry`` is made unimportable by a meta-path finder installed before
connic is imported (as if the extra were not installed), a turn is answered (with
a client ``traceparent``, JSON logs and a provider call, every path that could
import it), and the interpreter reports which ``opentelemetry`` modules it loaded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = r"""
import asyncio, json, logging, sys

BLOCK = sys.argv[2] == "block"


class NoOpenTelemetry:
    def find_spec(self, name, path=None, target=None):
        if name == "opentelemetry" or name.startswith("opentelemetry."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


if BLOCK:
    sys.meta_path.insert(0, NoOpenTelemetry())

import websockets
from aiohttp.test_utils import TestServer

import connic
from connic import telemetry
from connic.logs import configure_logging

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


async def main():
    configure_logging("DEBUG", "json")
    config = {
        "server": {"telemetry": sys.argv[1], "playground": False},
        "agents": {"bot": {"use": "echo", "demo_tools": True}},
        "connectors": [{"path": "/ws", "secrets": ["s"]}],
    }
    try:
        app = connic.create_app(config)
    except connic.ConfigError as exc:
        print(json.dumps({"error": exc.message}))
        return
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    url = f"ws://127.0.0.1:{server.port}/ws"
    async with websockets.connect(url, additional_headers={"traceparent": TRACEPARENT}) as ws:
        await ws.send(json.dumps({"secret": "s"}))
        assert json.loads(await ws.recv())["type"] == "connected"
        context = {"traceparent": TRACEPARENT}
        await ws.send(json.dumps({"type": "message", "id": "m", "payload": {"message": "hi", "context": context}}))
        while json.loads(await ws.recv())["type"] != "stream_end":
            pass
    with telemetry.provider_call("openai", "gpt") as call:
        call.record(input_tokens=1)
    await server.close()
    loaded = sorted(m for m in sys.modules if m == "opentelemetry" or m.startswith("opentelemetry."))
    print(json.dumps({"loaded": loaded}))


asyncio.run(main())
"""


def run(mode: str, block: bool) -> dict[str, object]:
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, mode, "block" if block else "allow"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])},
    )
    assert proc.returncode == 0, proc.stderr
    result: dict[str, object] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


@pytest.mark.parametrize("mode", ["auto", "off"])
def test_without_the_extra_nothing_is_imported(mode: str) -> None:
    assert run(mode, block=True) == {"loaded": []}


def test_telemetry_on_without_the_extra_is_a_one_line_error() -> None:
    result = run("on", block=True)
    error = str(result["error"])
    assert "server.telemetry" in error and "pip install 'connic[otel]'" in error and "\n" not in error


def test_telemetry_off_imports_nothing_even_when_installed() -> None:
    pytest.importorskip("opentelemetry.trace", reason="opentelemetry-api is not installed (otel extra)")
    assert run("off", block=False) == {"loaded": []}


def test_telemetry_auto_imports_it_when_installed() -> None:
    # The other side of the cases above: what they check for is what an installed extra loads.
    pytest.importorskip("opentelemetry.trace", reason="opentelemetry-api is not installed (otel extra)")
    loaded = run("auto", block=False)["loaded"]
    assert isinstance(loaded, list) and "opentelemetry.trace" in loaded
