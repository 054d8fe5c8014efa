"""The lean inference path: a raw ASGI middleware in front of the framework's routing and
dependency injection, which on small models cost more than the whole request. It matches the
inference paths of every HTTP front door, authenticates, and hands the call to the front door's
adapter; everything else goes on to the app. Errors are rendered by :mod:`app.http.answers`."""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Protocol

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.codecs.text import decimal
from app.config import Settings
from app.errors import BadRequest, MethodNotAllowed, ModelportError, PayloadTooLarge
from app.http import VERSION_HEADER
from app.http.answers import Answer, error_answer, send_answer, unexpected
from app.http.auth import authorize_api
from app.http.observer import client_of
from app.http.shutdown import answered_cut_off, refuse_if_draining
from app.observability.logs import request_id
from app.observability.requests import NO_ID, REQUEST_ID_HEADER, RequestRecorder
from app.serving.inference import InferenceService

logger = logging.getLogger(__name__)


@dataclass
class HttpCall:
    """One request on the lean path, as its adapter sees it."""

    path: str
    params: Mapping[str, str]
    """The path's parameters (``name``, ``version``)."""
    headers: dict[str, str]
    query_string: bytes
    receive: Receive
    max_body_bytes: int
    served: str = ""
    """The model that served, once resolved (for the request metrics)."""

    async def body(self) -> bytes:
        """The request body, refused over ``max_body_bytes`` by its declared length and again
        while streaming, since a body need not declare its length."""
        limit = self.max_body_bytes
        declared = decimal(self.headers.get("content-length"))
        if declared is not None and declared > limit:
            raise PayloadTooLarge(f"body of {declared} bytes exceeds the limit of {limit} bytes")
        parts: list[bytes] = []
        size = 0
        while True:
            message: Message = await self.receive()
            if message["type"] == "http.disconnect":
                raise BadRequest("the client disconnected before sending the whole body")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"body exceeds the limit of {limit} bytes")
            parts.append(chunk)
            if not message.get("more_body", False):
                return parts[0] if len(parts) == 1 else b"".join(parts)


ROUTES_HELD = 256
"""Paths whose route the endpoint remembers at most (:meth:`InferenceEndpoint.route`)."""
ROUTE_HELD_CHARS = 256
"""The longest path whose route is remembered."""
Paths = tuple[tuple[re.Pattern[str], str], ...]
"""Each path pattern (its named groups become parameters) with its route template."""


class FrontDoor(Protocol):
    """A protocol's inference endpoints: the paths it answers and how."""

    paths: Paths

    async def answer(self, call: HttpCall, service: InferenceService) -> Answer:
        """Parse the call, run it on ``service`` and render the answer."""
        ...


def text_headers(raw: Iterable[tuple[bytes, bytes]]) -> dict[str, str]:
    """A request's headers (names lower-case, as the server gives them) as text."""
    return {name.decode("latin-1"): value.decode("latin-1") for name, value in raw}


Write = Callable[[int, bytes, dict[str, str]], Awaitable[None]]
"""Writes a whole answer (status, body, headers); RuntimeError once an answer has started."""


@dataclass(frozen=True)
class Route:
    """An inference path matched: its front door, route template and path parameters."""

    door: FrontDoor
    template: str
    params: Mapping[str, str]
    """Read only: a remembered route serves every request to its path."""


@dataclass
class InferenceEndpoint:
    """ASGI middleware answering the front doors' inference paths; the rest goes to ``app``.

    It does for its requests what the layers in front of the framework's routes do for theirs
    (the request id, the draining gate, the request metrics and access line, through the same
    functions), in one call and with no wrapped ``send``: on a small model those layers cost
    as much as the inference. The server's own protocol calls :meth:`route` and :meth:`serve`
    directly for the requests it takes on its lane (:mod:`app.runner.lane`)."""

    app: ASGIApp
    service: InferenceService
    settings: Settings
    doors: tuple[FrontDoor, ...]
    recorder: RequestRecorder
    _routes: list[tuple[re.Pattern[str], str, FrontDoor]] = field(init=False)
    _known: dict[str, Route | None] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self._routes = [
            (pattern, route, door) for door in self.doors for pattern, route in door.paths
        ]

    def route(self, path: str) -> Route | None:
        """The inference path ``path`` is, if it is one. Remembered: matching costs a small
        model's request ~3 µs, and clients ask for few paths. Up to ROUTES_HELD paths of up to
        ROUTE_HELD_CHARS are held (then all forgotten at once), so that no stream of new paths
        can grow it; a Route is shared by the requests to its path (read only)."""
        try:
            return self._known[path]
        except KeyError:
            pass
        route = self._match(path)
        if len(path) <= ROUTE_HELD_CHARS:
            if len(self._known) >= ROUTES_HELD:
                self._known.clear()
            self._known[path] = route
        return route

    def _match(self, path: str) -> Route | None:
        for pattern, template, door in self._routes:
            match = pattern.fullmatch(path)
            if match is not None:
                params = {k: v for k, v in match.groupdict().items() if v is not None}
                return Route(door, template, MappingProxyType(params))
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            route = self.route(scope["path"])
            if route is not None:
                call = HttpCall(
                    scope["path"],
                    route.params,
                    text_headers(scope["headers"]),
                    scope["query_string"],
                    receive,
                    self.settings.max_body_bytes,
                )
                write = functools.partial(send_answer, scope, send)
                await self.serve(scope["method"], call, route, client_of(scope), write)
                return
        await self.app(scope, receive, send)

    async def serve(
        self, method: str, call: HttpCall, route: Route, client: str, write: Write
    ) -> None:
        """Answer one request to an inference path through ``write``, and record it."""
        started = time.perf_counter()
        rid = self.recorder.request_id(call.headers.get(REQUEST_ID_HEADER))
        token = request_id.set(rid)
        status, version = 500, ""
        try:
            status, body, answer_headers = await self._answer(method, call, route.door)
            version = answer_headers.get(VERSION_HEADER, "")
            if rid != NO_ID:
                answer_headers[REQUEST_ID_HEADER] = rid
            await write(status, body, answer_headers)
        except asyncio.CancelledError:
            # the server cancels what is still open once the grace period is over
            if not await answered_cut_off(call.path, write):
                raise
            status = 503
        finally:
            elapsed = time.perf_counter() - started
            served = call.served or route.params.get("name", "")
            self.recorder.record(
                method,
                call.path,
                route.template,
                served,
                version,
                str(status),
                elapsed,
                client,
                rid,
            )
            request_id.reset(token)

    async def _answer(self, method: str, call: HttpCall, door: FrontDoor) -> Answer:
        """The door's answer, or the error raised on the way rendered in its dress."""
        try:
            refuse_if_draining()
            if method != "POST":
                raise MethodNotAllowed(f"{method} {call.path}: method not allowed; allowed: POST")
            authorize_api(call.headers.get("authorization"), self.settings)
            return await door.answer(call, self.service)
        except ModelportError as exc:
            return error_answer(exc, call.path)
        except Exception as exc:  # in front of the framework: nothing else would answer
            return error_answer(unexpected(f"POST {call.path}", exc), call.path)
