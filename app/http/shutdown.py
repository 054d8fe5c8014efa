"""Draining on shutdown: from SIGTERM on, readiness answers 503 and new requests are refused
(503, Retry-After) while the requests already accepted finish; those still unanswered when the
grace period ends get the same 503, not the server's 500."""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import Awaitable, Callable

from starlette.types import ASGIApp, Receive, Scope, Send

from app.errors import Draining
from app.http import PROBE_PATHS
from app.http.answers import error_answer, send_answer

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
        if draining.is_set() and not scope["path"].startswith(PROBE_PATHS):
            await _refuse(scope, send)
            return
        try:
            await self.app(scope, receive, send)
        except asyncio.CancelledError:
            # the server cancels what is still open once the grace period is over
            write = functools.partial(send_answer, scope, send)
            if not await answered_cut_off(scope["path"], write):
                raise


def refuse_if_draining() -> None:
    """Draining (503, Retry-After) for new work once the process drains."""
    if draining.is_set():
        raise _draining()


def _draining() -> Draining:
    return Draining("the server is shutting down; retry on another replica")


async def _refuse(scope: Scope, send: Send) -> None:
    await send_answer(scope, send, *error_answer(_draining(), scope["path"]))


async def answered_cut_off(
    path: str, write: Callable[[int, bytes, dict[str, str]], Awaitable[None]]
) -> bool:
    """Answer 503 through ``write`` to a request to ``path`` cancelled at the end of the grace
    period; False if the server is not draining (the cancellation is someone else's) or its
    answer had started already (the server refuses a second start)."""
    if not draining.is_set():
        return False
    try:
        await write(*error_answer(_draining(), path))
    except RuntimeError:
        return False
    return True
