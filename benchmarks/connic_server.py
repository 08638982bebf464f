"""connic in-process, with the benchmarks' own agent and a statistics route.

    python benchmarks/connic_server.py --port 8080 --agent pace
    python benchmarks/connic_server.py --port 8080 --agent echo-slow --connector '{"resume_window": 60}'
    python benchmarks/connic_server.py --port 8080 --agent echo --store '{"use": "redis", "url": "redis://127.0.0.1:6379/0"}'

``python -m connic run`` finds agents only through installed entry points, so the
benchmarks that need an agent of their own (S7's history-reading agent,
benchmarks/pace_agent.py) build the application with ``connic.create_app(config,
registry=...)`` and serve it as ``connic run`` does (the same runner, signals and drain).

Agents (``--agent``), each served under the name ``bot``:
- ``pace``: the history-reading agent at an LLM's pace, 20 chunks 50 ms apart;
- ``echo``: the built-in echo agent, as fast as it goes;
- ``echo-slow``: the built-in echo agent with 50 ms before each word (one chunk per word).

``GET /bench/stats`` answers with the connector's sessions by state and their replay
logs' sizes, so a benchmark can check that what it set up is there (e.g. 5,000 detached
sessions) and report the replay log's bytes per frame.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pace_agent import HistoryPaceAgent

import connic
from connic.app import RUNTIME
from connic.cli import serve  # it serves exactly as `connic run` does
from connic.stores.memory import MemoryReplayLog
from connic.transports.websocket import WebSocketTransport

AGENTS: dict[str, dict[str, Any]] = {
    "pace": {"use": "history_pace", "chunks": 20, "delay": 0.05},
    "echo": {"use": "echo"},
    "echo-slow": {"use": "echo", "delay": 0.05},
}


def config(
    port: int,
    secret: str,
    agent: str,
    connector: dict[str, Any],
    store: dict[str, Any] | None = None,
    telemetry: str = "auto",
) -> dict[str, Any]:
    """The benchmark's configuration: run.py's S1 connector, plus ``connector``'s keys; ``store`` (default memory)."""
    server = {"host": "127.0.0.1", "port": port, "max_connections": 0, "metrics": False, "playground": False}
    return {
        "server": {**server, "telemetry": telemetry},
        "agents": {"bot": AGENTS[agent]},
        "connectors": [
            {
                "path": "/ws",
                "secrets": [secret],
                "streaming": True,
                "max_messages": 10000,
                "max_queued": 1000,
                "heartbeat": 30,
                **connector,
            }
        ],
        "store": store or {"use": "memory"},
    }


def session_stats(app: web.Application) -> dict[str, Any]:
    """Sessions by state, and the frames and bytes in their replay logs."""
    states: Counter[str] = Counter()
    frames = encoded = in_memory = history = 0
    for transport in app[RUNTIME].transports:
        if not isinstance(transport, WebSocketTransport):
            continue
        for session in transport.sessions.live:
            states[session.state.value] += 1
            history += len(session.history)
            if session.log is None:
                continue
            count, size = session.log.stats()
            frames += count
            encoded += size
            # What the memory store's log costs in this process: its sealed blocks (their UTF-8
            # and offsets) and its newest frames as sent (private attributes: this is a
            # benchmark, not connic's API).
            if isinstance(session.log, MemoryReplayLog):
                for data, ends in session.log._blocks:
                    in_memory += sys.getsizeof(data) + sys.getsizeof(ends)
                in_memory += sys.getsizeof(session.log._recent) + sum(map(sys.getsizeof, session.log._recent))
    return {
        "states": dict(states),
        "sessions": sum(states.values()),
        "history_entries": history,
        "log_frames": frames,
        "log_bytes": encoded,
        "log_bytes_in_memory": in_memory,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--secret", default="bench")
    parser.add_argument("--agent", choices=sorted(AGENTS), default="pace")
    parser.add_argument("--connector", default="{}", help="JSON object of extra connector keys")
    parser.add_argument("--telemetry", choices=("auto", "on", "off"), default="auto", help="[server] telemetry")
    parser.add_argument("--store", default="{}", help='JSON object: the [store] table (default {"use": "memory"})')
    args = parser.parse_args()
    registry = connic.load_registry()
    registry.register("agents", "history_pace", HistoryPaceAgent)
    store = json.loads(args.store)
    if store.get("use") == "redis":
        from connic.stores.redis import RedisStore  # an installed connic older than the store lacks its entry point

        registry.register("stores", "redis", RedisStore)
    data = config(args.port, args.secret, args.agent, json.loads(args.connector), store, args.telemetry)
    app = connic.create_app(data, registry=registry)

    async def stats(_: web.Request) -> web.Response:
        return web.json_response(session_stats(app))

    app.router.add_get("/bench/stats", stats)
    asyncio.run(serve(app, "127.0.0.1", args.port, "--port"))


if __name__ == "__main__":
    main()
