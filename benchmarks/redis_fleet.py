"""The ``redis`` store and the fleet: S1, S7 and S8 on Redis, ``--workers 2`` vs 1, Redis memory.

    python benchmarks/redis_fleet.py R1 R7 R8 W2 RM --quick
    python benchmarks/run.py --only R1,R7,R8,W2,RM          # the same, in run.py's table

Each scenario starts its own ``redis-server`` (Debian's, on a free loopback port, in a
temporary directory, persisting nothing) and stops it at the end:

- **R1**: S1 (streaming echo of a 20-word message, 50 connections in closed loop, turns/s)
  on the redis store and on the memory store, in interleaved rounds on the same machine,
  with the bytes Redis received and the commands it processed per turn on the redis store;
- **R7**: S7 (LLM pace, llm_pace.py) on the redis store and on the memory store: connic's
  CPU per turn, and Redis's own CPU, bytes received and commands per turn beside it;
- **R8**: S8 (resume.py) resuming on the *other* process: two connic processes sharing one
  Redis, every session started on the first, dropped mid-stream and resumed on the second
  (which follows the first's reply live until it lets the session go);
- **W2**: ``python -m connic run --workers 2`` against ``--workers 1`` on the redis store, on
  S2 (non-streaming echo, turns/s) and S7 (CPU per turn of the whole process tree). On a
  2-core machine the load generator shares the cores with the workers;
- **RM**: Redis's memory (``INFO memory`` used_memory growth, less the clients' buffers) per idle attached session, per
  detached session let go with an empty log, per history entry (``MEMORY USAGE`` of every
  session's history list over its entries) and per replay frame (the growth after
  ``exchanges`` streamed exchanges each, less the history lists, over the frames logged: it
  still includes the records' own growth, so it is an upper bound), with ``MEMORY USAGE`` of
  one session's keys beside it.

Servers are benchmarks/connic_server.py (R1, R7, R8, RM: connic in-process, as S1/S7/S8/M
run it) or ``python -m connic run`` (W2, which needs ``--workers``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llm_pace
import loadgen
import memory
import resume
import servers

HERE = Path(__file__).resolve().parent
SECRET = servers.SECRET
SCENARIOS = ("R1", "R7", "R8", "W2", "RM")


@contextlib.contextmanager
def redis_server() -> Iterator[tuple[str, int]]:
    """A private ``redis-server`` on a free loopback port; yields (url, pid)."""
    if shutil.which("redis-server") is None:
        raise SystemExit("redis-server is not installed (apt-get install redis-server)")
    port = servers.free_port()
    with tempfile.TemporaryDirectory() as tmp:
        cmd = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        proc = subprocess.Popen([*cmd, "--dir", tmp], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            servers.wait_for_port(port)
            yield f"redis://127.0.0.1:{port}/0", proc.pid
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def client(url: str) -> Any:
    """A synchronous redis-py client (for FLUSHALL, INFO, MEMORY USAGE)."""
    import redis

    return redis.Redis.from_url(url, decode_responses=True)


def redis_store(url: str) -> dict[str, Any]:
    return {"use": "redis", "url": url}


def used_memory(url: str) -> int:
    """Redis's ``used_memory`` less its clients' buffers (``mem_clients_normal``), in bytes.

    The clients' share grows with the connections connic opens under a burst, not with the
    sessions kept: it is left out of the per-session figures.
    """
    info = client(url).info("memory")
    return int(info["used_memory"]) - int(info.get("mem_clients_normal", 0))


def traffic(url: str) -> tuple[int, int]:
    """The bytes Redis has received and the commands it has processed so far (``INFO stats``)."""
    stats = client(url).info("stats")
    return int(stats["total_net_input_bytes"]), int(stats["total_commands_processed"])


# --- R1, R7, R8 ---------------------------------------------------------------------------


def s1(duration: float, rounds: int, processes: int = 2) -> dict[str, list[float]]:
    """S1 turns/s on the memory store and the redis store, interleaved ``rounds`` times.

    With the redis store, also the bytes Redis received and the commands it processed per
    turn (over the turns the rate and ``duration`` make: close, not exact).
    """
    out: dict[str, list[float]] = {"memory": [], "redis": [], "redis_bytes_per_turn": [], "redis_commands_per_turn": []}
    with redis_server() as (url, _):
        for round_ in range(rounds):
            for store in ("memory", "redis"):
                print(f"R1 round {round_ + 1}/{rounds}: {store} store", file=sys.stderr)
                client(url).flushall()
                table = redis_store(url) if store == "redis" else None
                with servers.connic_inprocess("echo", store=table) as (ws, _, _):
                    before = traffic(url)
                    rate = loadgen.closed_loop(ws, SECRET, 50, duration, processes)
                    after = traffic(url)
                out[store].append(rate)
                if store == "redis":
                    out["redis_bytes_per_turn"].append((after[0] - before[0]) / (rate * duration))
                    out["redis_commands_per_turn"].append((after[1] - before[1]) / (rate * duration))
    return out


def s7(sessions: int, turns: int, rounds: int) -> dict[str, list[dict[str, float]]]:
    """S7 on the memory store and the redis store; with redis, Redis's own CPU per turn too."""
    out: dict[str, list[dict[str, float]]] = {"memory": [], "redis": []}
    with redis_server() as (url, redis_pid):
        for round_ in range(rounds):
            for store in ("memory", "redis"):
                print(f"R7 round {round_ + 1}/{rounds}: {store} store, {sessions} sessions", file=sys.stderr)
                client(url).flushall()
                table = redis_store(url) if store == "redis" else None
                with servers.connic_inprocess("pace", store=table) as (ws, _, pid):
                    redis_cpu: list[float] = []
                    redis_traffic: list[tuple[int, int]] = []

                    def cpu(
                        pid: int = pid,
                        redis_cpu: list[float] = redis_cpu,
                        redis_traffic: list[tuple[int, int]] = redis_traffic,
                    ) -> float:
                        redis_cpu.append(servers.cpu_seconds(redis_pid))  # read in the same window
                        redis_traffic.append(traffic(url))
                        return servers.cpu_seconds(pid)

                    r = llm_pace.measure(ws, pid, sessions, turns, cpu=cpu)
                if store == "redis":
                    r["redis_cpu_us_per_turn"] = (redis_cpu[-1] - redis_cpu[0]) / r["turns"] * 1e6
                    r["redis_bytes_per_turn"] = (redis_traffic[-1][0] - redis_traffic[0][0]) / r["turns"]
                    r["redis_commands_per_turn"] = (redis_traffic[-1][1] - redis_traffic[0][1]) / r["turns"]
                out[store].append(r)
    return out


