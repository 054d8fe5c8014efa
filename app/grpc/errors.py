"""Every error of the gRPC front door, mapped in one place to the protocol's status code (with
the server's message) and to the HTTP status the REST door answers for it (the requests
metric's ``status`` label, so that one dashboard counts both doors' failures alike)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import grpc

from app.errors import (
    BadRequest,
    Draining,
    Forbidden,
    InferenceFailed,
    InferenceTimeout,
    InvalidInput,
    InvalidRequest,
    ManagementDisabled,
    ModelNotFound,
    ModelportError,
    ModelUnavailable,
    NoSuchEndpoint,
    PayloadTooLarge,
    QueueFull,
    StateUnavailable,
    Unauthorized,
    VersionConflict,
    VersionNotFound,
    WeightsError,
)

logger = logging.getLogger(__name__)

CODES: tuple[tuple[type[ModelportError], grpc.StatusCode], ...] = (
    (ModelNotFound, grpc.StatusCode.NOT_FOUND),
    (VersionNotFound, grpc.StatusCode.NOT_FOUND),
    (NoSuchEndpoint, grpc.StatusCode.NOT_FOUND),
    (InvalidInput, grpc.StatusCode.INVALID_ARGUMENT),
    (BadRequest, grpc.StatusCode.INVALID_ARGUMENT),
    (InvalidRequest, grpc.StatusCode.INVALID_ARGUMENT),
    (InferenceFailed, grpc.StatusCode.INVALID_ARGUMENT),
    # gRPC's status guide: PERMISSION_DENIED is not for callers that failed to authenticate, and
    # a wrong token is that, as much as a missing one (REST: 401 and 403)
    (Unauthorized, grpc.StatusCode.UNAUTHENTICATED),
    (Forbidden, grpc.StatusCode.UNAUTHENTICATED),
    (ManagementDisabled, grpc.StatusCode.PERMISSION_DENIED),
    (PayloadTooLarge, grpc.StatusCode.RESOURCE_EXHAUSTED),
    # retry shortly, or on another replica: what UNAVAILABLE tells a client
    (Draining, grpc.StatusCode.UNAVAILABLE),
    (QueueFull, grpc.StatusCode.UNAVAILABLE),
    (ModelUnavailable, grpc.StatusCode.UNAVAILABLE),
    (StateUnavailable, grpc.StatusCode.UNAVAILABLE),
    # a stored version whose weights cannot load cannot serve (REST V2: 503)
    (WeightsError, grpc.StatusCode.UNAVAILABLE),
    (InferenceTimeout, grpc.StatusCode.DEADLINE_EXCEEDED),
    (VersionConflict, grpc.StatusCode.FAILED_PRECONDITION),
)
"""Our errors by condition, the first that matches wins."""

BY_HTTP_STATUS = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.UNAUTHENTICATED,
    404: grpc.StatusCode.NOT_FOUND,
    405: grpc.StatusCode.UNIMPLEMENTED,
    409: grpc.StatusCode.FAILED_PRECONDITION,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    415: grpc.StatusCode.INVALID_ARGUMENT,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    431: grpc.StatusCode.RESOURCE_EXHAUSTED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
    507: grpc.StatusCode.RESOURCE_EXHAUSTED,
}
"""Any other error of ours, by its HTTP status: a new error class gets a fitting code at once
(another 4xx: INVALID_ARGUMENT, never INTERNAL)."""


@dataclass(frozen=True, slots=True)
class Refusal:
    """How a call that failed ends: its status code and message, and the HTTP status the REST
    door would have answered (the metric's label)."""

    code: grpc.StatusCode
    message: str
    http_status: int


def refusal(exc: BaseException, where: str) -> Refusal:
    """The answer to ``exc`` raised while serving ``where`` (the method's path). Only an error
    nobody raised on purpose is INTERNAL: logged with its traceback, answered with a message
    that leaks nothing."""
    if not isinstance(exc, ModelportError):
        logger.error("unhandled error on %s", where, exc_info=exc)
        return Refusal(grpc.StatusCode.INTERNAL, "internal server error", 500)
    code = next((code for kind, code in CODES if isinstance(exc, kind)), None)
    if code is None:
        fallback = (
            grpc.StatusCode.INVALID_ARGUMENT if exc.status < 500 else grpc.StatusCode.INTERNAL
        )
        code = BY_HTTP_STATUS.get(exc.status, fallback)
    # the status the V2 REST door answers: 400 for bad input, 503 for weights that cannot serve
    status = 503 if isinstance(exc, WeightsError) else 400 if exc.status == 422 else exc.status
    return Refusal(code, exc.message, status)
