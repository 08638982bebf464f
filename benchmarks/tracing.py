"""What OpenTelemetry costs connic: S1 and S7 with telemetry off, on without an SDK, and on with one.

    python benchmarks/tracing.py                  # S1 and S7, 3 rounds (about 10 minutes)
    python benchmarks/tracing.py --quick          # shorter runs, 100 S7 sessions
    python benchmarks/tracing.py --only S1
    python benchmarks/tracing.py --micro          # µs per turn of the hook alone, each way (a minute)

Three connic servers (benchmarks/connic_server.py, S1's connector), interleaved round by round:

- ``off``: ``[server] telemetry = "off"``, OpenTelemetry never imported: what a server without
  the ``connic[otel]`` extra runs;
- ``no-sdk``: ``telemetry = "auto"`` with ``opentelemetry-api`` installed and no SDK configured;
- ``sdk``: the same under benchmarks/otel_sdk.py: the SDK's tracer and meter providers, a batch
  span processor and a metric reader, exporting nowhere: every turn makes and ends its span
  and records its metrics.

``--micro`` times one turn of 22 frames (stream_start, 20 chunks, stream_end) through
``connic.telemetry.answer`` against the chain called directly, in a fresh interpreter per
variant, plus ``not-installed`` (OpenTelemetry made unimportable): the best of 7 runs of
20,000 turns each way, with a stand-in session whose ``emit`` only counts.

S1: turns/s of the streaming echo agent at 50 connections in closed loop (higher is better).
S7: server CPU µs per turn of the LLM-pace agent, and turn p50/p99 (docs/performance.md).
Needs opentelemetry-api and opentelemetry-sdk (the test extra).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llm_pace
import loadgen
import servers

HERE = Path(__file__).resolve().parent
VARIANTS = ("off", "no-sdk", "sdk")


@contextlib.contextmanager
def connic(variant: str, agent: str) -> Iterator[tuple[str, int, int]]:
    """One connic server for ``variant``; yields (url, port, pid)."""
    port = servers.free_port()
    telemetry = "off" if variant == "off" else "auto"
    boot = [str(HERE / "otel_sdk.py")] if variant == "sdk" else []
    script = [str(HERE / "connic_server.py"), "--port", str(port), "--agent", agent, "--telemetry", telemetry]
    with servers.serve([sys.executable, *boot, *script], port) as pid:
        yield f"ws://127.0.0.1:{port}/ws", port, pid


class _NoOpenTelemetry:
    """A meta-path finder that makes OpenTelemetry unimportable: the extra is not installed."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
        if name == "opentelemetry" or name.startswith("opentelemetry."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)


def micro_one(variant: str) -> None:
    """Print µs per turn directly and through the telemetry hook, in this interpreter, for ``variant``."""
    if variant == "not-installed":
        sys.meta_path.insert(0, _NoOpenTelemetry())
    elif variant == "sdk":
        import otel_sdk

        otel_sdk.install()
    from connic import telemetry
    from connic.agent import Session, Turn
    from connic.config import ServerConfig
    from connic.frames import StreamChunk, StreamEnd, StreamStart
    from connic.metrics import Metrics

    telemetry.configure(ServerConfig(telemetry="off" if variant == "off" else "auto"), Metrics())

    class Stand:
        """What the hook reads of a message and its session."""

        def __init__(self) -> None:
            self.seq = 0
            self.sessions = self
            self.label = "/ws"
            self.session = self
            self.frame = self
            self.context: dict[str, Any] = {}
            self.handshake = None

        async def emit(self, frame: Any) -> None:
            self.seq += 1

    message: Any = Stand()
    turn = Turn("m", 1, "hello", {}, (), Session("s", (), {}), "bot")
    frames = [StreamStart("m", "bot"), *(StreamChunk("m", "bot", "w ") for _ in range(20))]
    frames.append(StreamEnd("m", "bot", "w " * 20, {"prompt_tokens": 20, "candidates_tokens": 20}, "stop"))

    async def chain(turn: Turn, emit: Any) -> None:
        for frame in frames:
            await emit(frame)

    async def timed(hooked: bool, n: int) -> float:
        started = time.perf_counter()
        for _ in range(n):
            await (telemetry.answer(chain, turn, message) if hooked else chain(turn, message.emit))
        return (time.perf_counter() - started) / n * 1e6

    async def run() -> None:
        n = 2_000 if variant == "sdk" else 20_000  # the SDK's turns are slower: the same time per run
        await timed(True, n // 10)
        direct, hooked = min([await timed(False, n) for _ in range(7)]), min([await timed(True, n) for _ in range(7)])
        loaded = any(m.startswith("opentelemetry") for m in sys.modules)
        print(f"| {variant} | {direct:.2f} | {hooked:.2f} | {hooked - direct:+.2f} | {loaded} |")

    asyncio.run(run())


def micro() -> None:
    """Run :func:`micro_one` for every variant, each in an interpreter of its own."""
    print("| variant | direct µs/turn | through the hook | difference | OpenTelemetry loaded |")
    print("|---|---|---|---|---|")
    for variant in ("not-installed", *VARIANTS):
        subprocess.run([sys.executable, __file__, "--micro-one", variant], check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="shorter runs, fewer rounds and sessions")
    parser.add_argument("--only", default="S1,S7", help="S1, S7 or both (default S1,S7)")
    parser.add_argument("--sessions", type=int, help="S7 sessions (default 1000; --quick 100)")
    parser.add_argument("--micro", action="store_true", help="time the hook alone instead (see above)")
    parser.add_argument("--micro-one", metavar="VARIANT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.micro_one:
        micro_one(args.micro_one)
        return
    if args.micro:
        micro()
        return
    only = {name.strip().upper() for name in args.only.split(",")}
    if not only <= {"S1", "S7"}:
        parser.error("--only: S1, S7 or both")
    servers.raise_fd_limit()
    duration, rounds = (5.0, 2) if args.quick else (15.0, 3)
    sessions = args.sessions or (100 if args.quick else 1000)
    results: dict[str, dict[str, list[float]]] = {v: {} for v in VARIANTS}
    for round_ in range(rounds):
        for variant in VARIANTS:
            print(f"round {round_ + 1}/{rounds}: {variant}", file=sys.stderr)
            if "S1" in only:
                with connic(variant, "echo") as (url, _, _):
                    rate = loadgen.closed_loop(url, servers.SECRET, 50, duration, 2)
                results[variant].setdefault("S1 turns/s", []).append(rate)
            if "S7" in only:
                with connic(variant, "pace") as (url, _, pid):
                    r = llm_pace.measure(url, pid, sessions, 2 if args.quick else 5)
                for key, value in (("cpu_us_per_turn", "S7 CPU µs/turn"), ("p50_s", "S7 p50 s"), ("p99_s", "S7 p99 s")):
                    results[variant].setdefault(value, []).append(r[key])
    keys = [k for k in results["off"]]
    print(f"| median of {rounds} | " + " | ".join(VARIANTS) + " | sdk / off |")
    print("|---|" + "---|" * (len(VARIANTS) + 1))
    for key in keys:
        medians = [statistics.median(results[v][key]) for v in VARIANTS]
        cells = " | ".join(f"{m:.4g}" for m in medians)
        print(f"| {key} | {cells} | {medians[-1] / medians[0]:.3f} |")


if __name__ == "__main__":
    main()
