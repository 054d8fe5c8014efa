"""Draining on shutdown: from SIGTERM on, readiness answers 503 and new requests are refused
(503, Retry-After) while the requests already accepted finish."""

from __future__ import annotations

import threading

import orjson
from starlette.types import ASGIApp, Receive, Scope, Send

from app.errors import error_body
from app.middleware import UNOBSERVED_PATHS

draining = threading.Event()
"""Set once per process, by the server's SIGTERM handler."""


class ShutdownGate:
    """Refuses new requests while the process drains; probes and scrapes still answer."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and draining.is_set()
            and not scope["path"].startswith(UNOBSERVED_PATHS)
        ):
            body = orjson.dumps(
                error_body("the server is shutting down; retry on another replica", "draining")
            )
            headers = [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"retry-after", b"1"),
                (b"connection", b"close"),
            ]
            await send({"type": "http.response.start", "status": 503, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send)
