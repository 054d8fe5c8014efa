"""Prometheus metrics on a registry owned by the app.

With several worker processes (``PROMETHEUS_MULTIPROC_DIR`` set by the launcher) the values live
in files shared by the workers and every scrape, whichever worker answers it, reports the sum;
with one process they live in memory.

The request path never writes a collector itself: it counts into :class:`DeferredCounter` and
:class:`DeferredHistogram`, in memory, and :meth:`Metrics.flush` writes their totals, every
``FLUSH_S`` and before each scrape. In multiprocess mode every write is a locked update of a
shared file, and one lock serves every value, so that writing each observation as it happened
cost a small model's request about a fifth of its time, the inference thread and the event loop
waiting on each other.
"""

from __future__ import annotations

import asyncio
import os
import threading
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
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
    """A labelled histogram's observations, counted per bucket in memory until :meth:`write`.

    Counts into the child's own buckets and sum, as ``Histogram.observe`` does
    (test_observability.py checks the result against it)."""

    def __init__(self, child: Histogram) -> None:
        self._child = child
        self._bounds: list[float] = child._upper_bounds
        self._lock = threading.Lock()
        self._hits = [0] * len(self._bounds)
        self._sum = 0.0

    def observe(self, value: float) -> None:
        """As ``Histogram.observe``."""
        index = bisect_left(self._bounds, value)
        with self._lock:
            self._hits[index] += 1
            self._sum += value

    def write(self) -> None:
        """Add what was observed since the last write: one update per bucket touched."""
        with self._lock:
            hits, self._hits = self._hits, [0] * len(self._bounds)
            total, self._sum = self._sum, 0.0
        for index, count in enumerate(hits):
            if count:
                self._child._buckets[index].inc(count)
        if any(hits):
            self._child._sum.inc(total)


class Metrics:
    """Every collector of the service, and the text a scrape gets."""

    def __init__(self, active_versions: ActiveVersions, model_names: Iterable[str]) -> None:
        self.model_names = frozenset(model_names)
        self.multiprocess = MULTIPROC_ENV in os.environ
        self.registry = CollectorRegistry()
        # Multiprocess values are read back from the shared files, so the collectors must not
        # also be registered here (they would count twice).
        own = None if self.multiprocess else self.registry
        if self.multiprocess:
            MultiProcessCollector(self.registry)  # type: ignore[no-untyped-call]
        self.registry.register(_ActiveVersionCollector(active_versions))
        self.requests = Counter(
            "modelport_requests_total",
            "Requests by model, version, endpoint and status (health and metrics excluded).",
            ["model", "version", "endpoint", "status"],
            registry=own,
        )
        self.request_seconds = Histogram(
            "modelport_request_duration_seconds",
            "Time from the request's arrival to its answer.",
            ["model", "endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=own,
        )
        self.queue_wait_seconds = Histogram(
            "modelport_queue_wait_seconds",
            "Time a request waited for its batch to start.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=own,
        )
        self.compute_seconds = Histogram(
            "modelport_compute_seconds",
            "Time of one batch's forward and postprocess.",
            ["model", "version"],
            buckets=LATENCY_BUCKETS,
            registry=own,
        )
        self.batch_size = Histogram(
            "modelport_batch_size",
            "Samples per forward pass.",
            ["model"],
            buckets=BATCH_BUCKETS,
            registry=own,
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
        self._counters: dict[Counter, DeferredCounter] = {}
        self._histograms: dict[Histogram, DeferredHistogram] = {}
        self._samplers: list[Callable[[], None]] = []

    def model_label(self, name: str) -> str:
        """The ``model`` label for a name taken from a request: a served model's name, ``""``
        for none, OTHER_MODEL for anything else."""
        return name if not name or name in self.model_names else OTHER_MODEL

    def deferred_counter(self, child: Counter) -> DeferredCounter:
        """The in-memory tally of a labelled counter (one per child)."""
        found = self._counters.get(child)
        return found or self._counters.setdefault(child, DeferredCounter(child))

    def deferred_histogram(self, child: Histogram) -> DeferredHistogram:
        """The in-memory bucket counts of a labelled histogram (one per child)."""
        found = self._histograms.get(child)
        return found or self._histograms.setdefault(child, DeferredHistogram(child))

    def sample(self, sampler: Callable[[], None]) -> None:
        """Call ``sampler`` at each flush (to set a gauge from the state it measures)."""
        self._samplers.append(sampler)

    def flush(self) -> None:
        """Write what was counted and observed, and the sampled gauges."""
        for counter in list(self._counters.values()):  # a thread may add one meanwhile
            counter.write()
        for histogram in list(self._histograms.values()):
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
