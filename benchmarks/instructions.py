"""Instructions per turn in the server, counted by valgrind: a measure that machine noise cannot move.

    python benchmarks/instructions.py                 # S2-like (streaming off), all three servers
    python benchmarks/instructions.py --stream connic # S1-like, connic only
    python benchmarks/instructions.py --pace          # S7-like: connic and the aiohttp baseline

Each server runs under ``valgrind --tool=callgrind`` twice, answering 20 and then 120 turns
on each of 20 connections (a raw-socket client in this process sends a message, waits for its
end frame, and sends the next); the difference between the two runs' totals, divided by the
2000 extra turns, is the cost of one turn with start-up and shut-down cancelled out. The same
code gives the same count to within a few hundred instructions, so a change of 1% shows.
Instructions are not time (Python bytecode runs at fewer instructions per cycle than C), and
the kernel's share of sockets is not counted: use ``run.py`` for throughput. Needs valgrind
(Debian: ``apt-get install valgrind``); a run takes about a minute per server.

``--inprocess`` runs connic and the same client in one process and one event loop (the app
``connic run`` builds, served by aiohttp's runner, with its collector settings): the count then
includes the client's own work, but the order in which everything runs no longer depends on
the machine's load, so it repeats to within a few hundred instructions even on a busy machine,
where the two-process count moved by several thousand. For comparing two versions of connic.

``--pace`` counts an S7 turn instead (docs/performance.md): S7's history-reading agent
(benchmarks/connic_server.py ``--agent pace``) against ``baseline_aiohttp.py --pace``, 20 chunks
50 ms apart, each written on its own; 2 and then 6 turns on each of 20 connections (the
history grows by two entries a turn in both servers). About two minutes per server.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run

CONNECTIONS = 20
FEW, MANY = 20, 120
PACE_FEW, PACE_MANY = 2, 6  # S7 turns take a second each
MESSAGE = json.dumps({"message": " ".join(f"word{i}" for i in range(20))}).encode()
END_MARK = b'"token_usage"'  # once in each response and stream_end, in no other frame


def client_frame(payload: bytes) -> bytes:
    """A masked text frame, as a client must send it."""
    mask = os.urandom(4)
    size = len(payload)
    head = bytes([0x81, 0x80 | size]) if size < 126 else bytes([0x81, 0x80 | 126]) + struct.pack("!H", size)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


async def one_connection(port: int, turns: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    await reader.readuntil(b"\r\n\r\n")
    writer.write(client_frame(json.dumps({"secret": run.SECRET}).encode()))
    seen = b""
    while b"connected" not in seen:
        seen += await reader.read(65536)
    message = client_frame(MESSAGE)
    tail = b""
    for _ in range(turns):
        writer.write(message)
        while True:
            chunk = await reader.read(65536)
            if not chunk:
                raise RuntimeError("the server closed the connection")
            data = tail + chunk
            if END_MARK in data:
                tail = b""
                break
            tail = data[-(len(END_MARK) - 1) :]  # a mark split between two reads
    writer.close()


def pace_command(server: str, port: int) -> list[str]:
    """S7's servers: connic with the history-reading agent, or the aiohttp baseline doing the same."""
    if server == "connic":
        script = ["connic_server.py", "--port", str(port), "--secret", run.SECRET, "--agent", "pace"]
    else:
        script = ["baseline_aiohttp.py", "--port", str(port), "--secret", run.SECRET, "--pace"]
    return [sys.executable, str(Path(__file__).resolve().parent / script[0]), *script[1:]]


def total_instructions(server: str, streaming: bool, turns: int, pace: bool = False) -> int:
    port = run.free_port()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "callgrind.out"
        cmd = pace_command(server, port) if pace else run.command(server, port, streaming, Path(tmp))
        cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable, *cmd[1:]]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            run.wait_for_port(port, timeout=300)
            time.sleep(1.0)  # let the server finish starting up before the counted work

            async def clients() -> None:
                await asyncio.gather(*(one_connection(port, turns) for _ in range(CONNECTIONS)))

            asyncio.run(clients())
            time.sleep(0.5)
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=120)
        match = re.search(rb"^(?:summary|totals): (\d+)", out.read_bytes(), re.MULTILINE)
        if match is None:
            raise RuntimeError(f"no instruction total in {server}'s callgrind output")
        return int(match.group(1))


