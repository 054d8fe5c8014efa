"""Python clients of the modelport HTTP API (httpx): ``ModelportClient`` and
``AsyncModelportClient``. Every error answer becomes a typed exception carrying the server's
message and code; methods return the server's JSON.

    with ModelportClient("http://127.0.0.1:8000") as client:
        client.predict("linear", np.ones((1, 10), np.float32))["outputs"]
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, ClassVar, Self, TypeAlias

import httpx

if TYPE_CHECKING:
    import numpy as np
    import torch

DEFAULT_URL = "http://127.0.0.1:8000"
CHUNK_BYTES = 1024 * 1024

Progress = Callable[[int, int], None]
"""Called as the upload streams with (bytes sent so far, total bytes)."""

Inputs: TypeAlias = "Sequence[Any] | np.ndarray | torch.Tensor"
"""A batch of samples: nested lists, a numpy array or a torch tensor (batch dimension first)."""


class ModelportClientError(Exception):
    """Base of every error the client raises."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r})"


class ServerUnreachable(ModelportClientError):
    """No answer: the server is down, the address is wrong, or the request timed out."""


class ApiError(ModelportClientError):
    """The server answered an error: its status, its message and its stable ``code``."""

    status_codes: ClassVar[tuple[int, ...]] = ()

    def __init__(
        self, message: str, status: int, code: str, detail: dict[str, Any] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.message} ({self.code}, HTTP {self.status})"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, status={self.status}, code={self.code!r})"


class BadRequestError(ApiError):
    """400: the body is malformed, or a digest does not match."""

    status_codes = (400,)


class AuthenticationError(ApiError):
    """401: a token is required and none was sent."""

    status_codes = (401,)


class PermissionDeniedError(ApiError):
    """403: the token is wrong, or management is disabled on the server."""

    status_codes = (403,)


class NotFoundError(ApiError):
    """404: no such model, version or endpoint."""

    status_codes = (404,)


class ConflictError(ApiError):
    """409: the version operation conflicts with the model's state (e.g. nothing to roll back)."""

    status_codes = (409,)


class PayloadTooLargeError(ApiError):
    """413: the body exceeds the server's limit."""

    status_codes = (413,)


class InvalidInputError(ApiError):
    """422: the inputs do not fit the model, or uploaded weights were refused (see ``code``)."""

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


def _json(response: httpx.Response, *ok: int) -> dict[str, Any]:
    """The JSON object of a successful answer; an error answer raises its typed exception."""
    if response.status_code not in (ok or (200,)):
        raise error_for(response)
    body: dict[str, Any] = response.json()
    return body


def as_batch(inputs: Inputs) -> Any:
    """Nested lists for the request body: numpy arrays and torch tensors via ``tolist()``."""
    to_list = getattr(inputs, "tolist", None)
    return to_list() if callable(to_list) else inputs


@dataclass
class _Upload:
    """A weights file streamed in chunks, reporting progress as each chunk goes."""

    path: Path
    progress: Progress | None
    chunk_bytes: int = CHUNK_BYTES
    size: int = field(init=False)

    def __post_init__(self) -> None:
        self.size = self.path.stat().st_size

    def chunks(self) -> Iterator[bytes]:
        sent = 0
        with self.path.open("rb") as file:
            while chunk := file.read(self.chunk_bytes):
                yield chunk
                sent += len(chunk)
                if self.progress is not None:
                    self.progress(sent, self.size)

    async def async_chunks(self) -> AsyncIterator[bytes]:
        sent = 0
        with self.path.open("rb") as file:
            while chunk := await asyncio.to_thread(file.read, self.chunk_bytes):
                yield chunk
                sent += len(chunk)
                if self.progress is not None:
                    self.progress(sent, self.size)

    def request(self, activate: bool, sha256: str | None) -> dict[str, Any]:
        """The keyword arguments of the PUT, besides the content."""
        params = {"activate": str(activate).lower(), "filename": self.path.name}
        if sha256:
            params["sha256"] = sha256
        # An explicit length (instead of chunked encoding) lets the server refuse an
        # oversized file before it is sent.
        headers = {"Content-Length": str(self.size), "Content-Type": "application/octet-stream"}
        return {"params": params, "headers": headers}


def _unreachable(url: httpx.URL, exc: httpx.TransportError) -> str:
    return f"cannot reach the server at {url}: {exc or type(exc).__name__}"


