"""Operational metrics, exposed in the Prometheus text format by ``prometheus-client``.

The classes here are thin wrappers over prometheus-client's metric objects.
They keep the small API the rest of connic calls (label values as arguments,
or as one tuple on the hot path) and cache one labelled child per label tuple:
``.labels(...)`` costs several times the increment itself.

Each :class:`Metrics` has a registry of its own, never the process-global
default one, so that tests and several embedded apps keep separate numbers.

Multiprocess mode (prometheus-client's convention): when the environment
variable ``PROMETHEUS_MULTIPROC_DIR`` names a directory before the process
starts, every process keeps its values in files there, and :meth:`Metrics.exposition`
reads them all, so one scrape of any worker shows the sum over the workers. The
open-connection and open-session gauges are summed over the live processes only
(``livesum``): the supervisor calls ``prometheus_client.multiprocess.mark_process_dead(pid)``
when a worker exits. One application per process in that mode: values are kept
per process, metric name and labels, not per :class:`Metrics`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import prometheus_client
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

__all__ = ["CONTENT_TYPE", "MULTIPROC_ENV", "Counter", "Gauge", "Histogram", "Metrics"]

LabelValues = tuple[str, ...]

CONTENT_TYPE = prometheus_client.CONTENT_TYPE_LATEST
"""The ``Content-Type`` of :meth:`Metrics.exposition`."""

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
"""The environment variable that turns multiprocess mode on (prometheus-client reads it)."""

DEFAULT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
STORE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

# A ``*_created`` series per counter and histogram doubles the exposition with
# per-process start times that mean nothing summed over workers (multiprocess
# mode never shows them): one exposition, the same with one worker or several.
# This setting is process-global; it is what prometheus-client offers.
prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]  # untyped upstream


def _sample(
    metric: prometheus_client.Counter | prometheus_client.Gauge | prometheus_client.Histogram,
    sample: str,
    label_names: Sequence[str],
    labels: Sequence[str],
) -> float:
    """One sample's value in this process (0 when the series does not exist)."""
    wanted = dict(zip(label_names, labels, strict=True))
    for family in metric.collect():
        for s in family.samples:
            if s.name == sample and s.labels == wanted:
                return s.value
    return 0.0


class _Series:
    """What a counter and a gauge share: one prometheus-client child per label tuple, made once."""

    metric: prometheus_client.Counter | prometheus_client.Gauge

    def __init__(self, name: str, labels: Sequence[str]) -> None:
        self.name = name
        self.label_names = tuple(labels)
        self._children: dict[LabelValues, Any] = {}

    def child(self, labels: LabelValues) -> Any:
        """The prometheus-client series of ``labels``, made once per label tuple."""
        child = self._children.get(labels)
        if child is None:
            child = self._children[labels] = self.metric.labels(*labels)
        return child

    def inc(self, *labels: str, amount: float = 1) -> None:
        """Add ``amount`` to the series named by ``labels``."""
        self.add(labels, amount)

    def add(self, labels: LabelValues, amount: float = 1) -> None:
        """``inc(*labels, amount=amount)`` with the label values already in a tuple (the hot path's)."""
        child = self._children.get(labels)
        if child is None:
            child = self.child(labels)
        child.inc(amount)

    def get(self, *labels: str) -> float:
        """The current value of one series in this process (0 when it has none)."""
        return _sample(self.metric, self.name, self.label_names, labels)

    @property
    def values(self) -> dict[LabelValues, float]:
        """Every series this process has, by label values."""
        return {labels: self.get(*labels) for labels in self._children}


class Counter(_Series):
    """A monotonically increasing count per label set (its name ends in ``_total``)."""

    def __init__(self, name: str, help_text: str, labels: Sequence[str], registry: CollectorRegistry) -> None:
        if not name.endswith("_total"):
            # prometheus-client appends _total to every counter's samples: without it in
            # the name, the exposed name would not be the one given here.
            raise ValueError(f"a counter's name ends in _total: {name!r}")
        super().__init__(name, labels)
        self.metric = prometheus_client.Counter(name, help_text, self.label_names, registry=registry)


class Gauge(_Series):
    """A value that goes up and down; in multiprocess mode, the sum over the live processes."""

    def __init__(self, name: str, help_text: str, labels: Sequence[str], registry: CollectorRegistry) -> None:
        super().__init__(name, labels)
        self.metric = prometheus_client.Gauge(
            name, help_text, self.label_names, registry=registry, multiprocess_mode="livesum"
        )

    def dec(self, *labels: str, amount: float = 1) -> None:
        """Subtract ``amount`` from the series named by ``labels``."""
        self.add(labels, -amount)


