"""The modelport error hierarchy and the handlers that render every error in one JSON format."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, ClassVar

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

logger = logging.getLogger(__name__)


class ModelportError(Exception):
    """Base of every error the service raises on purpose; carries its HTTP status and code."""

    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"
    headers: ClassVar[dict[str, str]] = {}

    def __init__(self, message: str, detail: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r})"


class ConfigError(ModelportError):
    """The settings or the TOML file of served models are unusable; startup stops."""

    code = "config_error"


class BadRequest(ModelportError):
    """The request body is not what the endpoint reads (e.g. malformed JSON)."""

    status = 400
    code = "bad_request"


class Unauthorized(ModelportError):
    """A credential is required and none (or a malformed one) was sent."""

    status = 401
    code = "unauthorized"
    headers: ClassVar[dict[str, str]] = {"WWW-Authenticate": "Bearer"}


class Forbidden(ModelportError):
    """The credential sent is wrong."""

    status = 403
    code = "forbidden"


class ManagementDisabled(ModelportError):
    """No admin token is configured, so management endpoints are off."""

    status = 403
    code = "management_disabled"


class DigestMismatch(ModelportError):
    """The uploaded bytes do not have the sha256 the caller said they have."""

    status = 400
    code = "digest_mismatch"


class VersionConflict(ModelportError):
    """The version operation conflicts with the model's state (e.g. deleting the active one)."""

    status = 409
    code = "version_conflict"


class VersionNotFound(ModelportError):
    """The model has no version with this id."""

    status = 404
    code = "version_not_found"


class InsufficientStorage(ModelportError):
    """The weight store cannot take the write (disk full, quota, read-only); nothing was kept."""

    status = 507
    code = "insufficient_storage"


class StateUnavailable(ModelportError):
    """The version database or the blob store cannot be reached or used now."""

    status = 503
    code = "state_unavailable"
    headers: ClassVar[dict[str, str]] = {"Retry-After": "1"}


class ModelNotFound(ModelportError):
    """No served model has this name."""

    status = 404
    code = "model_not_found"


class PayloadTooLarge(ModelportError):
    """The request body exceeds the configured limit."""

    status = 413
    code = "payload_too_large"


class MethodNotAllowed(ModelportError):
    """The path exists but not for this method."""

    status = 405
    code = "method_not_allowed"
    headers: ClassVar[dict[str, str]] = {"Allow": "POST"}


class UnsupportedMediaType(ModelportError):
    """The body's Content-Type is not one the endpoint reads."""

    status = 415
    code = "unsupported_media_type"


class InvalidInput(ModelportError):
    """The inputs do not fit the model: shape, dtype, values or count."""

    status = 422
    code = "invalid_input"


class ModelUnavailable(ModelportError):
    """The model is configured but cannot serve (its weights failed to load)."""

    status = 503
    code = "model_unavailable"


class QueueFull(ModelportError):
    """Too many requests wait for this model; the client should retry shortly."""

    status = 503
    code = "queue_full"
    headers: ClassVar[dict[str, str]] = {"Retry-After": "1"}


class InferenceTimeout(ModelportError):
    """The request was not answered within the configured timeout."""

    status = 504
    code = "timeout"


class InferenceFailed(ModelportError):
    """The model's forward raised on inputs that passed the shape and dtype checks."""

    status = 422
    code = "inference_failed"


class WeightsError(ModelportError):
    """A weights file was refused; nothing from it serves."""

    status = 422
    code = "weights_refused"


class WeightsUnreadable(WeightsError):
    """The file is empty, truncated or not a torch/safetensors file."""

    code = "weights_unreadable"


class PickledObjectRefused(WeightsError):
    """The file needs code to unpickle (a whole pickled model, or worse); it was not executed."""

    code = "pickled_object_refused"


class NotAStateDict(WeightsError):
    """The file loads but does not hold a flat mapping of names to dense tensors."""

    code = "not_a_state_dict"


class WeightsIncompatible(WeightsError):
    """The keys, shapes or dtypes do not fit the registered class."""

    code = "weights_incompatible"


class WeightsChanged(WeightsError):
    """The file's bytes no longer have the sha256 recorded for its version."""

    code = "weights_changed"


class UnsafeTensor(WeightsError):
    """A tensor that is bigger than its bytes (an expanded or overlapping view, a storage
    smaller than its shape) or has no data on a real device (``meta``)."""

    code = "unsafe_tensor"


class BlobCorrupt(WeightsError):
    """A blob's bytes do not have the sha256 it is stored under; they were not used."""

    code = "blob_corrupt"


class BlobMissing(WeightsError):
    """The blob store holds no blob under this sha256."""

    code = "blob_missing"


class NonFiniteWeights(WeightsError):
    """Some tensors hold NaN or infinity."""

    code = "non_finite_weights"


class SmokeTestFailed(WeightsError):
    """The model built with these weights gave no finite output of the expected shape."""

    code = "smoke_test_failed"


class AcceptanceFailed(WeightsError):
    """The weights load and run but score below the model's registered acceptance threshold."""

    code = "acceptance_failed"


def error_body(message: str, code: str, detail: dict[str, Any] | None = None) -> dict[str, Any]:
    """The one error body of the API: ``{"error": message, "code": code[, "detail": ...]}``."""
    body: dict[str, Any] = {"error": message, "code": code}
    if detail:
        body["detail"] = detail
    return body


def json_response(
    body: Any, status: int = 200, headers: Mapping[str, str] | None = None
) -> Response:
    """A JSON answer encoded with orjson."""
    return Response(orjson.dumps(body), status, headers, media_type="application/json")


async def _modelport_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, ModelportError)
    return json_response(error_body(exc.message, exc.code, exc.detail), exc.status, exc.headers)


async def _validation_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    problems = [f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()]
    return json_response(error_body("; ".join(problems), "invalid_request"), 422)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    where = f"{request.method} {request.url.path}"
    if exc.status_code == 405:
        allowed = (exc.headers or {}).get("Allow", "")
        body = error_body(f"{where}: method not allowed; allowed: {allowed}", "method_not_allowed")
    elif exc.status_code == 404 and exc.detail == "Not Found":
        body = error_body(f"{where}: no such endpoint (see /docs)", "not_found")
    else:
        body = error_body(str(exc.detail), "http_error")
    return json_response(body, exc.status_code, exc.headers)


async def _unexpected_error(request: Request, exc: Exception) -> Response:
    logger.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return json_response(error_body("internal server error", "internal_error"), 500)


def install_error_handlers(app: FastAPI) -> None:
    """Render every error, ours or the framework's, in the one error body."""
    app.add_exception_handler(ModelportError, _modelport_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected_error)
