"""Run every benchmark scenario against connic and both baselines, interleaved, and print a table.

    python benchmarks/run.py            # full run (several minutes)
    python benchmarks/run.py --quick    # shorter runs, fewer repetitions
    python benchmarks/run.py --profile  # S1 against connic under cProfile; prints the hot spots

Scenarios (see docs/performance.md): S1 streaming echo of a 20-word message at 50 connections
(turns/s); S2 the same, non-streaming; S3 p50/p99 to ack, first chunk and stream_end at half the
aiohttp baseline's S1 rate; S4 memory per idle authenticated connection at 1k/5k/10k; S5
connection setup rate; S6 start-up time of `python -m connic run` until it accepts connections.
Servers run as subprocesses on 127.0.0.1; everything is stopped at the end, even on Ctrl+C.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import os
import platform
import pstats
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
import loadgen

HERE = Path(__file__).resolve().parent
SECRET = "bench"
SERVERS = ("connic", "aiohttp", "websockets")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def connic_config(port: int, streaming: bool) -> str:
    return f"""
[server]
host = "127.0.0.1"
port = {port}
max_connections = 0
metrics = false
playground = false

[agents.echo]
use = "echo"

[[connectors]]
path = "/ws"
secrets = ["{SECRET}"]
streaming = {"true" if streaming else "false"}
max_messages = 10000
max_queued = 1000
heartbeat = 30
"""


def command(server: str, port: int, streaming: bool, workdir: Path) -> list[str]:
    if server == "connic":
        path = workdir / f"connic-{port}.toml"
        path.write_text(connic_config(port, streaming))
        return [sys.executable, "-m", "connic", "run", "--config", str(path), "--log-level", "WARNING"]
    script = HERE / f"baseline_{server}.py"
    return [sys.executable, str(script), "--port", str(port), "--secret", SECRET] + (
        [] if streaming else ["--no-streaming"]
    )


def wait_for_port(port: int, timeout: float = 20.0) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return time.monotonic() - started
        time.sleep(0.005)
    raise RuntimeError(f"nothing listens on {port} after {timeout} s")


@contextlib.contextmanager
def running(server: str, streaming: bool = True, wrap: list[str] | None = None) -> Iterator[tuple[str, int]]:
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        cmd = command(server, port, streaming, Path(tmp))
        if wrap:
            cmd = wrap + cmd[1:]  # the wrapper replaces the interpreter: python -m cProfile -o F -m connic ...
        proc = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, preexec_fn=loadgen.raise_fd_limit
        )
        try:
            wait_for_port(port)
            yield f"ws://127.0.0.1:{port}/ws", proc.pid
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def idle_memory(server: str, n: int, processes: int) -> float:
    """Bytes of server RSS per idle authenticated connection."""
    ctx = mp.get_context("spawn")
    with running(server) as (url, pid):
        loadgen.closed_loop(url, SECRET, 4, 0.5, 1)  # warm up the server's code paths
        time.sleep(0.5)
        before = rss_kib(pid)
        manager = ctx.Manager()
        ready, release = manager.Queue(), manager.Event()
        share = [n // processes + (1 if i < n % processes else 0) for i in range(processes)]
        holders = [ctx.Process(target=loadgen._worker, args=("idle", (url, SECRET, k, ready, release))) for k in share]
        for holder in holders:
            holder.start()
        held = sum(ready.get(timeout=300) for _ in holders)
        time.sleep(1.0)
        after = rss_kib(pid)
        release.set()
        for holder in holders:
            holder.join(60)
        manager.shutdown()
    return (after - before) * 1024 / held


def startup_time() -> tuple[float, bool]:
    """Seconds until `python -m connic run` accepts connections; whether an LLM SDK got imported."""
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        cmd = command("connic", port, True, Path(tmp))
        started = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_for_port(port)
            elapsed = time.monotonic() - started
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=15)
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, connic; connic.create_app({'agents': {'e': {'use': 'echo'}}, "
            "'connectors': [{'secrets': ['s']}]}); print(any(m.startswith(('google.genai', 'google.generativeai')) "
            "for m in sys.modules))",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return elapsed, probe.stdout.strip() == "True"


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def scenarios(quick: bool) -> dict[str, Any]:
    duration = 5.0 if quick else 15.0
    rounds = 2 if quick else 3
    processes = 2
    results: dict[str, dict[str, list[float]]] = {s: {} for s in SERVERS}

    def record(server: str, key: str, value: float) -> None:
        results[server].setdefault(key, []).append(value)

    for round_ in range(rounds):
        for server in SERVERS:
            print(f"round {round_ + 1}/{rounds}: {server}", file=sys.stderr)
            with running(server, streaming=True) as (url, _):
                record(server, "S1 turns/s", loadgen.closed_loop(url, SECRET, 50, duration, processes))
            with running(server, streaming=False) as (url, _):
                record(server, "S2 turns/s", loadgen.closed_loop(url, SECRET, 50, duration, processes))
            with running(server) as (url, _):
                record(server, "S5 connections/s", loadgen.setup_rate(url, SECRET, 20, duration / 2, processes))
    s1_base = median(results["aiohttp"]["S1 turns/s"])
    rate = s1_base / 2
    for _ in range(rounds):
        for server in SERVERS:
            with running(server) as (url, _):
                summary = loadgen.open_loop(url, SECRET, rate, duration, 50, processes)
            for key in ("ack_p50", "ack_p99", "first_p50", "first_p99", "end_p50", "end_p99"):
                record(server, f"S3 {key} ms", summary.get(key, float("nan")) * 1000)
            record(server, "S3 lost", summary["lost"])
    for n in (1000, 5000) if quick else (1000, 5000, 10000):
        for server in SERVERS:
            print(f"S4 {n} idle connections: {server}", file=sys.stderr)
            record(server, f"S4 KB/conn @{n}", idle_memory(server, n, processes) / 1024)
    startups = [startup_time() for _ in range(3 if quick else 5)]
    results["connic"]["S6 start-up s"] = [s for s, _ in startups]
    results["connic"]["S6 LLM SDK imported"] = [float(any(i for _, i in startups))]
    results["_meta"] = {"S3 offered rate": [rate], "rounds": [rounds], "duration": [duration]}
    return results


def table(results: dict[str, Any]) -> str:
    keys = list(results["connic"])
    lines = ["| metric | connic | aiohttp | websockets | connic / aiohttp |", "|---|---|---|---|---|"]
    for key in keys:
        values = {s: median(results[s].get(key, [])) for s in SERVERS}
        ratio = (
            values["connic"] / values["aiohttp"]
            if values["aiohttp"] == values["aiohttp"] and values["aiohttp"]
            else None
        )
        cells = [f"{values[s]:.3g}" if values[s] == values[s] else "—" for s in SERVERS]
        lines.append(
            f"| {key} | " + " | ".join(cells) + f" | {ratio:.2f} |"
            if ratio
            else f"| {key} | " + " | ".join(cells) + " | — |"
        )
    meta = results["_meta"]
    lines.append("")
    lines.append(
        f"S3 offered rate: {meta['S3 offered rate'][0]:.0f} messages/s; medians of {meta['rounds'][0]} "
        f"interleaved rounds of {meta['duration'][0]:g} s."
    )
    # The rounds themselves: on a shared machine the spread says how far to trust a median.
    lines.append("")
    lines.append("Each round, in order:")
    for key in keys:
        if key.startswith(("S1", "S2", "S5")):
            rounds = "; ".join(f"{s} " + ", ".join(f"{v:.0f}" for v in results[s].get(key, [])) for s in SERVERS)
            lines.append(f"- {key}: {rounds}")
    return "\n".join(lines)


def machine() -> str:
    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return (
        f"{os.cpu_count()} cores ({cpu}), Python {platform.python_version()}, "
        f"aiohttp {aiohttp.__version__}, {platform.system()} {platform.release()}"
    )


def profile(duration: float) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "connic.prof"
        with running("connic", wrap=[sys.executable, "-m", "cProfile", "-o", str(out)]) as (url, _):
            # cProfile's runner re-executes `-m connic`; the inner command starts with the interpreter.
            rate = loadgen.closed_loop(url, SECRET, 50, duration, 2)
        print(f"S1 under cProfile: {rate:.0f} turns/s (profiling slows the server)")
        stats = pstats.Stats(str(out))
        stats.sort_stats("tottime").print_stats(20)
        stats.sort_stats("cumtime").print_stats(r"connic", 20)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="shorter runs and fewer repetitions")
    parser.add_argument("--profile", action="store_true", help="profile connic under S1 instead")
    args = parser.parse_args()
    loadgen.raise_fd_limit()
    if args.profile:
        profile(10.0)
        return
    print(f"machine: {machine()}")
    print(table(scenarios(args.quick)))


if __name__ == "__main__":
    main()