def inprocess_total(streaming: bool, turns: int) -> int:
    """Instructions of connic and the client in one process (``--inprocess``) answering ``turns`` per connection."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "callgrind.out"
        child = [sys.executable, __file__, "--serve-and-drive", str(turns)] + (["--stream"] if streaming else [])
        cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", *child]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        match = re.search(rb"^(?:summary|totals): (\d+)", out.read_bytes(), re.MULTILINE)
        if match is None:
            raise RuntimeError("no instruction total in the in-process run's callgrind output")
        return int(match.group(1))


def serve_and_drive(streaming: bool, turns: int) -> None:
    """The child of ``--inprocess``: connic from this checkout, and the clients, in one event loop."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's connic
    from connic.config import load_config

    port = run.free_port()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "connic.toml"
        path.write_text(run.connic_config(port, streaming))
        config = load_config(path)
    asyncio.run(_serve_and_drive(config, port, turns))


async def _serve_and_drive(config: Any, port: int, turns: int) -> None:  # a connic.config.Config
    import gc

    from aiohttp import web

    import connic
    from connic.serving import GC_YOUNG_THRESHOLD

    runner = web.AppRunner(connic.create_app(config))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    gc.freeze()  # as connic run does once started (connic/serving.py)
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
    await asyncio.gather(*(one_connection(port, turns) for _ in range(CONNECTIONS)))
    await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stream", action="store_true", help="streaming on (S1-like); default off (S2-like)")
    parser.add_argument("--pace", action="store_true", help="S7-like turns (connic and aiohttp only)")
    parser.add_argument(
        "--inprocess", action="store_true", help="connic and the client in one process: repeatable on a busy machine"
    )
    parser.add_argument("--serve-and-drive", type=int, metavar="TURNS", help=argparse.SUPPRESS)
    parser.add_argument("servers", nargs="*", metavar="server", help=f"any of {', '.join(run.SERVERS)} (default: all)")
    args = parser.parse_args()
    if args.serve_and_drive is not None:
        serve_and_drive(args.stream, args.serve_and_drive)
        return
    unknown = set(args.servers) - set(run.SERVERS)
    if unknown:
        parser.error(f"unknown server(s): {', '.join(sorted(unknown))}; choose from {', '.join(run.SERVERS)}")
    if shutil.which("valgrind") is None:
        sys.exit("valgrind is not installed (Debian: apt-get install valgrind)")
    if args.pace and "websockets" in args.servers:
        parser.error("--pace: the websockets baseline has no S7 mode; choose from connic, aiohttp")
    kind = "S7-like (pace)" if args.pace else f"streaming {'on' if args.stream else 'off'}"
    print(f"machine: {run.machine()}; {kind}")
    if args.inprocess:
        if args.pace or set(args.servers) - {"connic"}:
            parser.error("--inprocess: connic only, S1- or S2-like")
        with ThreadPoolExecutor(2) as pool:  # the two runs side by side: their counts do not depend on the load
            few, many = pool.map(lambda turns: inprocess_total(args.stream, turns), (FEW, MANY))
        count = (many - few) / ((MANY - FEW) * CONNECTIONS)
        print(f"connic, in one process with the client: {count / 1000:.1f}k instructions per turn")
        return
    few_turns, many_turns = (PACE_FEW, PACE_MANY) if args.pace else (FEW, MANY)
    counts = {}
    for server in args.servers or (("connic", "aiohttp") if args.pace else run.SERVERS):
        few = total_instructions(server, args.stream, few_turns, args.pace)
        many = total_instructions(server, args.stream, many_turns, args.pace)
        counts[server] = (many - few) / ((many_turns - few_turns) * CONNECTIONS)
        print(f"{server:10s} {counts[server] / 1000:7.1f}k instructions per turn", flush=True)
    if "aiohttp" in counts and len(counts) > 1:
        for server, count in counts.items():
            if server != "aiohttp":
                print(f"{server} / aiohttp: {count / counts['aiohttp']:.2f}")


if __name__ == "__main__":
    main()
