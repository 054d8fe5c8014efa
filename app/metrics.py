"""Prometheus metrics on a registry owned by the app.

With several worker processes (``PROMETHEUS_MULTIPROC_DIR`` set by the launcher) the values live
in files shared by the workers and every scrape, whichever worker answers it, reports the sum;
with one process they live in memory.
"""

from __future__ import annotations

import os
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

ActiveVersions = Callable[[], Iterable[tuple[str, str, str]]]
"""Yields (model, version, sha256) for each model that serves."""


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

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
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
