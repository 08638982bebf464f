"""A soak run: a long mixed load on two redis-store processes and one memory-store process, then
what is left once every session has ended or expired (docs/performance.md, "Soak").

    python benchmarks/soak.py                        # 6 rounds of 60 s, then 60 s quiet
    python benchmarks/soak.py --rounds 2 --round 20  # a short look
    python benchmarks/soak.py --trace                # tracemalloc in the servers: what grew since round 1

Starts a private ``redis-server`` (loopback, temp dir, persisting nothing) and three
``python -m connic run`` processes (A and B share Redis, C has the memory store), each with a
short ``session_timeout`` and ``resume_window`` so sessions expire during the run. Clients do
what a fleet does (``soak_clients.BEHAVIOURS``): chat and close 1000, drop without a close frame (TCP
abort), resume on the other process or take a live connection over, cancel, ask for history,
run into ``rate_limit`` and ``max_messages``, send invalid frames, never authenticate, and run
AG-UI over SSE and over WebSocket. After each round and during the quiet period it prints one
JSON line: per process RSS, open fds by kind, what a SIGUSR1 probe the processes are started
with reads inside (asyncio tasks, objects made since start-up, containers connic holds) and
the metrics gauges; Redis's keys by kind with their TTLs, and its memory.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent))
from redis_fleet import redis_server
from soak_clients import BEHAVIOURS, MAX_MESSAGES, SECRET

ROOT = Path(__file__).resolve().parent.parent
SESSION_TIMEOUT = 20
RESUME_WINDOW = 6

PROBE = """
import asyncio, collections, ctypes, gc, json, os, signal, sys, threading, runpy, tracemalloc
TRACE = os.environ.get("SOAK_TRACE") == "1"
FIRST = []
def probe(signum, frame):
    try:
        tasks = asyncio.all_tasks()
    except RuntimeError:
        tasks = set()
    gc.collect()
    objects = gc.get_objects()  # those made since start-up: connic freezes the heap it starts with
    held = collections.Counter()
    for o in objects:
        if type(o).__module__.startswith("connic") and hasattr(o, "__dict__"):
            for attr, value in vars(o).items():
                if isinstance(value, (dict, set, list, collections.deque)) and len(value):
                    held[type(o).__name__ + "." + attr] += len(value)
    out = {
        "blocks": sys.getallocatedblocks(),
        "gc_objects": len(objects),
        "tasks": len(tasks),
        "task_names": collections.Counter(getattr(t.get_coro(), "__qualname__", "?") for t in tasks).most_common(12),
        "threads": threading.active_count(),
        "objects": {k: v for k, v in collections.Counter(type(o).__name__ for o in objects).most_common(15)},
        "held": held.most_common(25),
    }
    if TRACE:
        snapshot = tracemalloc.take_snapshot()
        FIRST.append(snapshot) if len(FIRST) < 2 else None  # the second: round 1, past the warm-up
        stats = snapshot.compare_to(FIRST[-1], "lineno")[:12]
        out["traced"] = [[str(stat.traceback), stat.size_diff, stat.count_diff] for stat in stats]
        out["traced_total"] = sum(stat.size for stat in snapshot.statistics("filename"))
    if os.environ.get("SOAK_TRIM") == "1":  # give freed heap back: what RSS is left is still in use
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open(os.environ["SOAK_PROBE"] + ".tmp", "w") as f:
        json.dump(out, f)
    os.replace(os.environ["SOAK_PROBE"] + ".tmp", os.environ["SOAK_PROBE"])
if TRACE:
    tracemalloc.start(1)
