"""What every front door records of a request it answered: its request id, the request count
and latency by endpoint, and the access log line (one implementation for the lean inference
path, the framework's routes and the gRPC door)."""

from __future__ import annotations

import random
import re

from app.observability.logs import AccessLog
from app.observability.metrics import DeferredCounter, DeferredHistogram, Metrics

REQUEST_ID_HEADER = "x-request-id"
NO_ID = "-"
"""The request id of a request that has none (not answered in a header)."""
_VALID_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


class RequestRecorder:
    """Counts each answered request by (model, version, endpoint, status) with its latency by
    (model, endpoint), and writes its access line when the access log is on."""

    def __init__(
        self,
        metrics: Metrics,
        access_log: AccessLog | None,
        *,
        count: bool = True,
        make_ids: bool = True,
    ) -> None:
        self.metrics = metrics
        self.access_log = access_log
        self.count = count
        """Whether requests are counted (``MODELPORT_REQUEST_METRICS``)."""
        self.make_ids = make_ids
        """Whether a request the client sent no id with gets one (``MODELPORT_REQUEST_IDS``)."""
        self._children: dict[
            tuple[str, str, str, str], tuple[DeferredCounter, DeferredHistogram]
        ] = {}

    def request_id(self, incoming: str | None) -> str:
        """The id a client sent, when it is a sane one (it is echoed and logged), else a new
        one (NO_ID when ids are not made). Ids need to be unique, not secret: the Mersenne
        Twister is ~100x faster than os.urandom, which costs tens of microseconds per call on
        some virtual machines."""
        if incoming is not None and _VALID_ID.fullmatch(incoming):
            return incoming
        return f"{random.getrandbits(64):016x}" if self.make_ids else NO_ID

    def record(
        self,
        method: str,
        path: str,
        endpoint: str,
        name: str,
        version: str,
        status: str,
        elapsed: float,
        client: str,
        rid: str,
        shown: str | None = None,
    ) -> None:
        """One answered request: ``endpoint`` is its route template (never the raw path, so
        that the labels stay few), ``name`` the model asked for, ``shown`` the status its
        access line shows when it is not the HTTP one (a gRPC status name)."""
        if self.count:
            self._count(endpoint, name, version, status, elapsed)
        if self.access_log is not None:
            line_status = status if shown is None else shown
            self.access_log.record(method, path, line_status, elapsed * 1000, client, rid)

    def _count(self, endpoint: str, name: str, version: str, status: str, elapsed: float) -> None:
        model = self.metrics.model_label(name)
        labels = (model, version, endpoint, status)
        children = self._children.get(labels)
        if children is None:  # prometheus_client's own lookup takes a lock on every call
            metrics = self.metrics
            children = (
                metrics.deferred_counter(metrics.requests.labels(*labels)),
                metrics.request_seconds.labels(model, endpoint),
            )
            self._children[labels] = children
        count, latency = children
        count.inc()
        latency.observe(elapsed)
