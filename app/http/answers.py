"""Answers: every error rendered in one place (ours, the framework's and unexpected ones) in
the dress of the protocol the path belongs to (the native ``{"error", "code"}`` body, or the
Open Inference Protocol's ``{"error"}`` under ``/v2``), and raw ASGI answers."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.types import Scope, Send

from app.errors import (
    FrameworkError,
    InvalidRequest,
    MethodNotAllowed,
    ModelportError,
    NoSuchEndpoint,
    WeightsError,
    describe_problems,
    error_body,
)

logger = logging.getLogger(__name__)
JSON = "application/json"
Answer = tuple[int, bytes, dict[str, str]]
"""Status, body and headers of an answer."""


def error_answer(exc: ModelportError, path: str) -> Answer:
    """The answer to ``exc`` raised for a request to ``path``."""
    if path == "/v2" or path.startswith("/v2/"):
        status, body = _v2_status(exc), {"error": exc.message}
    else:
        status, body = exc.status, error_body(exc.message, exc.code, exc.detail)
    return status, orjson.dumps(body), {"content-type": JSON, **exc.headers}


WHOLE_ANSWER = "modelport.whole_answer"
"""The scope extension of a server that writes a whole answer in one call:
``write(status, raw headers, body) -> bool`` (False: it wrote nothing, send the messages)."""


async def send_answer(
    scope: Scope, send: Send, status: int, body: bytes, headers: dict[str, str]
) -> None:
    """Send a whole answer: at once where the server offers that (WHOLE_ANSWER), else as the
    raw ASGI interface's two messages."""
    extensions = scope.get("extensions")
    write = extensions.get(WHOLE_ANSWER) if extensions else None
    if write is not None and write(status, raw_headers(headers), body):
        return
    raw = [*raw_headers(headers), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


def raw_headers(headers: dict[str, str]) -> list[tuple[bytes, bytes]]:
    """Headers as the ASGI and HTTP layers write them: lower-case latin-1 bytes."""
    return [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]


def _v2_status(exc: ModelportError) -> int:
    """The protocol knows 400 for bad input, and weights that cannot load cannot serve (503)."""
    if isinstance(exc, WeightsError):
        return 503
    return 400 if exc.status == 422 else exc.status


def unexpected(where: str, exc: BaseException) -> ModelportError:
    """An error nobody raised on purpose: logged with its traceback, answered as a bare 500."""
    logger.error("unhandled error on %s", where, exc_info=exc)
    return ModelportError("internal server error")


def json_response(
    body: Any, status: int = 200, headers: Mapping[str, str] | None = None
) -> Response:
    """A JSON answer encoded with orjson."""
    return Response(orjson.dumps(body), status, headers, media_type=JSON)


def _framework_error(request: Request, exc: Exception) -> ModelportError:
    where = f"{request.method} {request.url.path}"
    if isinstance(exc, ModelportError):
        return exc
    if isinstance(exc, RequestValidationError):
        return InvalidRequest(describe_problems(exc.errors()))
    if isinstance(exc, StarletteHTTPException):
        if exc.status_code == 405:
            allowed = (exc.headers or {}).get("Allow", "")
            message = f"{where}: method not allowed; allowed: {allowed}"
            return MethodNotAllowed(message, None, exc.headers)
        if exc.status_code == 404 and exc.detail == "Not Found":
            return NoSuchEndpoint(f"{where}: no such endpoint (see /docs)")
        return FrameworkError(exc.status_code, str(exc.detail), exc.headers)
    return unexpected(where, exc)


async def _render(request: Request, exc: Exception) -> Response:
    status, body, headers = error_answer(_framework_error(request, exc), request.url.path)
    return Response(body, status, headers)


def install_error_handlers(app: FastAPI) -> None:
    """Render every error, ours or the framework's, through :func:`error_answer`."""
    for kind in (ModelportError, RequestValidationError, StarletteHTTPException, Exception):
        app.add_exception_handler(kind, _render)
