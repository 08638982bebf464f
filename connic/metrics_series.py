"""The metric types of :mod:`connic.metrics`: counters, gauges and histograms counted in plain Python.

A counter or gauge is a dict of one-float lists by label values, a histogram a list of
bucket counts (and the sum) per label tuple, filled with :func:`bisect.bisect_left`.
prometheus-client's own ``Counter.inc`` and ``Histogram.observe`` take a lock and walk the
buckets in Python: about a tenth of a non-streaming turn's instructions. Each metric here
is instead a prometheus-client *collector*: registered on the application's registry, it
builds its ``CounterMetricFamily``, ``GaugeMetricFamily`` or ``HistogramMetricFamily`` at
scrape time, and prometheus-client still writes the text, so names, labels, HELP and TYPE
lines and bucket boundaries are what its own metrics gave. Values are counted on the event
loop's thread only (connic updates them nowhere else).

In multiprocess mode (``multiprocess=True``) every update is also written through to a
prometheus-client metric of the same name, made without a registry: its memory-mapped file
is what a scrape of any process sums. The plain values still answer :meth:`Counter.get` and
the like for this process.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Sequence
from typing import Any

import prometheus_client
from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

__all__ = ["DEFAULT_BUCKETS", "Counter", "Gauge", "Histogram", "LabelValues"]

LabelValues = tuple[str, ...]

DEFAULT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
"""A histogram's bucket bounds unless it is given its own (``+Inf`` is added)."""


def _go_float(value: float) -> str:
    """A bucket's bound as prometheus-client's own histograms write it in ``le`` (``0.005``, ``+Inf``)."""
    text: str = floatToGoString(value)  # type: ignore[no-untyped-call]  # untyped upstream
    return text


class _Metric:
    """What every metric shares: its name, help text and label names, and its registration.

    ``mirror`` is multiprocess mode's prometheus-client metric of the same name (made
    without a registry: its files are what the exposition reads), or ``None``.
    """

    def __init__(
        self, name: str, help_text: str, labels: Sequence[str], registry: CollectorRegistry, mirror: Any
    ) -> None:
        self.name = name
        self.help_text = help_text
        self.label_names = tuple(labels)
        self._mirror = mirror
        # One prometheus-client child per label tuple, in multiprocess mode only: ``.labels(...)``
        # costs several times the update itself.
        self._children: dict[LabelValues, Any] | None = None if mirror is None else {}
        registry.register(self)

    def _first(self, labels: LabelValues) -> None:
        """Check a label tuple seen for the first time (and make its write-through child)."""
        if len(labels) != len(self.label_names) or not all(type(value) is str for value in labels):
            names = ", ".join(self.label_names)
            raise ValueError(f"{self.name} takes {len(self.label_names)} label values as strings ({names}): {labels!r}")
        if self._children is not None:
            self._children[labels] = self._mirror.labels(*labels)

    def _family(self) -> Metric:
        """An empty family of this metric's name, type, help text and label names."""
        raise NotImplementedError

    def describe(self) -> list[Metric]:
        """The family this collector makes, without samples (what the registry checks names with)."""
        return [self._family()]

    def collect(self) -> list[Metric]:
        """This metric's family with every series this process has (the registry calls it at scrape time)."""
        raise NotImplementedError


class _Series(_Metric):
    """What a counter and a gauge share: one value per label tuple, in a list of one float.

    A list rather than the float itself: an update is one dict lookup and an in-place
    add, and :meth:`Metrics.turn_ended` keeps the lists of its series to skip the lookup.
    """

    _monotonic = False

    def __init__(
        self, name: str, help_text: str, labels: Sequence[str], registry: CollectorRegistry, mirror: Any
    ) -> None:
        self._cells: dict[LabelValues, list[float]] = {}
        super().__init__(name, help_text, labels, registry, mirror)

    def inc(self, *labels: str, amount: float = 1) -> None:
        """Add ``amount`` to the series named by ``labels``."""
        self.add(labels, amount)

    def add(self, labels: LabelValues, amount: float = 1) -> None:
        """``inc(*labels, amount=amount)`` with the label values already in a tuple (the hot path's)."""
        if amount < 0 and self._monotonic:  # a gauge's dec() only pays the second test
            raise ValueError(f"{self.name} only goes up: cannot add {amount!r}")
        cell = self._cells.get(labels)
        if cell is None:
            cell = self.cell(labels)
        cell[0] += amount
        if self._children is not None:
            self._children[labels].inc(amount)

    def cell(self, labels: LabelValues) -> list[float]:
        """The list holding the value of ``labels``, made (at 0) when the series is new.

        Adding to it directly skips multiprocess mode's write-through: single-process mode only.
        """
        cell = self._cells.get(labels)
        if cell is None:
            self._first(labels)
            cell = self._cells[labels] = [0.0]
        return cell

    def get(self, *labels: str) -> float:
        """The current value of one series in this process (0 when it has none)."""
        cell = self._cells.get(labels)
        return 0.0 if cell is None else cell[0]

    @property
    def values(self) -> dict[LabelValues, float]:
        """Every series this process has, by label values."""
        return {labels: cell[0] for labels, cell in list(self._cells.items())}

    def collect(self) -> list[Metric]:  # documented on _Metric
        family: Any = self._family()
        for labels, cell in list(self._cells.items()):
            family.add_metric(labels, cell[0])
        return [family]