signal.signal(signal.SIGUSR1, probe)
sys.argv[0] = "connic"
runpy.run_module("connic", run_name="__main__")
"""


def config(store: dict[str, Any]) -> str:
    """The TOML of one process: /ws, /wsr (rate-limited), /agui; two echo agents."""
    common = (
        f'secrets = ["{SECRET}"]\nsession_timeout = {SESSION_TIMEOUT}\nresume_window = {RESUME_WINDOW}\n'
        f"max_messages = {MAX_MESSAGES}\nmax_auth_failures = 0\n"
    )
    store_lines = "".join(f'{k} = "{v}"\n' for k, v in store.items())
    return (
        "[server]\nplayground = false\nmax_connections_per_ip = 100000\n\n"
        '[agents.assistant]\nuse = "echo"\ndelay = 0.01\n\n[agents.slow]\nuse = "echo"\ndelay = 0.15\n\n'
        f'[[connectors]]\npath = "/ws"\nauth_timeout = 2\nheartbeat = 5\n{common}\n'
        f'[[connectors]]\npath = "/wsr"\nrate_limit = {{ messages = 2, per = 1 }}\n{common}\n'
        f'[[connectors]]\ntransport = "agui"\npath = "/agui"\n{common}\n'
        f"[store]\n{store_lines}"
    )


class Proc:
    """One ``python -m connic run`` with the probe."""

    def __init__(self, name: str, conf: Path, tmp: Path, trace: bool = False, trim: bool = False) -> None:
        self.name = name
        self.probe_file = tmp / f"probe-{name}.json"
        env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "SOAK_PROBE": str(self.probe_file),
            "SOAK_TRACE": "1" if trace else "",
            "SOAK_TRIM": "1" if trim else "",
        }
        self.log = open(tmp / f"{name}.log", "w")  # noqa: SIM115 - open for the life of the process
        self.proc = subprocess.Popen(
            [sys.executable, "-c", PROBE, "run", "--config", str(conf), "--port", "0"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            cwd=ROOT,
        )
        assert self.proc.stdout is not None
        self.port = 0
        for line in self.proc.stdout:
            self.log.write(line)
            if m := re.search(r"listening on http://[^:]+:(\d+)", line):
                self.port = int(m.group(1))
            if line.startswith("Press Ctrl+C"):
                break
        if not self.port:
            raise SystemExit(f"{name} did not start; see {self.log.name}")
        self.pump = asyncio.get_event_loop().run_in_executor(None, self._pump)

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.log.write(line)

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def sample(self, session: aiohttp.ClientSession, redis_port: int) -> dict[str, Any]:
        """RSS (KiB), fds, the probe's tasks and objects, and the metrics gauges."""
        pid = self.proc.pid
        rss, fds, links = _looked_at(pid, redis_port)
        self.probe_file.unlink(missing_ok=True)
        os.kill(pid, signal.SIGUSR1)
        for _ in range(100):
            if self.probe_file.exists():
                break
            await asyncio.sleep(0.05)
        probe = json.loads(self.probe_file.read_text()) if self.probe_file.exists() else {}
        probe["rss_after_kib"] = _looked_at(pid, redis_port)[0]  # after its gc.collect (and malloc_trim)
        async with session.get(self.http + "/metrics") as response:
            text = await response.text()
        gauges = {}
        for line in text.splitlines():
            if line.startswith(("connic_connections_open", "connic_sessions_open")):
                name, value = line.rsplit(" ", 1)
                gauges[name] = float(value)
        return {"rss_kib": rss, "fds": fds, "fd_kinds": links, "probe": probe, "gauges": gauges}


def _looked_at(pid: int, redis_port: int) -> tuple[int, int, dict[str, int]]:
    """A process's RSS (KiB), how many fds it has open, and those fds by kind."""
    status = Path(f"/proc/{pid}/status").read_text()
    rss = int(re.search(r"VmRSS:\s+(\d+)", status).group(1))  # type: ignore[union-attr]
    fds = os.listdir(f"/proc/{pid}/fd")
    peers = _peers(pid)
    links = collections.Counter(
        _kind(os.readlink(f"/proc/{pid}/fd/{fd}"), peers, redis_port) for fd in fds if _exists(pid, fd)
    )
    return rss, len(fds), dict(links)


def _exists(pid: int, fd: str) -> bool:
    return os.path.exists(f"/proc/{pid}/fd/{fd}")


def _peers(pid: int) -> dict[str, tuple[int, str]]:
    """Socket inode: (the remote port, the TCP state in hex) of the process's TCP sockets."""
    peers = {}
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
                fields = line.split()
                peers[fields[9]] = (int(fields[2].rsplit(":", 1)[1], 16), fields[3])
    return peers


def _kind(link: str, peers: dict[str, tuple[int, str]], redis_port: int) -> str:
    """What an fd is: a socket by its peer (redis, listening, a client's), else its kind or path."""
    if link.startswith("socket:["):
        port, state = peers.get(link[8:-1], (-1, ""))
        return "redis" if port == redis_port else "listen" if state == "0A" else f"tcp-{state}" if state else "socket"
    return link.split(":")[0] if ":" in link else ("/tmp" if link.startswith("/tmp") else link)


# --- the run ----------------------------------------------------------------------------------