def s8(sessions: int, preconnect: bool = True) -> dict[str, Any]:
    """S8 with the sessions resuming on another connic process sharing one Redis."""
    with redis_server() as (url, _):
        print(f"R8 {sessions} sessions, resumed on the other process", file=sys.stderr)
        return resume.measure(sessions, preconnect, store=redis_store(url), other=True)


# --- W2 ---------------------------------------------------------------------------------


def run_config(port: int, url: str, agent: str, streaming: bool) -> str:
    agents = {
        "echo": 'use = "echo"',
        "pace": 'use = "pace_agent:HistoryPaceAgent"\nchunks = 20\ndelay = 0.05',
    }
    return f"""
[server]
host = "127.0.0.1"
port = {port}
max_connections = 0
metrics = false
playground = false

[agents.bot]
{agents[agent]}

[[connectors]]
path = "/ws"
secrets = ["{SECRET}"]
streaming = {"true" if streaming else "false"}
max_messages = 10000
max_queued = 1000
heartbeat = 30

[store]
use = "redis"
url = "{url}"
"""


@contextlib.contextmanager
def connic_run(url: str, workers: int, agent: str, streaming: bool) -> Iterator[tuple[str, int]]:
    """``python -m connic run --workers N`` on the redis store at ``url``; yields (ws url, parent pid)."""
    port = servers.free_port()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "connic.toml"
        path.write_text(run_config(port, url, agent, streaming))
        cmd = [sys.executable, "-m", "connic", "run", "--config", str(path), "--log-level", "WARNING"]
        # pace_agent (``use = "pace_agent:..."``) is imported from this directory.
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))}
        with servers.serve([*cmd, "--workers", str(workers)], port, env=env) as pid:
            time.sleep(1.0 if workers > 1 else 0.2)  # every worker listening, not only the first
            yield f"ws://127.0.0.1:{port}/ws", pid


