"""Prometheus metrics on a registry owned by the app.

With several worker processes (``PROMETHEUS_MULTIPROC_DIR`` set by the launcher) the values live
in files shared by the workers and every scrape, whichever worker answers it, reports the sum;
with one process they live in memory.

The request path never writes a collector itself: it queues its observations in
:class:`Pending`, and :meth:`Metrics.flush` writes them in bulk, every ``FLUSH_S`` and before
each scrape. In multiprocess mode every write is a locked update of a shared file, and one lock
serves every value, so that writing each observation as it happened cost a small model's request
about a fifth of its time, the inference thread and the event loop waiting on each other.
"""

from __future__ import annotations

import asyncio
import os
from bisect import bisect_left
from collections import Counter as Tally
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

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

T = TypeVar("T")
FLUSH_S = 0.5
"""Longest a queued observation waits before a scrape of another worker sees it."""

ActiveVersions = Callable[[], Iterable[tuple[str, str, str]]]
"""Yields (model, version, sha256) for each model that serves."""


class Pending:
    """Counter increments and histogram observations queued from any thread (a deque's append
    and popleft are atomic), written to their collectors in bulk by :meth:`write`."""

    def __init__(self) -> None:
        self._counts: deque[Counter] = deque()
        self._observations: deque[tuple[Histogram, float]] = deque()

    def count(self, counter: Counter) -> None:
        """Queue ``counter.inc()``; ``counter`` is a labelled child."""
        self._counts.append(counter)

    def observe(self, histogram: Histogram, value: float) -> None:
        """Queue ``histogram.observe(value)``; ``histogram`` is a labelled child."""
        self._observations.append((histogram, value))

    def write(self) -> None:
        """Write what is queued: one update per counter, bucket and sum touched."""
        counts = Tally(_drain(self._counts))
        for counter, times in counts.items():
            counter.inc(times)
        grouped: dict[Histogram, list[float]] = {}
        for histogram, value in _drain(self._observations):
            grouped.setdefault(histogram, []).append(value)
        for histogram, values in grouped.items():
            _observe_all(histogram, values)


def _drain(queue: deque[T]) -> Iterator[T]:
    """What the queue holds now; what other threads add meanwhile stays for the next time."""
    for _ in range(len(queue)):
        yield queue.popleft()


def _observe_all(histogram: Histogram, values: list[float]) -> None:
    """``histogram.observe(v)`` for every value, with one write per bucket touched.

    Uses the child's bucket bounds and values, as ``Histogram.observe`` does
    (test_observability.py checks the result against it)."""
    bounds = histogram._upper_bounds
    for index, hits in Tally(bisect_left(bounds, value) for value in values).items():
        histogram._buckets[index].inc(hits)
    histogram._sum.inc(sum(values))


class Metrics:
    """Every collector of the service, and the text a scrape gets."""

    def __init__(self, active_versions: ActiveVersions) -> None:
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
        self.pending = Pending()
        self._samplers: list[Callable[[], None]] = []

    def sample(self, sampler: Callable[[], None]) -> None:
        """Call ``sampler`` at each flush (to set a gauge from the state it measures)."""
        self._samplers.append(sampler)

    def flush(self) -> None:
        """Write the pending observations and the sampled gauges."""
        self.pending.write()
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
        """The exposition text (this process's pending observations included) and its type."""
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
