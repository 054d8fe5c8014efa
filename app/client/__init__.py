"""The Python client of the modelport HTTP API and the ``modelport`` command (no server imports)."""

from app.client.api import (
    DEFAULT_URL,
    ApiError,
    AsyncModelportClient,
    AuthenticationError,
    BadRequestError,
    ConflictError,
    InvalidInputError,
    ModelportClient,
    ModelportClientError,
    NotFoundError,
    PayloadTooLargeError,
    PermissionDeniedError,
    ServerUnreachable,
    UnavailableError,
)

__all__ = [
    "DEFAULT_URL",
    "ApiError",
    "AsyncModelportClient",
    "AuthenticationError",
    "BadRequestError",
    "ConflictError",
    "InvalidInputError",
    "ModelportClient",
    "ModelportClientError",
    "NotFoundError",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "ServerUnreachable",
    "UnavailableError",
]
