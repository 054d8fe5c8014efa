"""The modelport error hierarchy: each error names its condition and carries its HTTP status.
No web imports: each front door renders these (:mod:`app.http.answers`)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, ClassVar


class ModelportError(Exception):
    """Base of every error the service raises on purpose; carries its HTTP status and code."""

    status: int = 500
    code: str = "internal_error"
    default_headers: ClassVar[dict[str, str]] = {}

    def __init__(
        self,
        message: str,
        detail: dict[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail
        self.headers = {**self.default_headers, **(headers or {})}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r})"


class ConfigError(ModelportError):
    """The settings or the TOML file of served models are unusable; startup stops."""

    code = "config_error"


class BadRequest(ModelportError):
    """The request body is not what the endpoint reads (e.g. malformed JSON)."""

    status = 400
    code = "bad_request"


class InvalidRequest(ModelportError):
    """The request's path, query or body does not match what the endpoint declares."""

    status = 422
    code = "invalid_request"


class FrameworkError(ModelportError):
    """An HTTP error the web framework raised with a status of its own choosing."""

    code = "http_error"

    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None) -> None:
        super().__init__(message, None, headers)
        self.status = status


class NoSuchEndpoint(ModelportError):
    """No endpoint answers this path."""

    status = 404
    code = "not_found"


class Draining(ModelportError):
    """The process is shutting down and takes no new request."""

    status = 503
    code = "draining"
    default_headers: ClassVar[dict[str, str]] = {"Retry-After": "1", "Connection": "close"}


class HeadTooLarge(ModelportError):
    """A request head over the caps on its size or its number of header fields."""

    status = 431
    code = "request_header_fields_too_large"
    default_headers: ClassVar[dict[str, str]] = {"Connection": "close"}


class ClientTimeout(ModelportError):
    """A client that did not finish sending its request head, or let its body stall, within
    the client timeout."""

    status = 408
    code = "request_timeout"
    default_headers: ClassVar[dict[str, str]] = {"Connection": "close"}


class Unauthorized(ModelportError):
    """A credential is required and none (or a malformed one) was sent."""

    status = 401
    code = "unauthorized"
    default_headers: ClassVar[dict[str, str]] = {"WWW-Authenticate": "Bearer"}


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
    default_headers: ClassVar[dict[str, str]] = {"Retry-After": "1"}


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
    default_headers: ClassVar[dict[str, str]] = {"Allow": "POST"}


class UnsupportedMediaType(ModelportError):
    """The body's Content-Type is not one the endpoint reads."""

    status = 415
    code = "unsupported_media_type"


class NotAcceptable(ModelportError):
    """No answer in the form ``Accept`` asks for (e.g. one raw tensor for several outputs)."""

    status = 406
    code = "not_acceptable"


class InvalidInput(ModelportError):
    """The inputs do not fit the model: shape, dtype, values or count."""

    status = 422
    code = "invalid_input"


class ModelUnavailable(ModelportError):
    """The model is configured but cannot serve (its weights failed to load)."""

    status = 503
    code = "model_unavailable"


class UnloadRefused(ModelportError):
    """A model cannot be unloaded: the service serves every model its configuration names."""

    status = 400
    code = "unload_refused"


class QueueFull(ModelportError):
    """Too many requests wait for this model; the client should retry shortly."""

    status = 503
    code = "queue_full"
    default_headers: ClassVar[dict[str, str]] = {"Retry-After": "1"}


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


def location(parts: Iterable[Any]) -> str:
    """A pydantic error's ``loc`` as ``models.0.name``."""
    return ".".join(str(part) for part in parts)


def describe_problems(errors: Iterable[Mapping[str, Any]]) -> str:
    """Pydantic validation errors as one line: ``where: what; where: what``."""
    return "; ".join(f"{location(err['loc']) or 'body'}: {err['msg']}" for err in errors)
