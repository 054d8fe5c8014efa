"""The lean inference path: a raw ASGI middleware in front of the framework's routing and
dependency injection, which on small models cost more than the whole request. It matches the
inference paths of every HTTP front door, authenticates, and hands the call to the front door's
adapter; everything else goes on to the app. Errors are rendered by :mod:`app.http.answers`."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from dataclasses import dataclass, field
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
    params: dict[str, str]
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


Paths = tuple[tuple[re.Pattern[str], str], ...]
"""Each path pattern (its named groups become parameters) with its route template."""


class FrontDoor(Protocol):
    """A protocol's inference endpoints: the paths it answers and how."""

    paths: Paths

    async def answer(self, call: HttpCall, service: InferenceService) -> Answer:
        """Parse the call, run it on ``service`` and render the answer."""
        ...


@dataclass
class InferenceEndpoint:
    """ASGI middleware answering the front doors' inference paths; the rest goes to ``app``.

    It does for its requests what the layers in front of the framework's routes do for theirs
    (the request id, the draining gate, the request metrics and access line, through the same
    functions), in one call and with no wrapped ``send``: on a small model those layers cost
    as much as the inference."""

    app: ASGIApp
    service: InferenceService
    settings: Settings
    doors: tuple[FrontDoor, ...]
    recorder: RequestRecorder
    _routes: list[tuple[re.Pattern[str], str, FrontDoor]] = field(init=False)

    def __post_init__(self) -> None:
        self._routes = [
            (pattern, route, door) for door in self.doors for pattern, route in door.paths
        ]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path: str = scope["path"]
            for pattern, route, door in self._routes:
                match = pattern.fullmatch(path)
                if match is not None:
                    await self._serve(scope, receive, send, door, route, match)
                    return
        await self.app(scope, receive, send)

    async def _serve(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        door: FrontDoor,
        route: str,
        match: re.Match[str],
    ) -> None:
        started = time.perf_counter()
        path: str = scope["path"]
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        rid = self.recorder.request_id(headers.get(REQUEST_ID_HEADER))
        token = request_id.set(rid)
        params = {k: v for k, v in match.groupdict().items() if v is not None}
        call = HttpCall(
            path, params, headers, scope["query_string"], receive, self.settings.max_body_bytes
        )
        status, version = 500, ""
        try:
            status, body, answer_headers = await self._answer(scope["method"], call, door)
            version = answer_headers.get(VERSION_HEADER, "")
            if rid != NO_ID:
                answer_headers[REQUEST_ID_HEADER] = rid
            await send_answer(scope, send, status, body, answer_headers)
        except asyncio.CancelledError:
            # the server cancels what is still open once the grace period is over
            if not await answered_cut_off(scope, send):
                raise
            status = 503
        finally:
            elapsed = time.perf_counter() - started
            served = call.served or params.get("name", "")
            self.recorder.record(
                scope["method"],
                path,
                route,
                served,
                version,
                str(status),
                elapsed,
                client_of(scope),
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
