"""S1 over AG-UI: streaming throughput of the agui transport (HTTP + SSE) against the Connic WebSocket
protocol, on one server, in the same run (docs/agui.md).

    python benchmarks/agui.py                  # 3 rounds of 10 s each way, 50 clients, 2 client processes
    python benchmarks/agui.py --rounds 1 --duration 5

One connic server (a subprocess) serves the echo agent on both a websocket connector (/ws) and an
agui connector (/agui), with the same settings. Each round measures, one after the other:
- S1 as benchmarks/run.py does it: 50 WebSocket connections in closed loop, each sending a
  20-word message when the previous reply has ended (turns/s);
- the same over AG-UI: 50 clients in closed loop, each POSTing a run of the same 20-word message
  on its own thread (one keep-alive HTTP connection each) and reading the SSE stream to its
  RUN_FINISHED (runs/s).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loadgen import MESSAGE_TEXT, closed_loop
from servers import free_port, serve

SECRET = "bench"


def config(port: int) -> dict[str, Any]:
    """Both connectors, with S1's settings."""
    common = {"secrets": [SECRET], "streaming": True, "max_messages": 10000, "max_queued": 1000}
    return {
        "server": {"host": "127.0.0.1", "port": port, "max_connections": 0, "metrics": False, "playground": False},
        "agents": {"bot": {"use": "echo"}},
        "connectors": [
            {"path": "/ws", **common},
            {"transport": "agui", "path": "/agui", "progress_events": False, **common},
        ],
    }


def serve_main(port: int) -> None:
    """The server subprocess: connic with the agui transport registered (whatever is installed)."""
    import connic
    from connic.cli import serve as connic_serve
    from connic.transports.agui import AguiTransport

    registry = connic.load_registry()
    registry.register("transports", "agui", AguiTransport)
    app = connic.create_app(config(port), registry=registry)
    asyncio.run(connic_serve(app, "127.0.0.1", port, "--port"))


async def _agui_closed_loop(url: str, secret: str, clients: int, duration: float) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {secret}", "Content-Type": "application/json"}
    runs = 0

    async def one(deadline: float) -> None:
        nonlocal runs
        thread = str(uuid.uuid4())
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as session:
            while time.monotonic() < deadline:
                body = {
                    "threadId": thread,
                    "runId": str(uuid.uuid4()),
                    "messages": [{"id": str(uuid.uuid4()), "role": "user", "content": MESSAGE_TEXT}],
                }
                async with session.post(url, data=json.dumps(body), headers=headers) as response:
                    text = await response.text()
                if '"type":"RUN_FINISHED"' not in text:
                    raise RuntimeError(f"run did not finish: {text[-200:]}")
                runs += 1

    started = time.monotonic()
    await asyncio.gather(*(one(started + duration) for _ in range(clients)))
    return {"turns": runs, "seconds": time.monotonic() - started}


def _agui_worker(url: str, secret: str, clients: int, duration: float) -> dict[str, Any]:
    result: dict[str, Any] = asyncio.run(_agui_closed_loop(url, secret, clients, duration))
    return result


def agui_closed_loop(url: str, clients: int, duration: float, processes: int) -> float:
    """Runs per second with ``clients`` AG-UI clients in closed loop."""
    import multiprocessing as mp

    split = [clients // processes + (1 if i < clients % processes else 0) for i in range(processes)]
    with mp.get_context("spawn").Pool(processes) as pool:
        results = pool.starmap(_agui_worker, [(url, SECRET, c, duration) for c in split if c])
    return sum(r["turns"] for r in results) / max(r["seconds"] for r in results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)  # the server subprocess
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--processes", type=int, default=2)
    args = parser.parse_args()
    if args.serve:
        serve_main(args.serve)
        return
    port = free_port()
    ws, sse = [], []
    with serve([sys.executable, __file__, "--serve", str(port)], port):
        for _ in range(args.rounds):
            ws.append(closed_loop(f"ws://127.0.0.1:{port}/ws", SECRET, args.clients, args.duration, args.processes))
            sse.append(agui_closed_loop(f"http://127.0.0.1:{port}/agui", args.clients, args.duration, args.processes))
            print(f"round: websocket {ws[-1]:.0f} turns/s, agui/sse {sse[-1]:.0f} runs/s", flush=True)
    w, s = statistics.median(ws), statistics.median(sse)
    print(f"S1 median: websocket {w:.0f} turns/s, agui/sse {s:.0f} runs/s: agui/sse = {s / w:.2f}x websocket")


if __name__ == "__main__":
    main()
