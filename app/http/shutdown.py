"""Draining on shutdown: from SIGTERM on, readiness answers 503 and new requests are refused
(503, Retry-After) while the requests already accepted finish; those still unanswered when the
grace period ends get the same 503, not the server's 500."""

from __future__ import annotations

import asyncio
import threading

import orjson
from starlette.types import ASGIApp, Receive, Scope, Send

from app.errors import error_body
from app.http.observer import UNOBSERVED_PATHS

draining = threading.Event()
"""Set once per process, by the server's SIGTERM handler."""


class ShutdownGate:
    """Refuses new requests while the process drains; probes and scrapes still answer."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if draining.is_set() and not scope["path"].startswith(UNOBSERVED_PATHS):
            await _refuse(send)
            return
        try:
            await self.app(scope, receive, send)
        except asyncio.CancelledError:
            # the server cancels what is still open once the grace period is over
            if not draining.is_set() or not await _refused(send):
                raise


async def _refuse(send: Send) -> None:
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


async def _refused(send: Send) -> bool:
    """Answer 503 to a request cut off at the end of the grace period; False if its answer had
    started already (the server refuses a second start)."""
    try:
        await _refuse(send)
    except RuntimeError:
        return False
    return True
