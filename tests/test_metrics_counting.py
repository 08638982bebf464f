"""How connic counts: plain values in the hot path, rendered by prometheus-client at scrape time.

The exposition must be the one prometheus-client's own metrics gave (names, labels, HELP and
TYPE lines, bucket boundaries, value formatting), a scrape after N turns shows exact counts and
buckets, and in multiprocess mode every update still reaches the files the other processes sum.
"""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import prometheus_client
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from test_metrics import samples, scrape

from conftest import ROOT, Connect, StartServer, make_config
from connic.metrics import DEFAULT_BUCKETS, MULTIPROC_ENV, Counter, Gauge, Histogram, Metrics

Reference = prometheus_client.Counter | prometheus_client.Gauge | prometheus_client.Histogram


def reference(metrics: Metrics) -> tuple[CollectorRegistry, dict[str, Reference]]:
    """prometheus-client's own metrics with the names, help, labels and buckets of ``metrics``'."""
    registry = CollectorRegistry(auto_describe=True)
    made: dict[str, Reference] = {}
    for attribute, metric in vars(metrics).items():
        if isinstance(metric, Counter):
            made[attribute] = prometheus_client.Counter(
                metric.name, metric.help_text, metric.label_names, registry=registry
            )
        elif isinstance(metric, Gauge):
            made[attribute] = prometheus_client.Gauge(
                metric.name, metric.help_text, metric.label_names, registry=registry
            )
        elif isinstance(metric, Histogram):
            made[attribute] = prometheus_client.Histogram(
                metric.name, metric.help_text, metric.label_names, registry=registry, buckets=metric.buckets
            )
    return registry, made


def test_the_exposition_is_what_prometheus_clients_own_metrics_write() -> None:
    metrics = Metrics()
    registry, same = reference(metrics)
    assert len(same) == 18
    assert metrics.exposition() == generate_latest(registry)  # nothing counted: HELP and TYPE only
    pick = random.Random(7)
    for _ in range(3000):
        if pick.random() < 0.2:  # a whole turn, on turn_ended's cached lists after its first
            agent, reason = pick.choice(["a", "b"]), pick.choice(["stop", "error"])
            seconds, tokens = pick.expovariate(2), pick.choice([(0, 0), (3, 0), (5, 8)])
            metrics.turn_ended(agent, reason, seconds, *tokens)
            same["turns"].labels(agent, reason).inc()
            same["turn_duration"].labels(agent).observe(seconds)
            if any(tokens):
                same["tokens"].labels(agent, "prompt").inc(tokens[0])
                same["tokens"].labels(agent, "candidates").inc(tokens[1])
            continue
        attribute = pick.choice(sorted(same))
        ours: Any = getattr(metrics, attribute)
        labels = tuple(pick.choice(["/ws", "/b", "x y", 'q"\\\n']) for _ in ours.label_names)
        child: Any = same[attribute].labels(*labels)
        if isinstance(ours, Histogram):
            # Bounds themselves, just above them, zero, and past the last finite bound.
            value = pick.choice([*ours.buckets[:-1], 0.0, 1e9, pick.random(), pick.expovariate(0.1)])
            value = value * (1 + 1e-12) if pick.random() < 0.3 else value
            ours.add(labels, value)
            child.observe(value)
        elif isinstance(ours, Gauge) and pick.random() < 0.4:
            ours.dec(*labels)
            child.dec()
        else:
            amount = pick.choice([1, 1, 2, 0.5, 7919])
            ours.add(labels, amount)
            child.inc(amount)
    assert metrics.exposition() == generate_latest(registry)


def test_observations_land_in_the_first_bucket_whose_bound_they_do_not_exceed() -> None:
    metrics = Metrics()
    for seconds in (0.005, 0.0050001, 0.0, 300.0, 300.5, 0.3):
        metrics.turn_duration.observe(seconds, "a")
    metrics.store_seconds.observe(0.0001, "get")
    text = metrics.render()
    buckets = [line for line in text.splitlines() if line.startswith("connic_turn_duration_seconds_bucket")]
    expected = {"0.005": 2, "0.01": 3, "0.025": 3, "0.05": 3, "0.1": 3, "0.25": 3, "0.5": 4, "1.0": 4}
    expected |= {"2.5": 4, "5.0": 4, "10.0": 4, "30.0": 4, "60.0": 4, "120.0": 4, "300.0": 5, "+Inf": 6}
    assert buckets == [
        f'connic_turn_duration_seconds_bucket{{agent="a",le="{le}"}} {float(count)}' for le, count in expected.items()
    ]
    got = samples(text)
    assert got['connic_turn_duration_seconds_count{agent="a"}'] == 6 == metrics.turn_duration.count("a")
    assert got['connic_turn_duration_seconds_sum{agent="a"}'] == 0.005 + 0.0050001 + 300.0 + 300.5 + 0.3
    assert got['connic_store_seconds_bucket{le="0.0001",operation="get"}'] == 1
    assert got['connic_store_seconds_bucket{le="2.5",operation="get"}'] == 1
    assert metrics.turn_duration.buckets == (*DEFAULT_BUCKETS, math.inf)


