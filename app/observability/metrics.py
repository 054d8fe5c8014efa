"""Prometheus metrics on a registry owned by the app.

With several worker processes (``PROMETHEUS_MULTIPROC_DIR`` set by the launcher) the values live
in files shared by the workers and every scrape, whichever worker answers it, reports the sum;
with one process they live in memory.

The request path never writes a collector itself: it counts into :class:`DeferredCounter` and
:class:`DeferredHistogram`, in memory, and :meth:`Metrics.flush` writes their totals, every
``FLUSH_S`` and before each scrape. In multiprocess mode every write is a locked update of a
shared file, and one lock serves every value, so that writing each observation as it happened
cost a small model's request about a fifth of its time, the inference thread and the event loop
waiting on each other. A histogram is kept as counters (:class:`BucketHistogram`) so that a
flush writes one update per bucket touched, not one per observation.
"""

from __future__ import annotations

import asyncio
import math
import os
import threading
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from itertools import accumulate

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

FLUSH_S = 0.5
"""Longest an observation waits before a scrape of another worker sees it."""

ActiveVersions = Callable[[], Iterable[tuple[str, str, str]]]
"""Yields (model, version, sha256) for each model that serves."""
OTHER_MODEL = "_other"
"""The ``model`` label of every name that is not a served model (no served name starts with
``_``), so that requests for made-up names cannot add series."""


class DeferredCounter:
    """A labelled counter's increments, added up in memory until :meth:`write`."""

    def __init__(self, child: Counter) -> None:
        self._child = child
        self._lock = threading.Lock()  # taken by the thread counting and by the writer
        self._count = 0.0

    def inc(self, amount: float = 1.0) -> None:
        """As ``Counter.inc``."""
        with self._lock:
            self._count += amount

    def write(self) -> None:
        """Add what was counted since the last write to the counter."""
        with self._lock:
            count, self._count = self._count, 0.0
        if count:
            self._child.inc(count)


class DeferredHistogram:
    """One label set of a :class:`BucketHistogram`: its observations counted per bucket in
    memory until :meth:`write`."""

    def __init__(self, bounds: list[float], hits: list[Counter], total: Counter) -> None:
        self._bounds = bounds
        self._hit_counters = hits
        self._sum_counter = total
        self._lock = threading.Lock()  # taken by the thread observing and by the writer
        self._hits = [0] * len(hits)
        self._sum = 0.0

    def observe(self, value: float) -> None:
        """As ``Histogram.observe``, for values that are never negative (durations, sizes)."""
        index = bisect_left(self._bounds, value)
        with self._lock:
            self._hits[index] += 1
            self._sum += value

    def write(self) -> None:
        """Add what was observed since the last write: one update per bucket touched."""
        with self._lock:
            hits, self._hits = self._hits, [0] * len(self._hits)
            total, self._sum = self._sum, 0.0
        for counter, count in zip(self._hit_counters, hits, strict=True):
            if count:
                counter.inc(count)
        if any(hits):
            self._sum_counter.inc(total)


class BucketHistogram:
    """A labelled histogram kept in two counters, through prometheus_client's public API: the
    observations in each bucket (label ``le``, not cumulative) and their sum. A write adds a
    bucket's count in one update, where ``Histogram.observe`` takes one per observation; a
    scrape (:class:`_Scrape`) shows the counters, added up over the worker processes, as the
    histogram they count."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        buckets: Sequence[float],
        registry: CollectorRegistry | None,
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._bounds = [float(bound) for bound in buckets]
        self._le = [_le_label(bound) for bound in (*self._bounds, math.inf)]
        self.hits = Counter(
            f"{name}_hits", f"{documentation} (per bucket)", [*labelnames, "le"], registry=registry
        )
        self.sum = Counter(f"{name}_observed", documentation, labelnames, registry=registry)
        self._children: dict[tuple[str, ...], DeferredHistogram] = {}

    def labels(self, *values: str) -> DeferredHistogram:
        """The in-memory counts of one label set (made on first use; later calls take no lock)."""
        found = self._children.get(values)
        if found is not None:
            return found
        child = DeferredHistogram(
            self._bounds,
            [self.hits.labels(*values, le) for le in self._le],
            self.sum.labels(*values),  # the label set shows in scrapes from now on
        )
        return self._children.setdefault(values, child)

    def write(self) -> None:
        """Write what every label set observed since the last write."""
        for child in list(self._children.values()):  # a thread may add one meanwhile
            child.write()

    @property
    def parts(self) -> tuple[str, str]:
        """The names of the two counters' families."""
        return f"{self.name}_hits", f"{self.name}_observed"

    def family(self, parts: Mapping[str, Metric]) -> HistogramMetricFamily:
        """The histogram that the counters' families (named by :attr:`parts`) count."""
        hits_name, sum_name = self.parts
        hits = _values(parts.get(hits_name), f"{hits_name}_total", (*self.labelnames, "le"))
        sums = _values(parts.get(sum_name), f"{sum_name}_total", self.labelnames)
        histogram = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for key in dict.fromkeys([*sums, *(hit[:-1] for hit in hits)]):
            counts = accumulate(hits.get((*key, le), 0.0) for le in self._le)
            buckets = list(zip(self._le, counts, strict=True))
            histogram.add_metric(list(key), buckets, sum_value=sums.get(key, 0.0))
        return histogram