def workers(duration: float, sessions: int, turns: int, rounds: int) -> dict[str, dict[str, list[Any]]]:
    """S2 turns/s and S7 CPU per turn (the whole process tree) with ``--workers 1`` and ``2``."""
    out: dict[str, dict[str, list[Any]]] = {"1": {"S2": [], "S7": []}, "2": {"S2": [], "S7": []}}
    with redis_server() as (url, _):
        for round_ in range(rounds):
            for n in ("1", "2"):
                print(f"W2 round {round_ + 1}/{rounds}: --workers {n}", file=sys.stderr)
                client(url).flushall()
                with connic_run(url, int(n), "echo", streaming=False) as (ws, _):
                    out[n]["S2"].append(loadgen.closed_loop(ws, SECRET, 50, duration, 2))
                client(url).flushall()
                with connic_run(url, int(n), "pace", streaming=True) as (ws, pid):
                    tree = servers.descendants(pid)  # read once: the workers stay the same during the run

                    def cpu(tree: list[int] = tree) -> float:
                        return sum(servers.cpu_seconds(p) for p in tree)

                    out[n]["S7"].append(llm_pace.measure(ws, pid, sessions, turns, cpu=cpu))
    return out


# --- RM ---------------------------------------------------------------------------------


def _settle(url: str, seconds: float = 1.0) -> int:
    time.sleep(seconds)  # the store's writer and lease renewals are done
    return used_memory(url)