class Counter(_Series):
    """A monotonically increasing count per label set (its name ends in ``_total``)."""

    _monotonic = True

    def __init__(
        self,
        name: str,
        help_text: str,
        labels: Sequence[str],
        registry: CollectorRegistry,
        *,
        multiprocess: bool = False,
    ) -> None:
        if not name.endswith("_total"):
            # prometheus-client appends _total to every counter's samples: without it in
            # the name, the exposed name would not be the one given here.
            raise ValueError(f"a counter's name ends in _total: {name!r}")
        mirror = prometheus_client.Counter(name, help_text, labels, registry=None) if multiprocess else None
        super().__init__(name, help_text, labels, registry, mirror)

    def _family(self) -> Metric:
        return CounterMetricFamily(self.name, self.help_text, labels=self.label_names)


class Gauge(_Series):
    """A value that goes up and down; in multiprocess mode, the sum over the live processes."""

    def __init__(
        self,
        name: str,
        help_text: str,
        labels: Sequence[str],
        registry: CollectorRegistry,
        *,
        multiprocess: bool = False,
    ) -> None:
        mirror = None
        if multiprocess:
            mirror = prometheus_client.Gauge(name, help_text, labels, registry=None, multiprocess_mode="livesum")
        super().__init__(name, help_text, labels, registry, mirror)

    def dec(self, *labels: str, amount: float = 1) -> None:
        """Subtract ``amount`` from the series named by ``labels``."""
        self.add(labels, -amount)

    def _family(self) -> Metric:
        return GaugeMetricFamily(self.name, self.help_text, labels=self.label_names)


class Histogram(_Metric):
    """Observations counted into cumulative buckets, with their sum and count."""

    def __init__(
        self,
        name: str,
        help_text: str,
        labels: Sequence[str],
        registry: CollectorRegistry,
        buckets: Sequence[float] = DEFAULT_BUCKETS,
        *,
        multiprocess: bool = False,
    ) -> None:
        bounds = [float(bound) for bound in buckets]
        if bounds != sorted(bounds) or not bounds or math.isnan(bounds[-1]):
            raise ValueError(f"{name}'s buckets are not in increasing order: {tuple(buckets)!r}")
        if bounds[-1] != math.inf:
            bounds.append(math.inf)  # as prometheus-client does: every observation has a bucket
        self.buckets = tuple(bounds)
        """The buckets' upper bounds, ``+Inf`` last."""
        self._le = tuple(_go_float(bound) for bound in bounds)
        # Per label tuple: the count of each bucket (not cumulative), then the sum.
        self._series: dict[LabelValues, list[float]] = {}
        mirror = None
        if multiprocess:
            mirror = prometheus_client.Histogram(name, help_text, labels, registry=None, buckets=self.buckets)
        super().__init__(name, help_text, labels, registry, mirror)

    def observe(self, value: float, *labels: str) -> None:
        """Record one observation in the series named by ``labels``."""
        # add()'s body again rather than a call to it: a streamed turn's first chunk comes here.
        series = self._series.get(labels)
        if series is None:
            series = self.cell(labels)
        series[bisect_left(self.buckets, value)] += 1.0
        series[-1] += value
        if self._children is not None:
            self._children[labels].observe(value)

    def add(self, labels: LabelValues, value: float) -> None:
        """``observe(value, *labels)`` with the label values already in a tuple."""
        series = self._series.get(labels)
        if series is None:
            series = self.cell(labels)
        # The first bucket whose upper bound is >= value (prometheus-client's ``value <= bound``;
        # only a NaN, which no clock gives, would differ). The last bound is +Inf, so the sum's
        # slot at the end is never a bucket's.
        series[bisect_left(self.buckets, value)] += 1.0
        series[-1] += value
        if self._children is not None:
            self._children[labels].observe(value)

    def cell(self, labels: LabelValues) -> list[float]:
        """The bucket counts and sum of ``labels``, made (at 0) when the series is new.

        Adding to it directly skips multiprocess mode's write-through: single-process mode only.
        """
        series = self._series.get(labels)
        if series is None:
            self._first(labels)
            series = self._series[labels] = [0.0] * (len(self.buckets) + 1)
        return series

    def count(self, *labels: str) -> int:
        """How many observations one series has in this process."""
        series = self._series.get(labels)
        return 0 if series is None else int(sum(series[:-1]))

    def _family(self) -> Metric:
        return HistogramMetricFamily(self.name, self.help_text, labels=self.label_names)

    def collect(self) -> list[Metric]:  # documented on _Metric
        family: Any = self._family()
        for labels, series in list(self._series.items()):
            total = 0.0
            buckets = []
            for le, count in zip(self._le, series, strict=False):  # the sum's slot is left over
                total += count
                buckets.append((le, total))
            family.add_metric(labels, buckets, series[-1])
        return [family]
