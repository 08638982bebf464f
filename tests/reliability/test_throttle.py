"""The brake on failed authentication: per address, bounded, and no lock-out of anyone else."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from conftest import SECRET, StartServer, make_config

from .conftest import report, scrape
from .rawws import HandshakeRefused, RawWS, open_raw

FAILURES = 5
WINDOW = 1.0


async def _attempt(port: int, source: str, secret: str, *, header: bool = False) -> int:
    """One handshake and authentication: the close code, 0 for ``connected``, or the HTTP status of a refusal."""
    try:
        headers = {"X-Connic-Secret": secret} if header else None
        ws = await open_raw(port, source=source, headers=headers)
    except HandshakeRefused as refused:
        return refused.status
    return await _authenticate(ws, None if header else secret)


async def _authenticate(ws: RawWS, secret: str | None) -> int:
    """Send ``secret`` as the first frame (None: it went in the handshake); 0 for connected, else the close code."""
    if secret is not None:
        await ws.send_json({"secret": secret})
    first = await ws.recv()
    if first["type"] == "connected":
        await ws.aclose()
        return 0
    assert first["code"] == "unauthorized", first
    code, _, got_close = await ws.closed()
    assert got_close and code is not None
    return code


async def test_failed_auth_is_braked_per_address(start_server: StartServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="connic.throttle")
    server = await start_server(
        make_config({"max_auth_failures": FAILURES, "auth_failure_window": WINDOW, "auth_timeout": 5})
    )
    port = int(server.server.port)
    # FAILURES wrong secrets (by frame and by header) from 127.0.0.1 are refused 4001 ...
    codes = [await _attempt(port, "127.0.0.1", f"wrong-{i}", header=i % 2 == 1) for i in range(FAILURES)]
    assert codes == [4001] * FAILURES
    braked_at = time.monotonic()
    # ... and then the address is braked: 429 before the upgrade, even with the right secret.
    assert await _attempt(port, "127.0.0.1", "wrong-again") == 429
    assert await _attempt(port, "127.0.0.1", SECRET) == 429
    assert await _attempt(port, "127.0.0.1", SECRET, header=True) == 429
    # Another address is not: it connects, and its own failures are its own.
    assert await _attempt(port, "127.0.0.2", SECRET) == 0
    assert await _attempt(port, "127.0.0.2", "wrong") == 4001
    assert await _attempt(port, "127.0.0.2", SECRET, header=True) == 0
    # Once the window is over, 127.0.0.1 may try again.
    await asyncio.sleep(max(0.0, braked_at + WINDOW + 0.1 - time.monotonic()))
    assert await _attempt(port, "127.0.0.1", SECRET) == 0
    metrics = await scrape(server.http)
    assert metrics['connic_handshakes_refused_total{connector="/ws",status="429"}'] == 3
    assert [r.getMessage() for r in caplog.records if r.name == "connic.throttle"] == [
        f"{FAILURES} failed authentications from 127.0.0.1 on /ws within 1 s: refusing its handshakes (429) for 1.0 s"
    ]


async def test_the_429_says_when_to_come_back(start_server: StartServer) -> None:
    server = await start_server(make_config({"max_auth_failures": 1, "auth_failure_window": 30}))
    port = int(server.server.port)
    assert await _attempt(port, "127.0.0.3", "wrong") == 4001
    with pytest.raises(HandshakeRefused) as refused:
        await open_raw(port, source="127.0.0.3")
    assert refused.value.status == 429
    retry = int(refused.value.head.lower().split("retry-after: ")[1].split("\r\n")[0])
    assert 25 <= retry <= 30


async def test_sockets_opened_before_the_brake_cannot_keep_guessing(start_server: StartServer) -> None:
    # Open many sockets first, then guess on all of them: once the address is braked, even the
    # right secret on a socket that is already open fails, so parallel guessing buys nothing.
    server = await start_server(make_config({"max_auth_failures": FAILURES, "auth_failure_window": 30}))
    port = int(server.server.port)
    sockets = [await open_raw(port, source="127.0.0.4") for _ in range(FAILURES + 5)]
    wrong, right = sockets[:FAILURES], sockets[FAILURES:]
    assert await asyncio.gather(*(_authenticate(ws, f"guess-{i}") for i, ws in enumerate(wrong))) == [4001] * FAILURES
    assert await asyncio.gather(*(_authenticate(ws, SECRET + "x") for ws in right[:2])) == [4001] * 2
    assert await asyncio.gather(*(_authenticate(ws, SECRET) for ws in right[2:])) == [4001] * 3


async def test_wrong_secrets_in_a_row_get_through_at_most_max_auth_failures(start_server: StartServer) -> None:
    # The measurement: wrong secrets in a row, as fast as they go; how many get compared.
    # The defaults: 10 failures per 60 s.
    server = await start_server()
    port = int(server.server.port)
    started = time.monotonic()
    outcomes = [await _attempt(port, "127.0.0.5", f"guess-{i}", header=True) for i in range(200)]
    elapsed = time.monotonic() - started
    assert outcomes.count(4001) == 10
    assert outcomes.count(429) == 190
    report(
        "auth brake: 200 wrong secrets in a row",
        f"10 refused 4001, then 190 x 429 in {elapsed:.2f} s (limit 10 / 60 s)",
    )


def test_memory_is_bounded_and_ipv6_counts_by_64() -> None:
    from connic.throttle import AuthThrottle, address_key

    now = [0.0]
    throttle = AuthThrottle(3, 10.0, max_addresses=100, clock=lambda: now[0])
    for i in range(5000):
        throttle.failed(f"10.{i // 65536}.{i // 256 % 256}.{i % 256}")
    assert len(throttle) == 100
    # An IPv6 attacker cannot dodge the brake by walking through its /64 ...
    for i in range(3):
        throttle.failed(f"2001:db8:1:2::{i + 1:x}")
    assert throttle.retry_after("2001:db8:1:2:ffff::9") is not None
    # ... but another /64 is another address.
    assert throttle.retry_after("2001:db8:1:3::1") is None
    assert address_key("::ffff:192.0.2.7") == "192.0.2.7"
    assert address_key("fe80::1%eth0") == "fe80::/64"
    # The window passes: forgotten.
    now[0] = 10.0
    assert throttle.retry_after("2001:db8:1:2::1") is None
