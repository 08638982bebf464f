"""Operational metrics, exposed in the Prometheus text format by ``prometheus-client``.

The hot path counts in plain Python, and prometheus-client renders the values at scrape
time (:mod:`connic.metrics_series`): the exposition is what prometheus-client's own
metrics gave, at a fraction of their cost per update.

Each :class:`Metrics` has a registry of its own, never the process-global
default one, so that tests and several embedded apps keep separate numbers.

Multiprocess mode (prometheus-client's convention): when the environment
variable ``PROMETHEUS_MULTIPROC_DIR`` names a directory before the process
starts, every process keeps its values in files there, and :meth:`Metrics.exposition`
reads them all, so one scrape of any worker shows the sum over the workers. The
open-connection and open-session gauges are summed over the live processes only
(``livesum``): the supervisor calls ``prometheus_client.multiprocess.mark_process_dead(pid)``
when a worker exits. Every update is then also written through to prometheus-client's
files. One application per process in that mode: values are kept per process, metric
name and labels, not per :class:`Metrics`.
"""

from __future__ import annotations

import os
from bisect import bisect_left

import prometheus_client
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from connic.errors import ConnicError
from connic.metrics_series import DEFAULT_BUCKETS, Counter, Gauge, Histogram

__all__ = [
    "CONTENT_TYPE",
    "DEFAULT_BUCKETS",
    "MULTIPROC_ENV",
    "OTHER_CLOSE_CODE",
    "Counter",
    "Gauge",
    "Histogram",
    "Metrics",
    "close_code_label",
]

CONTENT_TYPE = prometheus_client.CONTENT_TYPE_LATEST
"""The ``Content-Type`` of :meth:`Metrics.exposition`."""

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
"""The environment variable that turns multiprocess mode on (prometheus-client reads it)."""

OTHER_CLOSE_CODE = "other"
"""The ``code`` label of ``connic_closes_total`` for a close code neither standard nor connic's."""

# RFC 6455 §7.4.1 and the IANA registry: 1000-1015 (a client may send some, the rest stand
# for what happened, such as 1006). A bounded set: each keeps its number.
_STANDARD_CLOSE_CODES = range(1000, 1016)


def _connic_close_codes(cls: type[ConnicError] = ConnicError) -> set[int]:
    """The close codes connic's errors close with, a plugin's own ConnicError subclasses included."""
    codes = {cls.close_code} if cls.close_code is not None else set()
    for sub in cls.__subclasses__():
        codes |= _connic_close_codes(sub)
    return codes


def close_code_label(code: int | None) -> str:
    """The ``code`` label a close is counted under: its number, or :data:`OTHER_CLOSE_CODE`.

    A client chooses the code it closes with, 3000-4999 are all valid, and each label value is
    a series kept for good: counted as they came, one client could make 2,000 series per
    connector. The standard codes and connic's own keep their number; any other is "other"
    (its number is in the connection's ``close`` log line).
    """
    if code is None or code in _STANDARD_CLOSE_CODES:
        return str(code)
    # Walked only for a code outside 1000-1015 (a plugin's errors may be imported late).
    return str(code) if code in _connic_close_codes() else OTHER_CLOSE_CODE


STORE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

# A ``*_created`` series per counter and histogram doubles the exposition with
# per-process start times that mean nothing summed over workers (multiprocess
# mode never shows them): one exposition, the same with one worker or several.
# This setting is process-global; it is what prometheus-client offers. connic's own
# collectors make no such series; this covers multiprocess mode's write-through
# metrics, and keeps an embedding application's own metrics as they were.
prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]  # untyped upstream