def _hold(ws: str, n: int, processes: int = 2) -> tuple[Any, Any, list[Any], int]:
    ctx = mp.get_context("spawn")
    manager = ctx.Manager()
    ready, release = manager.Queue(), manager.Event()
    share = [n // processes + (1 if i < n % processes else 0) for i in range(processes)]
    holders = [ctx.Process(target=loadgen._worker, args=("idle", (ws, SECRET, k, ready, release))) for k in share]
    for holder in holders:
        holder.start()
    held = sum(ready.get(timeout=300) for _ in holders)
    return manager, release, holders, held


def redis_memory(n: int, exchanges: int) -> dict[str, Any]:
    """Bytes of Redis memory per idle attached session, per detached session, and per replay frame."""
    with redis_server() as (url, _), servers.connic_inprocess("echo", store=redis_store(url)) as (ws, _, _):
        r = client(url)
        loadgen.closed_loop(ws, SECRET, 4, 0.5, 1)  # warm up (those sessions end: their keys go)
        base = _settle(url)
        print(f"RM: {n} idle attached sessions", file=sys.stderr)
        manager, release, holders, held = _hold(ws, n)
        attached = (_settle(url) - base) / held
        sample = next(r.scan_iter("*:record", count=1000))
        tag = sample[: -len(":record")]
        attached_keys = {key: r.memory_usage(key) for key in r.scan_iter(f"{tag}:*")}
        release.set()
        for holder in holders:
            holder.join(60)
        manager.shutdown()
        base = _settle(url, 2.0)  # closed with 1000: those sessions ended and were deleted
        print(f"RM: {n} detached sessions, empty log", file=sys.stderr)
        memory._detach_worker(ws, n, 0)
        detached = (_settle(url) - base) / n
        base = _settle(url, 0.0)
        print(f"RM: {n} detached sessions after {exchanges} exchanges", file=sys.stderr)
        memory._detach_worker(ws, n, exchanges)
        grown = _settle(url) - base
        logs = [key for key in r.scan_iter("*:log", count=1000)]
        frames = sum(_frames(r, key) for key in logs)
        # The history lists those exchanges filled (every entry counted: SAMPLES 0).
        histories = [key for key in r.scan_iter("*:history", count=1000)]
        pipe = r.pipeline(transaction=False)
        for key in histories:
            pipe.memory_usage(key, samples=0)
            pipe.llen(key)
        sizes = pipe.execute()
        history_bytes, entries = sum(sizes[0::2]), sum(sizes[1::2])
        log_key = logs[0]
        tag = log_key[: -len(":log")]
        logged_keys = {key: r.memory_usage(key, samples=0) for key in r.scan_iter(f"{tag}:*")}
        return {
            "sessions": n,
            "attached_bytes_per_session": attached,
            "attached_keys_sample": attached_keys,
            "detached_empty_bytes_per_session": detached,
            "exchanges": exchanges,
            "frames_logged": frames,
            "frames_per_session": frames / n,
            "history_entries": entries,
            "history_bytes_per_entry": history_bytes / entries if entries else float("nan"),
            "bytes_per_frame_upper_bound": (grown - n * detached - history_bytes) / frames if frames else float("nan"),
            "log_bytes_per_frame_memory_usage": logged_keys[log_key] / _frames(r, log_key),
            "detached_keys_sample": logged_keys,
        }


def _frames(r: Any, log_key: str) -> int:
    """The frames a replay log holds (an entry holds one write's frames, joined by newlines)."""
    return sum(fields["f"].count("\n") + 1 for _, fields in r.xrange(log_key))


# --- all of them --------------------------------------------------------------------------


def measure(only: set[str], quick: bool, sessions: int | None = None, duration: float | None = None) -> dict[str, Any]:
    """The scenarios in ``only`` (run.py's ``--quick`` sizes with ``quick``); raw figures by scenario."""
    rounds = 2 if quick else 3
    duration = duration or (5.0 if quick else 15.0)
    many = sessions or (100 if quick else 1000)
    out: dict[str, Any] = {}
    if "R1" in only:
        out["R1"] = s1(duration, rounds)
    if "R7" in only:
        out["R7"] = s7(many, 2 if quick else 5, 1 if quick else 2)
    if "R8" in only:
        out["R8"] = s8(many)
    if "W2" in only:
        out["W2"] = workers(duration, many, 2 if quick else 5, 1 if quick else 2)
    if "RM" in only:
        out["RM"] = redis_memory(sessions or (1000 if quick else 5000), 10)
    return out


def record(results: dict[str, Any], figures: dict[str, Any]) -> None:
    """Add ``figures`` (:func:`measure`) to run.py's results, under connic, with one key per figure."""
    connic: dict[str, list[float]] = results["connic"]
    if "R1" in figures:
        connic["R1 S1 turns/s, memory store"] = figures["R1"]["memory"]
        connic["R1 S1 turns/s, redis store"] = figures["R1"]["redis"]
        connic["R1 Redis bytes received per turn"] = figures["R1"]["redis_bytes_per_turn"]
        connic["R1 Redis commands per turn"] = figures["R1"]["redis_commands_per_turn"]
    if "R7" in figures:
        for store, runs in figures["R7"].items():
            connic[f"R7 S7 CPU µs/turn, {store} store"] = [r["cpu_us_per_turn"] for r in runs]
            connic[f"R7 S7 turn p99 s, {store} store"] = [r["p99_s"] for r in runs]
        connic["R7 S7 Redis's own CPU µs/turn"] = [r["redis_cpu_us_per_turn"] for r in figures["R7"]["redis"]]
        connic["R7 S7 Redis bytes received per turn"] = [r["redis_bytes_per_turn"] for r in figures["R7"]["redis"]]
        connic["R7 S7 Redis commands per turn"] = [r["redis_commands_per_turn"] for r in figures["R7"]["redis"]]
    if "R8" in figures:
        r = figures["R8"]
        connic["R8 resume on the other process → first replayed p99 ms"] = [r["replayed_p99_ms"]]
        connic["R8 resume on the other process → connected p99 ms"] = [r["connected_p99_ms"]]
        connic["R8 replies complete, no gap"] = [r["complete"]]
        connic["R8 sessions"] = [r["sessions"]]
    if "W2" in figures:
        for n, runs in figures["W2"].items():
            connic[f"W2 S2 turns/s, --workers {n}"] = runs["S2"]
            connic[f"W2 S7 CPU µs/turn (all processes), --workers {n}"] = [r["cpu_us_per_turn"] for r in runs["S7"]]
            connic[f"W2 S7 turn p99 s, --workers {n}"] = [r["p99_s"] for r in runs["S7"]]
    if "RM" in figures:
        m = figures["RM"]
        connic["RM Redis bytes per idle attached session"] = [m["attached_bytes_per_session"]]
        connic["RM Redis bytes per detached session, empty log"] = [m["detached_empty_bytes_per_session"]]
        connic["RM Redis bytes per history entry (MEMORY USAGE of the lists)"] = [m["history_bytes_per_entry"]]
        connic["RM Redis bytes per replay frame (upper bound)"] = [m["bytes_per_frame_upper_bound"]]
        connic["RM Redis bytes per replay frame (MEMORY USAGE of a log)"] = [m["log_bytes_per_frame_memory_usage"]]
    results["_meta"].update({key: [value] for key, value in figures.items()})


def targets(connic: dict[str, list[float]]) -> list[str]:
    """The redis figures beside their targets (issue 14, docs/performance.md)."""

    def med(key: str) -> float:
        values = sorted(connic[key])
        return values[len(values) // 2]

    lines = []
    if "R1 S1 turns/s, redis store" in connic:
        r = med("R1 S1 turns/s, redis store") / med("R1 S1 turns/s, memory store")
        lines.append(f"- R1: S1 on redis {r:.2f}x memory (target >= 0.6): {'met' if r >= 0.6 else 'MISSED'}")
    if "R7 S7 CPU µs/turn, redis store" in connic:
        r = med("R7 S7 CPU µs/turn, redis store") / med("R7 S7 CPU µs/turn, memory store")
        lines.append(
            f"- R7: S7 connic CPU per turn on redis {r:.2f}x memory (target <= 1.5): {'met' if r <= 1.5 else 'MISSED'}"
        )
    key = "R8 resume on the other process → first replayed p99 ms"
    if key in connic:
        v = med(key)
        lines.append(f"- {key}: {v:.1f} (target <= 30 ms): {'met' if v <= 30 else 'MISSED'}")
    if "W2 S2 turns/s, --workers 2" in connic:
        r = med("W2 S2 turns/s, --workers 2") / med("W2 S2 turns/s, --workers 1")
        lines.append(f"- W2: S2 --workers 2 {r:.2f}x --workers 1 (no target: the load generator shares the cores)")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("scenarios", nargs="+", choices=SCENARIOS)
    parser.add_argument("--quick", action="store_true", help="shorter runs and fewer repetitions")
    parser.add_argument("--sessions", type=int, metavar="N", help="sessions in R7, R8, W2's S7 and RM")
    parser.add_argument("--duration", type=float, metavar="S", help="seconds per R1 / W2 S2 round")
    args = parser.parse_args()
    servers.raise_fd_limit()
    with contextlib.suppress(KeyboardInterrupt):
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        figures = measure(set(args.scenarios), args.quick, args.sessions, args.duration)
        print(json.dumps(figures, indent=1, default=str))


if __name__ == "__main__":
    main()
