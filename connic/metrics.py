"""Operational metrics in the Prometheus text exposition format.

Hand-written rather than prometheus-client: connic needs a dozen counters,
gauges and histograms, updated on the hot path (per chunk) with plain integer
arithmetic, and one registry per application instead of a process-global one,
so that tests and several embedded apps keep separate numbers.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Sequence

__all__ = ["Counter", "Gauge", "Histogram", "Metrics"]

LabelValues = tuple[str, ...]

DEFAULT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: Sequence[str], values: Iterable[str], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _number(value: float) -> str:
    if type(value) is int:  # exact, and never an OverflowError from float()
        return str(value)
    if value == math.inf:
        return "+Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


class _Metric:
    kind = ""

    def __init__(self, name: str, help_text: str, labels: Sequence[str] = ()) -> None:
        self.name = name
        self.help = help_text
        self.label_names = tuple(labels)

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]

    def render(self) -> list[str]:
        raise NotImplementedError


class Counter(_Metric):
    """A monotonically increasing count per label set."""

    kind = "counter"

    def __init__(self, name: str, help_text: str, labels: Sequence[str] = ()) -> None:
        super().__init__(name, help_text, labels)
        self.values: dict[LabelValues, float] = {}

    def inc(self, *labels: str, amount: float = 1) -> None:
        """Add ``amount`` to the series named by ``labels``."""
        self.add(labels, amount)

    def add(self, labels: LabelValues, amount: float = 1) -> None:
        """``inc(*labels, amount=amount)`` with the label values already in a tuple (the hot path's)."""
        self.values[labels] = self.values.get(labels, 0) + amount

    def get(self, *labels: str) -> float:
        """The current value of one series (0 when never incremented)."""
        return self.values.get(labels, 0)

    def render(self) -> list[str]:
        """Exposition lines, header included."""
        lines = self.header()
        for labels, value in sorted(self.values.items()):
            lines.append(f"{self.name}{_labels(self.label_names, labels)} {_number(value)}")
        return lines


class Gauge(Counter):
    """A value that goes up and down."""

    kind = "gauge"

    def dec(self, *labels: str, amount: float = 1) -> None:
        """Subtract ``amount`` from the series named by ``labels``."""
        self.values[labels] = self.values.get(labels, 0) - amount


class Histogram(_Metric):
    """Observations counted into cumulative buckets, with their sum and count."""

    kind = "histogram"

    def __init__(
        self, name: str, help_text: str, labels: Sequence[str] = (), buckets: Sequence[float] = DEFAULT_BUCKETS
    ) -> None:
        super().__init__(name, help_text, labels)
        self.bounds = tuple(sorted(buckets))
        self.series: dict[LabelValues, list[float]] = {}  # per-bucket counts, then +Inf, then sum

    def observe(self, value: float, *labels: str) -> None:
        """Record one observation in the series named by ``labels``."""
        self.add(labels, value)

    def add(self, labels: LabelValues, value: float) -> None:
        """``observe(value, *labels)`` with the label values already in a tuple (the hot path's)."""
        series = self.series.get(labels)
        if series is None:
            series = self.series[labels] = [0.0] * (len(self.bounds) + 2)
        series[bisect.bisect_left(self.bounds, value)] += 1
        series[-1] += value

    def count(self, *labels: str) -> int:
        """How many observations one series has."""
        series = self.series.get(labels)
        return int(sum(series[:-1])) if series else 0

    def render(self) -> list[str]:
        """Exposition lines, header included."""
        lines = self.header()
        for labels, series in sorted(self.series.items()):
            running = 0.0
            for bound, count in zip((*self.bounds, math.inf), series[:-1], strict=True):
                running += count
                le = f'le="{_number(bound)}"'
                lines.append(f"{self.name}_bucket{_labels(self.label_names, labels, le)} {_number(running)}")
            lines.append(f"{self.name}_sum{_labels(self.label_names, labels)} {_number(series[-1])}")
            lines.append(f"{self.name}_count{_labels(self.label_names, labels)} {_number(running)}")
        return lines


class Metrics:
    """Every metric one connic application keeps."""

    def __init__(self) -> None:
        self.connections_open = Gauge("connic_connections_open", "Open WebSocket connections.", ["connector"])
        self.connections = Counter("connic_connections_total", "WebSocket connections accepted.", ["connector"])
        self.refused = Counter(
            "connic_handshakes_refused_total", "Handshakes refused before the upgrade.", ["connector", "status"]
        )
        self.sessions_open = Gauge("connic_sessions_open", "Authenticated sessions.", ["connector"])
        self.sessions = Counter("connic_sessions_total", "Sessions started (authenticated).", ["connector"])
        self.messages = Counter("connic_messages_total", "Messages accepted (acked).", ["connector"])
        self.errors = Counter("connic_errors_total", "Error frames sent, by code.", ["connector", "code"])
        self.closes = Counter("connic_closes_total", "Closed connections, by close code.", ["connector", "code"])
        self.slow_consumers = Counter(
            "connic_slow_consumer_closes_total", "Connections closed because the client stopped reading.", ["connector"]
        )
        self.rate_limited = Counter("connic_rate_limited_total", "Messages refused by the rate limit.", ["connector"])
        self.resumes = Counter(
            "connic_resumes_total",
            "Resume attempts, by result (resumed, not_recovered: resumed without replay, failed: a fresh session).",
            ["connector", "result"],
        )
        self.replayed_frames = Counter(
            "connic_replayed_frames_total", "Frames sent again from replay logs to resuming clients.", ["connector"]
        )
        self.tokens = Counter("connic_tokens_total", "Tokens reported by agents.", ["agent", "kind"])
        self.turns = Counter("connic_turns_total", "Agent turns finished, by finish reason.", ["agent", "reason"])
        self.first_chunk = Histogram(
            "connic_time_to_first_chunk_seconds", "Time from a turn's start to its first chunk.", ["agent"]
        )
        self.turn_duration = Histogram("connic_turn_duration_seconds", "Time an agent took for a turn.", ["agent"])

    def turn_ended(self, agent: str, reason: str, seconds: float, prompt: int, candidates: int) -> None:
        """Count one finished turn: its reason, its duration and its tokens."""
        self.turns.add((agent, reason))
        self.turn_duration.add((agent,), seconds)
        if prompt or candidates:
            self.tokens.add((agent, "prompt"), prompt)
            self.tokens.add((agent, "candidates"), candidates)

    def all(self) -> list[_Metric]:
        """Every metric, in exposition order."""
        return [m for m in vars(self).values() if isinstance(m, _Metric)]

    def render(self) -> str:
        """The whole exposition text."""
        lines: list[str] = []
        for metric in self.all():
            lines.extend(metric.render())
        return "\n".join(lines) + "\n"