def _values(
    family: Metric | None, sample: str, labelnames: tuple[str, ...]
) -> dict[tuple[str, ...], float]:
    """The values of a family's ``sample`` by label set, in the order the family holds them."""
    values: dict[tuple[str, ...], float] = {}
    for found in family.samples if family is not None else []:
        if found.name == sample:
            key = tuple(found.labels[label] for label in labelnames)
            values[key] = values.get(key, 0.0) + found.value
    return values


def _le_label(bound: float) -> str:
    """A bucket bound as ``Histogram`` writes its ``le`` label (``1.0``, ``0.005``, ``+Inf``)."""
    return "+Inf" if bound == math.inf else repr(bound)


class Metrics:
    """Every collector of the service, and the text a scrape gets."""

    def __init__(self, active_versions: ActiveVersions, model_names: Iterable[str]) -> None:
        self.model_names = frozenset(model_names)
        # prometheus_client keeps the values in files shared by the workers, instead of in
        # memory, when this variable is set as it is imported: the environment is where that
        # choice is made (app.runner.supervisor sets it). The collectors write to ``own``, or to
        # the files (read back by the MultiProcessCollector); a scrape reads them via _Scrape.
        own = None if MULTIPROC_ENV in os.environ else CollectorRegistry()
        source = MultiProcessCollector(None) if own is None else own  # type: ignore[no-untyped-call]
        self.requests = Counter(
            "modelport_requests_total",
            "Requests by model, version, endpoint and status (health and metrics excluded).",
            ["model", "version", "endpoint", "status"],
            registry=own,
        )
        self.request_seconds = BucketHistogram(
            "modelport_request_duration_seconds",
            "Time from the request's arrival to its answer.",
            ["model", "endpoint"],
            LATENCY_BUCKETS,
            own,
        )
        self.queue_wait_seconds = BucketHistogram(
            "modelport_queue_wait_seconds",
            "Time a request waited for its batch to start.",
            ["model"],
            LATENCY_BUCKETS,
            own,
        )
        self.compute_seconds = BucketHistogram(
            "modelport_compute_seconds",
            "Time of one batch's forward and postprocess.",
            ["model", "version"],
            LATENCY_BUCKETS,
            own,
        )
        self.batch_size = BucketHistogram(
            "modelport_batch_size", "Samples per forward pass.", ["model"], BATCH_BUCKETS, own
        )
        self.queue_depth = Gauge(
            "modelport_queue_depth",
            "Requests waiting for a batch.",
            ["model"],
            registry=own,
            multiprocess_mode="livesum",
        )
        self.management = Counter(
            "modelport_management_total",
            "Uploads, activations, rollbacks and deletions by outcome (refusals by reason).",
            ["model", "action", "outcome"],
            registry=own,
        )
        self.sync_failures = Counter(
            "modelport_state_sync_failures_total",
            "Failed reads of the version database by the follower, by model.",
            ["model"],
            registry=own,
        )
        self.statistics = StatisticsCounters(own)
        self._counters: dict[Counter, DeferredCounter] = {}
        self._tallies: dict[tuple[str, str], VersionTally] = {}
        self._histograms = [
            self.request_seconds,
            self.queue_wait_seconds,
            self.compute_seconds,
            self.batch_size,
        ]
        self._samplers: list[Callable[[], None]] = []
        self.registry = CollectorRegistry()
        """What a scrape reads."""
        self.registry.register(_Scrape(source, self._histograms))
        self.registry.register(_ActiveVersionCollector(active_versions))

    def model_label(self, name: str) -> str:
        """The ``model`` label for a name taken from a request: a served model's name, ``""``
        for none, OTHER_MODEL for anything else."""
        return name if not name or name in self.model_names else OTHER_MODEL

    def deferred_counter(self, child: Counter) -> DeferredCounter:
        """The in-memory tally of a labelled counter (one per child)."""
        found = self._counters.get(child)
        return found or self._counters.setdefault(child, DeferredCounter(child))

    def tally(self, model: str, version: str) -> VersionTally:
        """The inference statistics of one model version (made on first use)."""
        found = self._tallies.get((model, version))
        if found is not None:
            return found
        tally = VersionTally(self, model, version)
        return self._tallies.setdefault((model, version), tally)

    def sample(self, sampler: Callable[[], None]) -> None:
        """Call ``sampler`` at each flush (to set a gauge from the state it measures)."""
        self._samplers.append(sampler)

    def flush(self) -> None:
        """Write what was counted and observed, and the sampled gauges."""
        for counter in list(self._counters.values()):  # a thread may add one meanwhile
            counter.write()
        for histogram in self._histograms:
            histogram.write()
        for sampler in self._samplers:
            sampler()

    async def flush_periodically(self) -> None:
        """Flush every ``FLUSH_S`` until cancelled, then once more."""
        try:
            while True:
                await asyncio.sleep(FLUSH_S)
                self.flush()
        finally:
            self.flush()

    def render(self) -> tuple[bytes, str]:
        """The exposition text (with all this process has counted) and its content type."""
        self.flush()
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