async def test_a_scrape_after_n_turns_shows_exact_counts_and_buckets(
    start_server: StartServer, connect: Connect
) -> None:
    # "slow" sleeps 30 ms before each word: a turn of two words takes at least 60 ms.
    agents = {"assistant": {"use": "echo"}, "slow": {"use": "echo", "delay": 0.03}}
    server = await start_server(make_config(agents=agents))
    client = await connect(server.url())
    words = 0
    for n in range(1, 8):
        text = " ".join(["w"] * n)
        frames = await client.reply({"message": text, "agent": "assistant", "stream": n % 2 == 0})
        assert frames[-1].get("full_response", frames[-1].get("response")) == text, frames
        words += n
    for _ in range(3):
        frames = await client.reply({"message": "a b", "agent": "slow"})
        assert frames[-1]["full_response"] == "a b", frames
    got = samples((await scrape(server.http))[1])
    assert got['connic_messages_total{connector="/ws"}'] == 10
    assert got['connic_sessions_total{connector="/ws"}'] == 1
    assert got['connic_sessions_open{connector="/ws"}'] == 1
    assert got['connic_connections_open{connector="/ws"}'] == 1
    assert got['connic_turns_total{agent="assistant",reason="stop"}'] == 7
    assert got['connic_turns_total{agent="slow",reason="stop"}'] == 3
    assert got['connic_tokens_total{agent="assistant",kind="prompt"}'] == words
    assert got['connic_tokens_total{agent="slow",kind="candidates"}'] == 6
    bounds = ["0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1.0", "2.5", "5.0", "10.0", "30.0"]
    bounds += ["60.0", "120.0", "300.0", "+Inf"]
    for name, fastest in (("connic_turn_duration_seconds", 0.06), ("connic_time_to_first_chunk_seconds", 0.03)):
        # Every turn of either agent is counted once (an unstreamed reply has its one chunk too).
        assert got[f'{name}_count{{agent="assistant"}}'] == 7 and got[f'{name}_count{{agent="slow"}}'] == 3, name
        counts = [got[f'{name}_bucket{{agent="slow",le="{le}"}}'] for le in bounds]
        assert counts == sorted(counts) and counts[-1] == 3, (name, counts)
        # No slow turn is faster than its sleeps: every bucket below that is empty.
        below = [count for le, count in zip(bounds, counts, strict=True) if float(le) < fastest]
        assert below == [0] * (4 if fastest > 0.05 else 3), name
        assert got[f'{name}_sum{{agent="slow"}}'] >= 3 * fastest, name


def test_labels_and_amounts_a_series_cannot_take_are_refused() -> None:
    metrics = Metrics()
    with pytest.raises(ValueError, match=r"^connic_errors_total takes 2 label values as strings \(connector, code\)"):
        metrics.errors.inc("/ws")
    with pytest.raises(ValueError, match="as strings"):
        metrics.closes.inc("/ws", 1000)  # type: ignore[arg-type]  # what the check is for
    with pytest.raises(ValueError, match="as strings"):
        metrics.turn_duration.observe(0.1, "a", "b")
    with pytest.raises(ValueError, match=r"^connic_messages_total only goes up: cannot add -1$"):
        metrics.messages.add(("/ws",), -1)
    with pytest.raises(ValueError, match="increasing order"):
        Histogram("connic_things_seconds", "Things.", [], CollectorRegistry(), buckets=(1.0, 0.5))
    # Nothing refused was counted; a gauge goes below zero as prometheus-client's does.
    metrics.sessions_open.dec("/ws")
    assert metrics.errors.values == metrics.closes.values == metrics.messages.values == {}
    assert metrics.turn_duration.count("a") == 0 and metrics.sessions_open.get("/ws") == -1


# --- multiprocess mode ----------------------------------------------------------------------

_WORKER = textwrap.dedent(
    """
    import json, os, sys
    from connic.metrics import Metrics

    metrics = Metrics()
    for _ in range(int(sys.argv[1])):
        metrics.messages.inc("/ws")
        metrics.turn_ended("echo", "stop", 0.02, 3, 4)
    metrics.connections_open.inc("/ws")
    print(json.dumps({
        "pid": os.getpid(),
        "messages": metrics.messages.get("/ws"),
        "turns": metrics.turn_duration.count("echo"),
        "exposition": metrics.render(),
    }))
    """
)


def _worker(directory: Path, turns: int) -> dict[str, Any]:
    """Count ``turns`` turns in a fresh process in multiprocess mode; what it read of itself and of all."""
    env = {**os.environ, MULTIPROC_ENV: str(directory), "PYTHONPATH": os.environ.get("PYTHONPATH") or str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", _WORKER, str(turns)], env=env, capture_output=True, text=True, timeout=60, check=True
    )
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def test_multiprocess_mode_writes_every_update_for_the_other_processes(tmp_path: Path) -> None:
    first = _worker(tmp_path, 2)
    second = _worker(tmp_path, 3)
    # Each process reads its own numbers back; its exposition is the sum over both.
    assert (first["messages"], first["turns"], second["messages"], second["turns"]) == (2, 2, 3, 3)
    got = samples(second["exposition"])
    assert got['connic_messages_total{connector="/ws"}'] == 5
    assert got['connic_turns_total{agent="echo",reason="stop"}'] == 5
    assert got['connic_tokens_total{agent="echo",kind="candidates"}'] == 20
    assert got['connic_turn_duration_seconds_bucket{agent="echo",le="0.01"}'] == 0
    assert got['connic_turn_duration_seconds_bucket{agent="echo",le="0.025"}'] == 5
    assert got['connic_turn_duration_seconds_count{agent="echo"}'] == 5
    assert got['connic_connections_open{connector="/ws"}'] == 2
    assert "connic_sessions_total" not in second["exposition"]  # what no process counted is left out

    mark_process_dead(first["pid"], str(tmp_path))
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(tmp_path))  # type: ignore[no-untyped-call]  # untyped upstream
    got = samples(generate_latest(registry).decode())
    assert got['connic_connections_open{connector="/ws"}'] == 1  # live gauges: the dead process is gone
    assert got['connic_messages_total{connector="/ws"}'] == 5  # counters keep what it counted
