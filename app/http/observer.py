"""RequestObserver: a request id on every request (and log line), the access log, and the
request metrics. Pure ASGI, around everything else, so the predict hot path has them too."""

from __future__ import annotations

import random
import re
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.http import PROBE_PATHS, VERSION_HEADER
from app.observability.logs import AccessLog, request_id
from app.observability.metrics import DeferredCounter, DeferredHistogram, Metrics

REQUEST_ID_HEADER = b"x-request-id"
_VERSION = VERSION_HEADER.lower().encode()
_VALID_ID = re.compile(rb"[A-Za-z0-9._:-]{1,128}")
# Request ids need to be unique, not secret: the Mersenne Twister is ~100x faster than
# os.urandom, which costs tens of microseconds per call on some virtual machines.
ROUTE_KEY = "modelport.route"
"""Scope key where a handler outside the router (the predict hot path) names its route."""


def _unobserved(path: str) -> bool:
    """Probes and scrapes are not traffic."""
    return path.startswith(PROBE_PATHS)


class RequestObserver:
    """Request id, access log line with latency, request count and latency by endpoint."""

    def __init__(self, app: ASGIApp, metrics: Metrics, access_log: AccessLog | None) -> None:
        self.app = app
        self.metrics = metrics
        self.access_log = access_log
        self._children: dict[
            tuple[str, str, str, str], tuple[DeferredCounter, DeferredHistogram]
        ] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = _incoming_id(scope["headers"]) or f"{random.getrandbits(64):016x}"
        token = request_id.set(rid)
        started = time.perf_counter()
        answer = {"status": 500, "version": ""}

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = message.get("headers", [])
                answer["status"] = message["status"]
                for name, value in headers:
                    if name.lower() == _VERSION:
                        answer["version"] = value.decode("latin-1")
                message["headers"] = [*headers, (REQUEST_ID_HEADER, rid.encode("latin-1"))]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            self._record(scope, answer, time.perf_counter() - started)
            request_id.reset(token)

    def _record(self, scope: Scope, answer: dict[str, object], elapsed: float) -> None:
        path: str = scope["path"]
        if _unobserved(path):
            return
        status = str(answer["status"])
        endpoint = _endpoint(scope)
        model = self.metrics.model_label(str(scope.get("path_params", {}).get("name", "")))
        labels = (model, str(answer["version"]), endpoint, status)
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
        if self.access_log is not None:
            client = scope.get("client")
            self.access_log.record(
                scope["method"],
                path,
                status,
                elapsed * 1000,
                client[0] if client else "-",
                request_id.get(),
            )


def _incoming_id(headers: list[tuple[bytes, bytes]]) -> str | None:
    for name, value in headers:
        if name == REQUEST_ID_HEADER and _VALID_ID.fullmatch(value):
            return value.decode("latin-1")
    return None


def _endpoint(scope: Scope) -> str:
    """The route template (``/v1/models/{name}/predict``), never the raw path, so that the
    metric's labels stay few."""
    if ROUTE_KEY in scope:
        return str(scope[ROUTE_KEY])
    route = scope.get("route")
    return str(getattr(route, "path", "unmatched"))
