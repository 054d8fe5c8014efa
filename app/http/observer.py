"""RequestObserver: a request id on every request (and log line), the access log, and the
request metrics, for the requests the framework's routes answer. Pure ASGI, around them; the
lean inference path (:mod:`app.http.endpoint`) records its own requests the same way."""

from __future__ import annotations

import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.http import PROBE_PATHS, VERSION_HEADER
from app.observability.logs import request_id
from app.observability.requests import NO_ID, REQUEST_ID_HEADER, RequestRecorder

_REQUEST_ID = REQUEST_ID_HEADER.encode()
_VERSION = VERSION_HEADER.lower().encode()


def unobserved(path: str) -> bool:
    """Probes and scrapes are not traffic."""
    return path.startswith(PROBE_PATHS)


def client_of(scope: Scope) -> str:
    """The client's address, as the access log shows it."""
    client = scope.get("client")
    return str(client[0]) if client else "-"


class RequestObserver:
    """Request id, access log line with latency, request count and latency by endpoint."""

    def __init__(self, app: ASGIApp, recorder: RequestRecorder) -> None:
        self.app = app
        self.recorder = recorder

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = self.recorder.request_id(_incoming_id(scope["headers"]))
        echoed = [(_REQUEST_ID, rid.encode("latin-1"))] if rid != NO_ID else []
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
                message["headers"] = [*headers, *echoed]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            path: str = scope["path"]
            if not unobserved(path):
                self.recorder.record(
                    scope["method"],
                    path,
                    _endpoint(scope),
                    str(scope.get("path_params", {}).get("name", "")),
                    str(answer["version"]),
                    str(answer["status"]),
                    time.perf_counter() - started,
                    client_of(scope),
                    rid,
                )
            request_id.reset(token)


def _incoming_id(headers: list[tuple[bytes, bytes]]) -> str | None:
    for name, value in headers:
        if name == _REQUEST_ID:
            return value.decode("latin-1")
    return None


def _endpoint(scope: Scope) -> str:
    """The route template (``/v1/models/{name}``), never the raw path."""
    route = scope.get("route")
    return str(getattr(route, "path", "unmatched"))
