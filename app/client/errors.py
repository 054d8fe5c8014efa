"""The errors the client raises: one base, ``ModelportClientError``; the server's error answers
as typed ``ApiError`` subclasses (by status, or by gRPC status code) with its message and code;
no connection, no answer in time, and inputs that cannot be put on the wire."""

from __future__ import annotations

from typing import Any, ClassVar

import httpx


class ModelportClientError(Exception):
    """Base of every error the client raises."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r})"


class ServerUnreachable(ModelportClientError):
    """No connection: the server is down, refuses connections, or the address is wrong."""


class ServerTimeout(ModelportClientError):
    """Connected, but no answer within the client's ``timeout`` (a slow model, a long queue, a
    stalled server). Unlike ServerUnreachable, the request may have run on the server."""


class UnsendableInputError(ModelportClientError):
    """Inputs that no wire format carries (object arrays, complex numbers, strings in an array,
    other Python objects), refused before anything is sent."""


class ApiError(ModelportClientError):
    """The server answered an error: its status, its message and its stable ``code``. Over
    gRPC, ``grpc_code`` is the status code's name (``INVALID_ARGUMENT``), ``code`` that name in
    lower case and ``status`` the HTTP status the REST door answers for the same error."""

    status_codes: ClassVar[tuple[int, ...]] = ()

    def __init__(
        self,
        message: str,
        status: int,
        code: str,
        detail: dict[str, Any] | None = None,
        *,
        grpc_code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.detail = detail
        self.grpc_code = grpc_code

    def __str__(self) -> str:
        if self.grpc_code is not None:
            return f"{self.message} (gRPC {self.grpc_code})"
        return f"{self.message} ({self.code}, HTTP {self.status})"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, status={self.status}, code={self.code!r})"


class BadRequestError(ApiError):
    """400: the body is malformed, or a digest does not match."""

    status_codes = (400,)


class AuthenticationError(ApiError):
    """401: a token is required and none was sent (over gRPC, UNAUTHENTICATED: none, or a wrong
    one)."""

    status_codes = (401,)


class PermissionDeniedError(ApiError):
    """403: the token is wrong, or management is disabled on the server."""

    status_codes = (403,)


class NotFoundError(ApiError):
    """404: no such model, version or endpoint."""

    status_codes = (404,)


class NotAcceptableError(ApiError):
    """406: the answer form asked for cannot hold the outputs (one raw tensor of a model of
    several outputs: give its inputs by name, or ask for the postprocessed JSON)."""

    status_codes = (406,)


class ConflictError(ApiError):
    """409: the version operation conflicts with the model's state (e.g. nothing to roll back,
    or deleting the active version)."""

    status_codes = (409,)


class PayloadTooLargeError(ApiError):
    """413: the body exceeds the server's limit."""

    status_codes = (413,)


class InvalidInputError(ApiError):
    """422: the inputs do not fit the model (shape, dtype, NaN...), or uploaded weights were
    refused (see ``code``)."""

    status_codes = (422,)


class UnavailableError(ApiError):
    """503: the model (or server) cannot serve now."""

    status_codes = (503,)


_BY_STATUS = {
    status: cls
    for cls in (
        BadRequestError,
        AuthenticationError,
        PermissionDeniedError,
        NotFoundError,
        NotAcceptableError,
        ConflictError,
        PayloadTooLargeError,
        InvalidInputError,
        UnavailableError,
    )
    for status in cls.status_codes
}


def error_for(response: httpx.Response) -> ApiError:
    """The typed exception for an error answer, with the server's message and code."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict) or not isinstance(body.get("error"), str):
        body = {"error": response.text.strip() or response.reason_phrase, "code": "http_error"}
    cls = _BY_STATUS.get(response.status_code, ApiError)
    detail = body.get("detail")
    return cls(
        body["error"],
        response.status_code,
        str(body.get("code", "http_error")),
        detail if isinstance(detail, dict) else None,
    )