def _headers(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


class ModelportClient:
    """A synchronous client. ``token`` is sent as a bearer token: the admin token for
    management, the API token (when the server sets one) for prediction and metadata."""

    def __init__(
        self,
        url: str = DEFAULT_URL,
        token: str | None = None,
        *,
        timeout: float = 60.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self._http = httpx.Client(
            base_url=url, headers=_headers(token), timeout=timeout, transport=transport
        )

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the connections."""
        self._http.close()

    def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            return self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise ServerUnreachable(_unreachable(self._http.base_url, exc)) from exc

    def health(self) -> dict[str, Any]:
        """Readiness: ``{"ready": bool, "models": {...}, "unavailable": {...}}`` (also when not
        ready: then ``ready`` is false and ``unavailable`` says why)."""
        response = self._send("GET", "/health/ready")
        return _json(response, 200, 503)

    def models(self) -> list[dict[str, Any]]:
        """Every served model's metadata."""
        models: list[dict[str, Any]] = _json(self._send("GET", "/v1/models"))["models"]
        return models

    def model(self, name: str) -> dict[str, Any]:
        """One model's metadata: input shape and dtype, version, weights, load report."""
        return _json(self._send("GET", f"/v1/models/{name}"))

    def predict(self, model: str, inputs: Inputs) -> dict[str, Any]:
        """Run a batch: ``{"model", "version", "outputs"}``, one output per sample."""
        response = self._send(
            "POST", f"/v1/models/{model}/predict", json={"inputs": as_batch(inputs)}
        )
        return _json(response)

    def upload(
        self,
        model: str,
        path: str | Path,
        *,
        activate: bool = True,
        sha256: str | None = None,
        progress: Progress | None = None,
        chunk_bytes: int = CHUNK_BYTES,
    ) -> dict[str, Any]:
        """Stream a weights file to the server in chunks, calling ``progress`` after each;
        returns the version it became, with its validation report. Refused weights raise
        InvalidInputError whose ``code`` names the reason (e.g. ``weights_incompatible``)."""
        upload = _Upload(Path(path), progress, chunk_bytes)
        response = self._send(
            "PUT",
            f"/v1/models/{model}/weights",
            content=upload.chunks(),
            **upload.request(activate, sha256),
        )
        return _json(response, 200, 201)

    def versions(self, model: str) -> dict[str, Any]:
        """``{"active", "previous", "versions": [...]}``, oldest first."""
        return _json(self._send("GET", f"/v1/models/{model}/versions"))

    def activate(self, model: str, version: str) -> dict[str, Any]:
        """Serve a stored version; returns it."""
        path = f"/v1/models/{model}/versions/{version}/activate"
        return _json(self._send("POST", path))

    def rollback(self, model: str) -> dict[str, Any]:
        """Switch back to the previously active version; returns it."""
        return _json(self._send("POST", f"/v1/models/{model}/rollback"))


class AsyncModelportClient:
    """The asynchronous twin of :class:`ModelportClient`, with the same methods awaited."""

    def __init__(
        self,
        url: str = DEFAULT_URL,
        token: str | None = None,
        *,
        timeout: float = 60.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._http = httpx.AsyncClient(
            base_url=url, headers=_headers(token), timeout=timeout, transport=transport
        )

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connections."""
        await self._http.aclose()

    async def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            return await self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise ServerUnreachable(_unreachable(self._http.base_url, exc)) from exc

    async def health(self) -> dict[str, Any]:
        """See :meth:`ModelportClient.health`."""
        return _json(await self._send("GET", "/health/ready"), 200, 503)

    async def models(self) -> list[dict[str, Any]]:
        """See :meth:`ModelportClient.models`."""
        models: list[dict[str, Any]] = _json(await self._send("GET", "/v1/models"))["models"]
        return models

    async def model(self, name: str) -> dict[str, Any]:
        """See :meth:`ModelportClient.model`."""
        return _json(await self._send("GET", f"/v1/models/{name}"))

    async def predict(self, model: str, inputs: Inputs) -> dict[str, Any]:
        """See :meth:`ModelportClient.predict`."""
        body = {"inputs": as_batch(inputs)}
        return _json(await self._send("POST", f"/v1/models/{model}/predict", json=body))

    async def upload(
        self,
        model: str,
        path: str | Path,
        *,
        activate: bool = True,
        sha256: str | None = None,
        progress: Progress | None = None,
        chunk_bytes: int = CHUNK_BYTES,
    ) -> dict[str, Any]:
        """See :meth:`ModelportClient.upload`."""
        upload = _Upload(Path(path), progress, chunk_bytes)
        response = await self._send(
            "PUT",
            f"/v1/models/{model}/weights",
            content=upload.async_chunks(),
            **upload.request(activate, sha256),
        )
        return _json(response, 200, 201)

    async def versions(self, model: str) -> dict[str, Any]:
        """See :meth:`ModelportClient.versions`."""
        return _json(await self._send("GET", f"/v1/models/{model}/versions"))

    async def activate(self, model: str, version: str) -> dict[str, Any]:
        """See :meth:`ModelportClient.activate`."""
        path = f"/v1/models/{model}/versions/{version}/activate"
        return _json(await self._send("POST", path))

    async def rollback(self, model: str) -> dict[str, Any]:
        """See :meth:`ModelportClient.rollback`."""
        return _json(await self._send("POST", f"/v1/models/{model}/rollback"))