class Metrics:
    """Every metric one connic application keeps, in a registry of its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.exposed = self.registry  # what /metrics renders: this registry, or every process's files
        directory = os.environ.get(MULTIPROC_ENV)
        if directory is not None:
            if not os.path.isdir(directory):
                # prometheus-client would fail at the first increment, on the hot path: fail here.
                raise ValueError(f"{MULTIPROC_ENV}={directory!r} is not a directory")
            self.exposed = CollectorRegistry(auto_describe=True)
            MultiProcessCollector(self.exposed, path=directory)  # type: ignore[no-untyped-call]  # untyped upstream
        registry = self.registry
        mp = directory is not None  # write every update through to the shared files too
        # Per (agent, reason): the lists turn_ended adds to (turns, duration, then the two
        # token counts once they exist), so that a turn is one lookup; None in multiprocess
        # mode, where every update must also go through to prometheus-client's files.
        self._turn_cells: dict[tuple[str, str], tuple[list[float], ...]] | None = None if mp else {}
        self.connections_open = Gauge(
            "connic_connections_open", "Open WebSocket connections.", ["connector"], registry, multiprocess=mp
        )
        self.connections = Counter(
            "connic_connections_total", "WebSocket connections accepted.", ["connector"], registry, multiprocess=mp
        )
        self.refused = Counter(
            "connic_handshakes_refused_total",
            "Handshakes refused before the upgrade.",
            ["connector", "status"],
            registry,
            multiprocess=mp,
        )
        self.sessions_open = Gauge(
            "connic_sessions_open", "Authenticated sessions.", ["connector"], registry, multiprocess=mp
        )
        self.sessions = Counter(
            "connic_sessions_total", "Sessions started (authenticated).", ["connector"], registry, multiprocess=mp
        )
        self.messages = Counter(
            "connic_messages_total", "Messages accepted (acked).", ["connector"], registry, multiprocess=mp
        )
        self.errors = Counter(
            "connic_errors_total", "Error frames sent, by code.", ["connector", "code"], registry, multiprocess=mp
        )
        self.closes = Counter(
            "connic_closes_total",
            "Closed connections, by close code (one neither standard nor connic's: other).",
            ["connector", "code"],
            registry,
            multiprocess=mp,
        )
        self.slow_consumers = Counter(
            "connic_slow_consumer_closes_total",
            "Connections closed because the client stopped reading.",
            ["connector"],
            registry,
            multiprocess=mp,
        )
        self.rate_limited = Counter(
            "connic_rate_limited_total", "Messages refused by the rate limit.", ["connector"], registry, multiprocess=mp
        )
        self.resumes = Counter(
            "connic_resumes_total",
            "Resume attempts, by result (resumed, not_recovered: resumed without replay, failed: a fresh session).",
            ["connector", "result"],
            registry,
            multiprocess=mp,
        )
        self.replayed_frames = Counter(
            "connic_replayed_frames_total",
            "Frames sent again from replay logs to resuming clients.",
            ["connector"],
            registry,
            multiprocess=mp,
        )
        self.producer_lost = Counter(
            "connic_producer_lost_total",
            "Agent replies ended with producer_lost: the process producing them died.",
            ["connector"],
            registry,
            multiprocess=mp,
        )
        self.tokens = Counter(
            "connic_tokens_total", "Tokens reported by agents.", ["agent", "kind"], registry, multiprocess=mp
        )
        self.turns = Counter(
            "connic_turns_total",
            "Agent turns finished, by finish reason.",
            ["agent", "reason"],
            registry,
            multiprocess=mp,
        )
        self.first_chunk = Histogram(
            "connic_time_to_first_chunk_seconds",
            "Time from a turn's start to its first chunk.",
            ["agent"],
            registry,
            multiprocess=mp,
        )
        self.turn_duration = Histogram(
            "connic_turn_duration_seconds", "Time an agent took for a turn.", ["agent"], registry, multiprocess=mp
        )
        self.store_seconds = Histogram(
            "connic_store_seconds",
            "Time the session store took, by operation (add, get).",
            ["operation"],
            registry,
            buckets=STORE_BUCKETS,
            multiprocess=mp,
        )

    def turn_ended(self, agent: str, reason: str, seconds: float, prompt: int, candidates: int) -> None:
        """Count one finished turn: its reason, its duration and its tokens."""
        cache = self._turn_cells
        cells = None if cache is None else cache.get((agent, reason))
        if cells is None or ((prompt or candidates) and len(cells) == 2):
            self.turns.add((agent, reason))
            self.turn_duration.add((agent,), seconds)
            if prompt or candidates:  # a token series appears once it has counted some
                self.tokens.add((agent, "prompt"), prompt)
                self.tokens.add((agent, "candidates"), candidates)
            if cache is not None:
                cells = (self.turns.cell((agent, reason)), self.turn_duration.cell((agent,)))
                if prompt or candidates:  # else the token series may not exist: cached on a later turn
                    cells += (self.tokens.cell((agent, "prompt")), self.tokens.cell((agent, "candidates")))
                cache[agent, reason] = cells
            return
        # What the calls above do, on the cached lists (the sum in the duration's last slot).
        cells[0][0] += 1.0
        duration = cells[1]
        duration[bisect_left(self.turn_duration.buckets, seconds)] += 1.0
        duration[-1] += seconds
        if prompt or candidates:
            cells[2][0] += prompt
            cells[3][0] += candidates

    def exposition(self) -> bytes:
        """The whole exposition (:data:`CONTENT_TYPE`): this app's, or in multiprocess mode every process's summed."""
        return generate_latest(self.exposed)

    def render(self) -> str:
        """:meth:`exposition` as text."""
        return self.exposition().decode()