ERRORS: collections.Counter[str] = collections.Counter()
DONE: collections.Counter[str] = collections.Counter()


async def client_loop(pairs: list[tuple[Proc, Proc]], stop: float) -> None:
    while time.monotonic() < stop:
        proc, other = random.choice(pairs)
        behaviour = random.choice(BEHAVIOURS)
        try:
            await asyncio.wait_for(behaviour(proc, other), 40)
            DONE[behaviour.__name__] += 1
        except Exception as exc:  # a soak reports what failed and goes on
            ERRORS[f"{behaviour.__name__}:{proc.name}:{type(exc).__name__}"] += 1
        await asyncio.sleep(random.uniform(0, 0.2))


def redis_keys(url: str) -> dict[str, Any]:
    """Keys by kind (the session id taken out), with their TTL range, and used_memory."""
    r = redis.Redis.from_url(url, decode_responses=True)
    kinds: dict[str, list[int]] = collections.defaultdict(list)
    for key in r.scan_iter(count=1000):
        kinds[re.sub(r"\{[^}]*\}", "{*}", key)].append(int(r.ttl(key)))
    summary = {k: {"n": len(v), "ttl_min": min(v), "ttl_max": max(v)} for k, v in sorted(kinds.items())}
    memory = r.info("memory")
    detail = {
        k: int(memory[k]) for k in ("used_memory_dataset", "used_memory_scripts", "mem_clients_normal") if k in memory
    }
    clients = r.info("clients")["connected_clients"]
    stats = r.memory_stats()
    detail["memory_stats"] = {k: v for k, v in stats.items() if isinstance(v, int) and v}
    return {
        "dbsize": r.dbsize(),
        "used_memory": int(memory["used_memory"]),
        **detail,
        "clients": clients,
        "keys": summary,
    }


async def report(label: str, procs: list[Proc], url: str, tmp_before: set[str]) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http:
        out: dict[str, Any] = {"at": label}
        for proc in procs:
            out[proc.name] = await proc.sample(http, int(url.rsplit(":", 1)[1].split("/")[0]))
    out["redis"] = redis_keys(url)
    out["tmp_new"] = sorted(set(os.listdir("/tmp")) - tmp_before)[:20]
    print(json.dumps(out), flush=True)
    return out


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--round", type=float, default=60, help="seconds of load per round")
    parser.add_argument("--clients", type=int, default=5, help="concurrent clients per process")
    parser.add_argument("--quiet", type=float, default=60, help="seconds after the load before the last look")
    parser.add_argument("--trace", action="store_true", help="tracemalloc in the servers: what grew since round 1")
    parser.add_argument("--trim", action="store_true", help="the probe calls malloc_trim(0) before RSS is read again")
    parser.add_argument("--out", type=Path, default=None, help="write every sample here as JSON lines")
    args = parser.parse_args()
    tmp_before = set(os.listdir("/tmp"))
    with redis_server() as (url, _), tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        (tmp / "redis.toml").write_text(config({"use": "redis", "url": url}))
        (tmp / "memory.toml").write_text(config({"use": "memory"}))
        a = Proc("A", tmp / "redis.toml", tmp, args.trace, args.trim)
        b = Proc("B", tmp / "redis.toml", tmp, args.trace, args.trim)
        c = Proc("C", tmp / "memory.toml", tmp, args.trace, args.trim)
        procs = [a, b, c]
        tmp_before |= {tmp.name}
        samples = [await report("start", procs, url, tmp_before)]
        try:
            for n in range(1, args.rounds + 1):
                stop = time.monotonic() + args.round
                pairs = [(a, b), (b, a), (c, c)]
                await asyncio.gather(*(client_loop(pairs, stop) for _ in range(args.clients * 3)))
                print(json.dumps({"round": n, "done": DONE, "errors": ERRORS}), flush=True)
                samples.append(await report(f"round {n}", procs, url, tmp_before))
            waited = 0.0
            while waited < args.quiet:
                await asyncio.sleep(min(15, args.quiet - waited))
                waited += min(15, args.quiet - waited)
                samples.append(await report(f"quiet +{waited:.0f}s", procs, url, tmp_before))
        finally:
            if args.out:
                args.out.write_text("".join(json.dumps(s) + "\n" for s in samples))
            for proc in procs:
                proc.proc.send_signal(signal.SIGTERM)
            for proc in procs:
                try:
                    proc.proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.proc.kill()


if __name__ == "__main__":
    asyncio.run(main())
