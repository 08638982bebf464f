"""/metrics on prometheus-client: the exposed names, one registry per app, the store's latency,
and multiprocess mode (two ``python -m connic run`` processes sharing PROMETHEUS_MULTIPROC_DIR,
as ``--workers N`` runs them): one scrape shows the sum over the processes.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.multiprocess import mark_process_dead

from conftest import ROOT, SECRET, CliServer, Connect, StartServer, make_config
from connic.agent import MAX_TOKENS
from connic.metrics import MULTIPROC_ENV, Counter, Metrics

# Every family /metrics has served so far, and the store latency histogram: the names must not change.
FAMILIES = {
    "connic_connections_open": "gauge",
    "connic_connections_total": "counter",
    "connic_handshakes_refused_total": "counter",
    "connic_sessions_open": "gauge",
    "connic_sessions_total": "counter",
    "connic_messages_total": "counter",
    "connic_errors_total": "counter",
    "connic_closes_total": "counter",
    "connic_slow_consumer_closes_total": "counter",
    "connic_rate_limited_total": "counter",
    "connic_resumes_total": "counter",
    "connic_replayed_frames_total": "counter",
    "connic_producer_lost_total": "counter",
    "connic_tokens_total": "counter",
    "connic_turns_total": "counter",
    "connic_time_to_first_chunk_seconds": "histogram",
    "connic_turn_duration_seconds": "histogram",
    "connic_store_seconds": "histogram",
}

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*(?:\{[^}]*\})?) (\S+)$")


def samples(text: str) -> dict[str, float]:
    """Exposition text as ``{'name{labels}': value}``; every line must be a comment or a sample."""
    out = {}
    for line in text.splitlines():
        if line.startswith("#") or not line:
            continue
        match = _SAMPLE.match(line)
        assert match, f"not a valid exposition line: {line!r}"
        out[match.group(1)] = float(match.group(2))
    return out


async def scrape(base: str) -> tuple[str, str]:
    """``(content type, text)`` of GET ``base``/metrics."""
    async with aiohttp.ClientSession() as http, http.get(base + "/metrics") as response:
        assert response.status == 200
        return response.headers["Content-Type"], await response.text()


# --- names and registries -------------------------------------------------------------------


async def test_every_family_keeps_its_name_and_type_and_no_created_series(
    start_server: StartServer, connect: Connect
) -> None:
    server = await start_server(make_config())
    client = await connect(server.url())
    await client.reply({"message": "one two"})
    content_type, text = await scrape(server.http)
    assert content_type.startswith("text/plain") and "charset=utf-8" in content_type
    types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.MULTILINE))
    assert types == FAMILIES
    got = samples(text)
    assert got['connic_messages_total{connector="/ws"}'] == 1
    assert got['connic_tokens_total{agent="assistant",kind="prompt"}'] == 2
    # Counters have no _created series: the same exposition as with several workers.
    assert not [name for name in got if "_created" in name]


def test_two_apps_in_one_process_keep_separate_numbers() -> None:
    first, second = Metrics(), Metrics()
    first.messages.inc("/ws", amount=3)
    second.messages.inc("/ws")
    first.turn_ended("a", "stop", 0.2, 4, 5)
    assert first.messages.get("/ws") == 3 and second.messages.get("/ws") == 1
    assert 'connic_messages_total{connector="/ws"} 3.0' in first.render().splitlines()
    assert 'connic_messages_total{connector="/ws"} 1.0' in second.render().splitlines()
    assert first.turn_duration.count("a") == 1 and second.turn_duration.count("a") == 0
    assert "agent=" not in second.render()


def test_the_wrapper_api_reads_what_it_wrote() -> None:
    metrics = Metrics()
    metrics.connections_open.inc("/ws")
    metrics.connections_open.inc("/ws")
    metrics.connections_open.dec("/ws")
    metrics.errors.add(("/ws", "queue_full"), 2)
    metrics.first_chunk.observe(0.01, "a")
    metrics.first_chunk.add(("a",), 0.02)
    metrics.turn_ended("a", "cancelled", 1.5, 0, 0)
    assert metrics.connections_open.get("/ws") == 1
    assert metrics.errors.values == {("/ws", "queue_full"): 2}
    assert metrics.closes.values == {} and metrics.closes.get("/ws", "1000") == 0
    assert metrics.first_chunk.count("a") == 2
    assert metrics.turns.get("a", "cancelled") == 1
    assert metrics.tokens.values == {}  # a series appears once it has counted tokens


def test_the_largest_count_usage_allows_renders_exactly() -> None:
    # Counters are floats (prometheus-client's, and Prometheus's own): Usage caps one turn's
    # count at MAX_TOKENS = 2**53 - 1, the largest integer a float holds exactly.
    metrics = Metrics()
    metrics.tokens.inc("a", "prompt", amount=MAX_TOKENS)
    metrics.turn_ended("b", "stop", 0.1, MAX_TOKENS, 1)
    got = samples(metrics.render())
    assert int(got['connic_tokens_total{agent="a",kind="prompt"}']) == MAX_TOKENS
    assert int(got['connic_tokens_total{agent="b",kind="prompt"}']) == MAX_TOKENS


def test_a_counter_name_without_total_is_refused() -> None:
    # prometheus-client would expose it as NAME_total: a name that is not the one given.
    with pytest.raises(ValueError, match="_total"):
        Counter("connic_things", "Things.", ["connector"], Metrics().registry)


def test_a_multiprocess_dir_that_is_not_a_directory_fails_at_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(MULTIPROC_ENV, str(tmp_path / "missing"))
    with pytest.raises(ValueError, match=f"^{MULTIPROC_ENV}=.*missing.* is not a directory$"):
        Metrics()


# --- the store's latency --------------------------------------------------------------------


async def test_store_calls_are_timed_by_operation(start_server: StartServer, connect: Connect) -> None:
    server = await start_server(make_config())
    first = await connect(server.url())
    await connect(server.url())
    # A resume naming no session: one store lookup, then a fresh session (a third add).
    resumed = await connect(server.url(), secret=None, expect_connected=False)
    await resumed.send(
        {
            "type": "resume",
            "session_id": first.connected["session_id"],  # type: ignore[attr-defined]
            "resume_token": "not-the-token",
            "last_seq": 0,
            "secret": SECRET,
        }
    )
    frames = await resumed.until("connected")
    assert frames[-1]["resumed"] is False, frames
    got = samples((await scrape(server.http))[1])
    assert got['connic_store_seconds_count{operation="add"}'] == 3
    assert got['connic_store_seconds_bucket{le="+Inf",operation="add"}'] == 3
    assert got['connic_store_seconds_count{operation="get"}'] == 1
    assert got['connic_resumes_total{connector="/ws",result="failed"}'] == 1


# --- multiprocess mode ----------------------------------------------------------------------


def _config(tmp_path: Path) -> Path:
    config = tmp_path / "connic.toml"
    config.write_text(
        f'[agents.echo]\nuse = "echo"\n\n[[connectors]]\npath = "/ws"\nsecrets = ["{SECRET}"]\n', encoding="utf-8"
    )
    return config


async def _messages(connect: Connect, server: CliServer, texts: list[str]) -> None:
    client = await connect(server.url)
    for text in texts:
        frames = await client.reply({"message": text})
        assert frames[-1]["full_response"] == text, frames


async def test_one_scrape_shows_the_sum_over_worker_processes(
    tmp_path: Path, cli: Callable[..., CliServer], connect: Connect
) -> None:
    # What `connic run --workers N` does: one directory for all its workers, set before they start.
    shared = tmp_path / "prometheus"
    shared.mkdir()
    env = {MULTIPROC_ENV: str(shared), "PYTHONPATH": os.environ.get("PYTHONPATH") or str(ROOT)}
    config = _config(tmp_path)
    first = cli("--config", str(config), env=env)
    second = cli("--config", str(config), env=env)
    await _messages(connect, first, ["one", "two"])
    await _messages(connect, second, ["three", "four", "five"])  # its client stays connected

    for server in (first, second):
        got = samples((await scrape(f"http://127.0.0.1:{server.port}"))[1])
        assert got['connic_messages_total{connector="/ws"}'] == 5
        assert got['connic_sessions_total{connector="/ws"}'] == 2
        assert got['connic_connections_open{connector="/ws"}'] == 2
        assert got['connic_turns_total{agent="echo",reason="stop"}'] == 5
        assert got['connic_turn_duration_seconds_count{agent="echo"}'] == 5
        assert got['connic_turn_duration_seconds_bucket{agent="echo",le="+Inf"}'] == 5
        assert got['connic_tokens_total{agent="echo",kind="prompt"}'] == 5
        assert got['connic_store_seconds_count{operation="add"}'] == 2
        assert not [name for name in got if "pid=" in name]

    # The second worker dies with its client connected: its gauges count until the
    # supervisor marks it dead; its counters keep counting in the totals.
    pid = second.proc.pid
    second.proc.send_signal(signal.SIGKILL)
    await asyncio.to_thread(second.proc.wait, 10)
    base = f"http://127.0.0.1:{first.port}"
    assert samples((await scrape(base))[1])['connic_connections_open{connector="/ws"}'] == 2
    mark_process_dead(pid, str(shared))
    got = samples((await scrape(base))[1])
    assert got['connic_connections_open{connector="/ws"}'] == 1
    assert got['connic_sessions_open{connector="/ws"}'] == 1
    assert got['connic_messages_total{connector="/ws"}'] == 5