class Histogram:
    """Observations counted into cumulative buckets, with their sum and count."""

    def __init__(
        self,
        name: str,
        help_text: str,
        labels: Sequence[str],
        registry: CollectorRegistry,
        buckets: Sequence[float] = DEFAULT_BUCKETS,
    ) -> None:
        self.name = name
        self.label_names = tuple(labels)
        self.metric = prometheus_client.Histogram(
            name, help_text, self.label_names, registry=registry, buckets=tuple(buckets)
        )
        self._children: dict[LabelValues, prometheus_client.Histogram] = {}

    def child(self, labels: LabelValues) -> prometheus_client.Histogram:
        """The prometheus-client series of ``labels``, made once per label tuple."""
        child = self._children.get(labels)
        if child is None:
            child = self._children[labels] = self.metric.labels(*labels)
        return child

    def observe(self, value: float, *labels: str) -> None:
        """Record one observation in the series named by ``labels``."""
        self.add(labels, value)

    def add(self, labels: LabelValues, value: float) -> None:
        """``observe(value, *labels)`` with the label values already in a tuple (the hot path's)."""
        child = self._children.get(labels)
        if child is None:
            child = self.child(labels)
        child.observe(value)

    def count(self, *labels: str) -> int:
        """How many observations one series has in this process."""
        return int(_sample(self.metric, self.name + "_count", self.label_names, labels))


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
        self.connections_open = Gauge("connic_connections_open", "Open WebSocket connections.", ["connector"], registry)
        self.connections = Counter(
            "connic_connections_total", "WebSocket connections accepted.", ["connector"], registry
        )
        self.refused = Counter(
            "connic_handshakes_refused_total",
            "Handshakes refused before the upgrade.",
            ["connector", "status"],
            registry,
        )
        self.sessions_open = Gauge("connic_sessions_open", "Authenticated sessions.", ["connector"], registry)
        self.sessions = Counter("connic_sessions_total", "Sessions started (authenticated).", ["connector"], registry)
        self.messages = Counter("connic_messages_total", "Messages accepted (acked).", ["connector"], registry)
        self.errors = Counter("connic_errors_total", "Error frames sent, by code.", ["connector", "code"], registry)
        self.closes = Counter(
            "connic_closes_total", "Closed connections, by close code.", ["connector", "code"], registry
        )
        self.slow_consumers = Counter(
            "connic_slow_consumer_closes_total",
            "Connections closed because the client stopped reading.",
            ["connector"],
            registry,
        )
        self.rate_limited = Counter(
            "connic_rate_limited_total", "Messages refused by the rate limit.", ["connector"], registry
        )
        self.resumes = Counter(
            "connic_resumes_total",
            "Resume attempts, by result (resumed, not_recovered: resumed without replay, failed: a fresh session).",
            ["connector", "result"],
            registry,
        )
        self.replayed_frames = Counter(
            "connic_replayed_frames_total",
            "Frames sent again from replay logs to resuming clients.",
            ["connector"],
            registry,
        )
        self.producer_lost = Counter(
            "connic_producer_lost_total",
            "Agent replies ended with producer_lost: the process producing them died.",
            ["connector"],
            registry,
        )
        self.tokens = Counter("connic_tokens_total", "Tokens reported by agents.", ["agent", "kind"], registry)
        self.turns = Counter(
            "connic_turns_total", "Agent turns finished, by finish reason.", ["agent", "reason"], registry
        )
        self.first_chunk = Histogram(
            "connic_time_to_first_chunk_seconds",
            "Time from a turn's start to its first chunk.",
            ["agent"],
            registry,
        )
        self.turn_duration = Histogram(
            "connic_turn_duration_seconds", "Time an agent took for a turn.", ["agent"], registry
        )
        self.store_seconds = Histogram(
            "connic_store_seconds",
            "Time the session store took, by operation (add, get).",
            ["operation"],
            registry,
            buckets=STORE_BUCKETS,
        )

    def turn_ended(self, agent: str, reason: str, seconds: float, prompt: int, candidates: int) -> None:
        """Count one finished turn: its reason, its duration and its tokens."""
        self.turns.add((agent, reason))
        self.turn_duration.add((agent,), seconds)
        if prompt or candidates:  # a token series appears once it has counted some
            self.tokens.add((agent, "prompt"), prompt)
            self.tokens.add((agent, "candidates"), candidates)

    def exposition(self) -> bytes:
        """The whole exposition (:data:`CONTENT_TYPE`): this app's, or in multiprocess mode every process's summed."""
        return generate_latest(self.exposed)

    def render(self) -> str:
        """:meth:`exposition` as text."""
        return self.exposition().decode()