PHASES = ("compute_input", "compute_infer", "compute_output")
"""A forward's phases: gathering the batch, the forward itself, splitting (and postprocessing)."""
STATISTICS = ("success", "fail", "queue", *PHASES)
"""What Triton's statistics extension reports per request: its outcome, and the time it spent
waiting for its batch and in each phase of that batch's forward."""


class StatisticsCounters:
    """The counters behind Triton's inference statistics (:mod:`app.observability.statistics`),
    shared by the workers like every metric."""

    COUNTS = "modelport_inference_statistics"
    SECONDS = "modelport_inference_statistics_seconds"
    PASSES = "modelport_forward_phases"
    PASS_SECONDS = "modelport_forward_phases_seconds"
    LAST_INFERENCE = "modelport_last_inference_timestamp_seconds"

    def __init__(self, registry: CollectorRegistry | None) -> None:
        labels = ["model", "version", "statistic"]
        self.counts = Counter(
            self.COUNTS,
            "Requests by outcome (success, fail) and by phase (queue, compute_*), per version.",
            labels,
            registry=registry,
        )
        self.seconds = Counter(
            self.SECONDS,
            "Time the requests counted by modelport_inference_statistics_total spent.",
            labels,
            registry=registry,
        )
        batch_labels = ["model", "version", "batch_size", "phase"]
        self.batch_counts = Counter(
            self.PASSES,
            "Forward passes by batch size, per phase.",
            batch_labels,
            registry=registry,
        )
        self.batch_seconds = Counter(
            self.PASS_SECONDS,
            "Time of the forward passes counted by modelport_forward_phases_total.",
            batch_labels,
            registry=registry,
        )
        self.last_inference = Gauge(
            self.LAST_INFERENCE,
            "When a version last answered an inference (Unix time).",
            ["model", "version"],
            registry=registry,
            multiprocess_mode="max",
        )


class VersionTally:
    """One model version's inference statistics, counted in memory like every metric."""

    def __init__(self, metrics: Metrics, model: str, version: str) -> None:
        self._metrics = metrics
        self._labels = (model, version)
        counters = metrics.statistics
        self._requests = {
            name: (
                metrics.deferred_counter(counters.counts.labels(model, version, name)),
                metrics.deferred_counter(counters.seconds.labels(model, version, name)),
            )
            for name in STATISTICS
        }
        self._batches: dict[int, list[tuple[DeferredCounter, DeferredCounter]]] = {}
        self.last = 0.0
        """When the version last answered an inference (Unix time; 0: never here)."""
        self._last_inference = counters.last_inference.labels(model, version)
        metrics.sample(self._sample)

    def requests(self, statistic: str, seconds: float, count: int = 1) -> None:
        """``count`` requests that went through ``statistic`` in ``seconds`` in all."""
        requests, total = self._requests[statistic]
        requests.inc(count)
        total.inc(seconds)
        if statistic == "success":
            self.last = time.time()

    def forward(self, batch_size: int, requests: int, phases: Sequence[float]) -> None:
        """One forward pass of ``batch_size`` samples for ``requests`` requests, with the
        seconds of each of its PHASES."""
        tallies = self._batches.get(batch_size) or self._batch_tallies(batch_size)
        for name, seconds, (passes, total) in zip(PHASES, phases, tallies, strict=True):
            passes.inc()
            total.inc(seconds)
            self.requests(name, seconds * requests, requests)

    def _sample(self) -> None:
        if self.last:
            self._last_inference.set(self.last)

    def _batch_tallies(self, batch_size: int) -> list[tuple[DeferredCounter, DeferredCounter]]:
        counters, labels = self._metrics.statistics, (*self._labels, str(batch_size))
        tallies = [
            (
                self._metrics.deferred_counter(counters.batch_counts.labels(*labels, phase)),
                self._metrics.deferred_counter(counters.batch_seconds.labels(*labels, phase)),
            )
            for phase in PHASES
        ]
        return self._batches.setdefault(batch_size, tallies)


class _Scrape(Collector):
    """The families of ``source``, each BucketHistogram's counters shown as its histogram."""

    def __init__(self, source: Collector, histograms: list[BucketHistogram]) -> None:
        self._source = source
        self._histograms = histograms
        self._parts = {name for histogram in histograms for name in histogram.parts}

    def collect(self) -> Iterator[Metric]:
        parts: dict[str, Metric] = {}
        for family in self._source.collect():
            if family.name in self._parts:
                parts[family.name] = family
            else:
                yield family
        for histogram in self._histograms:
            yield histogram.family(parts)


class _ActiveVersionCollector(Collector):
    """``modelport_active_version_info{model, version, sha256} 1`` read at scrape time."""

    def __init__(self, active_versions: ActiveVersions) -> None:
        self._active_versions = active_versions

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "modelport_active_version_info",
            "The version each model serves in the process that answered the scrape.",
            labels=["model", "version", "sha256"],
        )
        for model, version, sha256 in self._active_versions():
            family.add_metric([model, version, sha256], 1.0)
        yield family
