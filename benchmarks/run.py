"""Run every benchmark scenario against connic and both baselines, interleaved, and print a table.

    python benchmarks/run.py                     # full run (about 25 minutes)
    python benchmarks/run.py --quick             # shorter runs, fewer repetitions, smaller sizes
    python benchmarks/run.py --only S1,S2,S7,S8  # some scenarios (M: the memory figures)
    python benchmarks/run.py --only R1,R7,R8,W2,RM --quick   # the redis store and --workers
    python benchmarks/run.py --profile           # S1 against connic under cProfile; prints the hot spots

Scenarios (see docs/performance.md): S1 streaming echo of a 20-word message at 50 connections
(turns/s); S2 the same, non-streaming; S3 p50/p99 to ack, first chunk and stream_end at half the
aiohttp baseline's S1 rate; S4 memory per idle authenticated connection at 1k/5k/10k; S5
connection setup rate; S6 start-up time of `python -m connic run` until it accepts connections;
S7 "LLM pace": 1,000 sessions, 20 chunks 50 ms apart from an agent reading a 50-entry history
each turn (server CPU per turn, turn latency; llm_pace.py); S8 1,000 sessions dropped
mid-stream and resumed at once (resume.py); M memory per idle attached and detached session and
the replay log's bytes per frame (memory.py). With the redis store (redis_fleet.py, each with a
redis-server of its own): R1 S1 on redis vs memory; R7 S7 CPU per turn on redis vs memory; R8
S8 resumed on the other of two processes; W2 `--workers 2` vs 1 on S2 and S7; RM Redis memory
per session and per replay frame.
Servers run as subprocesses on 127.0.0.1; everything is stopped at the end, even on Ctrl+C.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import platform
import pstats
import signal
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
import llm_pace
import loadgen
import memory
import redis_fleet
import resume
import servers
from servers import free_port, rss_kib, wait_for_port

HERE = Path(__file__).resolve().parent
SECRET = servers.SECRET
SERVERS = ("connic", "aiohttp", "websockets")
SCENARIOS = ("S1", "S2", "S3", "S4", "S5", "S6", "S7", "S8", "M", *redis_fleet.SCENARIOS)


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


def scenarios(quick: bool, only: set[str], sessions: int | None = None) -> dict[str, Any]:
    duration = 5.0 if quick else 15.0
    rounds = 2 if quick else 3
    processes = 2
    results: dict[str, dict[str, list[float]]] = {s: {} for s in SERVERS}
    results["_meta"] = {"rounds": [rounds], "duration": [duration]}

    def record(server: str, key: str, value: float) -> None:
        results[server].setdefault(key, []).append(value)

    # S3's offered rate is half the aiohttp baseline's S1 maximum: S3 needs S1's rounds.
    if only & {"S1", "S2", "S3", "S5"}:
        for round_ in range(rounds):
            for server in SERVERS:
                print(f"round {round_ + 1}/{rounds}: {server}", file=sys.stderr)
                if only & {"S1", "S3"}:
                    with running(server, streaming=True) as (url, _):
                        record(server, "S1 turns/s", loadgen.closed_loop(url, SECRET, 50, duration, processes))
                if "S2" in only:
                    with running(server, streaming=False) as (url, _):
                        record(server, "S2 turns/s", loadgen.closed_loop(url, SECRET, 50, duration, processes))
                if "S5" in only:
                    with running(server) as (url, _):
                        rate = loadgen.setup_rate(url, SECRET, 20, duration / 2, processes)
                        record(server, "S5 connections/s", rate)
    if "S3" in only:
        rate = median(results["aiohttp"]["S1 turns/s"]) / 2
        for _ in range(rounds):
            for server in SERVERS:
                with running(server) as (url, _):
                    summary = loadgen.open_loop(url, SECRET, rate, duration, 50, processes)
                for key in ("ack_p50", "ack_p99", "first_p50", "first_p99", "end_p50", "end_p99"):
                    record(server, f"S3 {key} ms", summary.get(key, float("nan")) * 1000)
                record(server, "S3 lost", summary["lost"])
        results["_meta"]["S3 offered rate"] = [rate]
    if "S4" in only:
        for n in (1000, 5000) if quick else (1000, 5000, 10000):
            for server in SERVERS:
                print(f"S4 {n} idle connections: {server}", file=sys.stderr)
                record(server, f"S4 KB/conn @{n}", idle_memory(server, n, processes) / 1024)
    if "S6" in only:
        startups = [startup_time() for _ in range(3 if quick else 5)]
        results["connic"]["S6 start-up s"] = [s for s, _ in startups]
        results["connic"]["S6 LLM SDK imported"] = [float(any(i for _, i in startups))]
    many = sessions or (100 if quick else 1000)
    if "S7" in only:
        pace = llm_pace.run_both(many, 2 if quick else 5, rounds=1 if quick else 2)
        for server, runs in pace.items():
            for r in runs:
                record(server, f"S7 CPU µs/turn @{many}", r["cpu_us_per_turn"])
                record(server, "S7 turn p50 s", r["p50_s"])
                record(server, "S7 turn p99 s", r["p99_s"])
                record(server, "S7 server CPU share", r["cpu_share"])
                if "log_bytes_per_frame" in r:
                    record(server, "S7 replay log bytes/frame (encoded)", r["log_bytes_per_frame"])
                    record(server, "S7 replay log bytes/frame (in memory)", r["log_memory_per_frame"])
        results["_meta"]["S7"] = pace
    if "S8" in only:
        results["_meta"]["S8"] = []
        # At 1,000 the resumes queue behind each other: smaller bursts show how p99 grows with them.
        runs = [(many, True), (many, False)] + [(many // k, True) for k in (4, 2) if not quick]
        for n, preconnect in runs:
            print(f"S8 {n} sessions, {'preconnected' if preconnect else 'reconnect'}", file=sys.stderr)
            r = resume.measure(n, preconnect)
            results["_meta"]["S8"].append(r)
            mode = r["mode"] if n == many else f"{r['mode']} @{n}"
            record("connic", f"S8 {mode}: resume → first replayed p50 ms", r["replayed_p50_ms"])
            record("connic", f"S8 {mode}: resume → first replayed p99 ms", r["replayed_p99_ms"])
            record("connic", f"S8 {mode}: resume → connected p99 ms", r["connected_p99_ms"])
            record("connic", f"S8 {mode}: replies complete, no gap", r["complete"])
            record("connic", f"S8 {mode}: sessions", r["sessions"])
            if preconnect:
                # The baseline: bare aiohttp answering one frame on each connection, all sent at once.
                base = resume.floor(n)
                results["_meta"]["S8"].append({"baseline": "aiohttp, one frame each at once", **base})
                record("aiohttp", f"S8 {mode}: resume → first replayed p50 ms", base["p50_ms"])
                record("aiohttp", f"S8 {mode}: resume → first replayed p99 ms", base["p99_ms"])
    if "M" in only:
        n = sessions or (1000 if quick else 5000)
        figures = memory.measure(n)
        results["_meta"]["M"] = figures
        record("connic", f"M KB per idle attached session @{n}", figures["attached"]["kb"])
        record("connic", f"M KB per detached session, empty log @{n}", figures["detached_empty"]["kb"])
        log = figures["detached_log"]
        per = log["frames_per_session"]
        record("connic", f"M KB per detached session, {per:.0f} frames logged @{n}", log["kb"])
        record("connic", "M replay log bytes/frame (encoded)", log["log_bytes_per_frame"])
        record("connic", "M replay log bytes/frame (in memory)", log["log_memory_per_frame"])
        record("connic", "M RSS bytes per logged frame (with history)", log["rss_per_frame"])
    if only & set(redis_fleet.SCENARIOS):
        redis_fleet.record(results, redis_fleet.measure(only & set(redis_fleet.SCENARIOS), quick, sessions))
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
    if any(k.startswith(("S1", "S2", "S3", "S5")) for k in keys):
        lines.append(f"Medians of {meta['rounds'][0]} interleaved rounds of {meta['duration'][0]:g} s.")
    if "S3 offered rate" in meta:
        lines.append(f"S3 offered rate: {meta['S3 offered rate'][0]:.0f} messages/s.")
    # The rounds themselves: on a shared machine the spread says how far to trust a median.
    lines.append("")
    lines.append("Each round, in order:")
    for key in keys:
        if key.startswith(("S1", "S2", "S5", "S7")):
            form = ".0f" if key.startswith(("S1", "S2", "S5")) else ".4g"
            rounds = "; ".join(
                f"{s} " + ", ".join(f"{v:{form}}" for v in results[s][key]) for s in SERVERS if results[s].get(key)
            )
            lines.append(f"- {key}: {rounds}")
    lines += ["", "Against the targets:", *targets(results)]
    for key in ("S7", "S8", "M", *redis_fleet.SCENARIOS):
        if key in meta:
            lines += ["", f"{key} in full:", json.dumps(meta[key], indent=1, default=str)]
    return "\n".join(lines)


def targets(results: dict[str, Any]) -> list[str]:
    """Each measured figure beside its target (docs/performance.md)."""
    connic, base = results["connic"], results["aiohttp"]
    lines = []

    def ratio(key: str) -> float:
        return median(connic.get(key, [])) / median(base.get(key, []))

    for key in ("S1 turns/s", "S2 turns/s"):
        if key in connic:
            r = ratio(key)
            lines.append(
                f"- {key[:2]}: {r:.2f}x the aiohttp baseline (target >= 0.85): {'met' if r >= 0.85 else 'MISSED'}"
            )
    cpu_key = next((k for k in connic if k.startswith("S7 CPU")), None)
    if cpu_key:
        r = ratio(cpu_key)
        lines.append(
            f"- S7: server CPU per turn {r:.2f}x the baseline's (target <= 1.15): {'met' if r <= 1.15 else 'MISSED'}"
        )
        lines.append(
            f"- S7: turn p50/p99 connic {median(connic['S7 turn p50 s']):.3f}/{median(connic['S7 turn p99 s']):.3f} s, "
            f"aiohttp {median(base['S7 turn p50 s']):.3f}/{median(base['S7 turn p99 s']):.3f} s (ideal 1.0 s); "
            f"p99 above the ideal: connic {(median(connic['S7 turn p99 s']) - 1) * 1000:.0f} ms, "
            f"aiohttp {(median(base['S7 turn p99 s']) - 1) * 1000:.0f} ms"
        )
    for key in [k for k in connic if k.startswith("S8") and "first replayed p99" in k and "@" not in k]:
        v = median(connic[key])
        floor = f"; bare aiohttp answering the same burst: {median(base[key]):.1f}" if key in base else ""
        lines.append(f"- {key}: {v:.1f} (target <= 20 ms): {'met' if v <= 20 else 'MISSED'}{floor}")
    for key in [k for k in connic if k.startswith("S8") and "complete" in k and "@" not in k]:
        total = median(connic[key.replace("replies complete, no gap", "sessions")])
        v = median(connic[key])
        lines.append(f"- {key}: {v:.0f} of {total:.0f}: {'met' if v == total else 'MISSED'}")
    for key in connic:
        if key.startswith("M KB per idle attached"):
            v = median(connic[key])
            lines.append(f"- {key}: {v:.1f} (target <= 1.2 x 16 = 19.2): {'met' if v <= 19.2 else 'MISSED'}")
        if key.startswith("M KB per detached session, empty"):
            v = median(connic[key])
            lines.append(f"- {key}: {v:.1f} (target <= 20): {'met' if v <= 20 else 'MISSED'}")
    return lines + redis_fleet.targets(connic)


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
    parser.add_argument(
        "--only", metavar="LIST", help=f"comma-separated scenarios to run, of {','.join(SCENARIOS)} (default: all)"
    )
    parser.add_argument(
        "--sessions",
        type=int,
        metavar="N",
        help="sessions in S7, S8 and M (default 1000, 5000 for M; --quick 100, 1000)",
    )
    args = parser.parse_args()
    only = set(SCENARIOS)
    if args.only:
        only = {name.strip().upper() for name in args.only.split(",") if name.strip()}
        unknown = only - set(SCENARIOS)
        if unknown:
            parser.error(f"--only: unknown scenario {', '.join(sorted(unknown))} (known: {', '.join(SCENARIOS)})")
    loadgen.raise_fd_limit()
    if args.profile:
        profile(10.0)
        return
    print(f"machine: {machine()}")
    print(table(scenarios(args.quick, only, args.sessions)))


if __name__ == "__main__":
    main()
