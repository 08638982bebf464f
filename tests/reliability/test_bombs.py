"""Compression bombs: a few MB on the wire that inflate to gigabytes. The server inflates no
more than the bound allows (``max_frame_bytes``, ``max_auth_frame_bytes`` before ``connected``,
an AG-UI run's ``max_body_bytes`` sent with ``Content-Encoding: gzip``), refuses (1009, 413),
and its memory stays flat (a subprocess server, its RSS sampled from /proc throughout)."""

from __future__ import annotations

import asyncio
import struct
import zlib
from collections.abc import Callable

import aiohttp
import pytest
from deflate_client import RSV1, TAIL, Peer, connect, open_client, reset_clients

from .conftest import Proc, RssSampler, kib, report
from .rawws import CLOSE, CONTINUATION, TEXT, frame

__all__ = ["reset_clients"]  # the fixture, autouse: every test here resets the clients it left open

MAX_FRAME = 4 * 1024 * 1024
SERVER_TOML = f"""
[agents.assistant]
use = "echo"

[[connectors]]
secrets = ["test-secret"]
compress = true
heartbeat = 0
max_frame_bytes = {MAX_FRAME}

[[connectors]]
transport = "agui"
path = "/agui"
secrets = ["test-secret"]
"""
AUTH = {"secret": "test-secret"}
GROWTH_KIB = 64 * 1024  # what a bomb may add to the server's RSS at its peak: far below one inflated


def bomb(mib: int) -> bytes:
    """A permessage-deflate payload of ``mib`` MiB of zeros (its 4-byte tail stripped): about 1 KiB a MiB.

    Each MiB is deflated with a full flush, which resets the window: every piece is the same
    bytes, so a gigabyte costs one MiB's compression.
    """
    deflater = zlib.compressobj(9, zlib.DEFLATED, -15)
    piece = deflater.compress(b"\x00" * 2**20) + deflater.flush(zlib.Z_FULL_FLUSH)
    whole = piece * mib
    assert whole.endswith(TAIL)
    return whole[: -len(TAIL)]


async def settled(server: Proc) -> int:
    """RSS once it has stopped growing (bounded wait)."""
    last = server.rss_kib()
    for _ in range(40):
        await asyncio.sleep(0.25)
        now = server.rss_kib()
        if abs(now - last) < 256:
            return now
        last = now
    return last


async def refused(peer: Peer) -> None:
    got = await peer.ws.read_frame(timeout=30)
    assert got.opcode == TEXT and peer.decode(got)["code"] == "message_too_large", got
    got = await peer.ws.read_frame(timeout=30)
    assert (got.opcode, got.close_code) == (CLOSE, 1009), got


def one_frame(payload: bytes) -> list[bytes]:
    return [frame(TEXT, payload, rsv=RSV1)]


def fragments(payload: bytes) -> list[bytes]:
    """The same message as 64 KiB fragments (RSV1 on the first only, RFC 7692)."""
    size = 64 * 1024
    parts = [payload[start : start + size] for start in range(0, len(payload), size)]
    first = frame(TEXT, parts[0], fin=False, rsv=RSV1)
    middle = [frame(CONTINUATION, part, fin=False) for part in parts[1:-1]]
    return [first, *middle, frame(CONTINUATION, parts[-1])]


@pytest.mark.parametrize("shape", [one_frame, fragments], ids=["one_frame", "fragments"])
async def test_a_gigabyte_bomb_is_refused_and_memory_stays_flat(
    run_cli: Callable[..., Proc], shape: Callable[[bytes], list[bytes]]
) -> None:
    payload = bomb(3 * 1024)  # 3 GiB once inflated
    assert len(payload) < MAX_FRAME  # on the wire, it is within the bound
    server = run_cli(SERVER_TOML, "--log-level", "WARNING")
    peer, _ = await connect(server.port, True, auth=AUTH)
    before = await settled(server)
    with RssSampler(server) as rss:
        for data in shape(payload):
            await peer.ws.send_raw(data)
        await refused(peer)
        after = await settled(server)
    report(
        f"a 3 GiB deflate bomb ({shape.__name__}, {len(payload) / 2**20:.1f} MiB sent): RSS",
        f"{kib(before)} → peak {kib(rss.peak)}, then {kib(after)}",
    )
    assert rss.peak - before < GROWTH_KIB, (before, rss.peak)
    # The server goes on serving.
    other, _ = await connect(server.port, True, auth=AUTH)
    await other.ws.send_json({"id": "m", "message": "still here"})
    assert (await other.until("stream_end", timeout=10))[-1]["full_response"] == "still here"


async def test_a_bomb_as_the_auth_frame_is_refused_under_the_auth_bound(run_cli: Callable[..., Proc]) -> None:
    server = run_cli(SERVER_TOML, "--log-level", "WARNING")
    ws = await open_client(server.port, True)
    peer = Peer(ws, True)
    payload = bomb(12)  # 12 KiB on the wire, under max_auth_frame_bytes (16 KiB); 12 MiB inflated
    before = await settled(server)
    with RssSampler(server) as rss:
        await ws.send_raw(frame(TEXT, payload, rsv=RSV1))
        await refused(peer)
    assert rss.peak - before < GROWTH_KIB, (before, rss.peak)


def gzip_bomb(mib: int) -> bytes:
    """A gzip stream of ``mib`` MiB of zeros, built as :func:`bomb` is (about 1 KiB a MiB)."""
    zero = b"\x00" * 2**20
    deflater = zlib.compressobj(9, zlib.DEFLATED, -15)
    piece = deflater.compress(zero) + deflater.flush(zlib.Z_FULL_FLUSH)
    crc = 0
    for _ in range(mib):
        crc = zlib.crc32(zero, crc)
    end = zlib.compressobj(9, zlib.DEFLATED, -15).flush(zlib.Z_FINISH)  # an empty final block
    trailer = struct.pack("<II", crc, (mib * 2**20) & 0xFFFFFFFF)
    return b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff" + piece * mib + end + trailer


async def test_a_gzip_bomb_as_an_agui_body_is_413_and_memory_stays_flat(run_cli: Callable[..., Proc]) -> None:
    body = gzip_bomb(512)  # 512 MiB once inflated, some 520 KiB sent: under the bound on the wire
    server = run_cli(SERVER_TOML, "--log-level", "WARNING")
    before = await settled(server)
    headers = {"Authorization": "Bearer test-secret", "Content-Type": "application/json", "Content-Encoding": "gzip"}
    with RssSampler(server) as rss:
        async with (
            aiohttp.ClientSession() as http,
            http.post(server.http + "/agui", data=body, headers=headers) as resp,
        ):
            status, text = resp.status, await resp.text()
        after = await settled(server)
    report(
        f"a 512 MiB gzip bomb as an AG-UI body ({len(body) / 2**20:.1f} MiB sent): RSS",
        f"{kib(before)} → peak {kib(rss.peak)}, then {kib(after)}",
    )
    assert (status, text) == (413, "the body is over 1048576 bytes, this connector's limit\n")
    assert rss.peak - before < GROWTH_KIB, (before, rss.peak)
