"""Python clients of the modelport HTTP API (httpx): ``ModelportClient`` and
``AsyncModelportClient``. Numpy arrays and torch tensors travel as binary tensors and come back
as numpy arrays (the raw output tensor; inputs by name go as one ``.npz`` and the outputs come
back by name); lists travel as JSON and come back as the server's JSON. Given the server's gRPC
door (``grpc="HOST:PORT"``), arrays and tensors go there instead (``ModelInfer``, raw tensors)
and come back the same. Every error answer becomes a typed exception carrying the server's
message and code.

    with ModelportClient("http://127.0.0.1:8000") as client:
        client.predict("linear", np.ones((1, 10), np.float32))  # -> array of shape (1, 2)
        client.predict("linear", {"input": np.ones((1, 10))})  # -> {"output": array}
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, Self, TypeAlias, overload

import httpx
import numpy as np

from app.client.errors import (
    ApiError,
    AuthenticationError,
    BadRequestError,
    ConflictError,
    InvalidInputError,
    ModelportClientError,
    NotAcceptableError,
    NotFoundError,
    PayloadTooLargeError,
    PermissionDeniedError,
    ServerTimeout,
    ServerUnreachable,
    UnavailableError,
    UnsendableInputError,
    error_for,
)
from app.client.tensors import (
    Binary,
    Prediction,
    binary_tensors,
    predict_call,
    predict_result,
    prediction_of,
)
from app.client.uploads import CHUNK_BYTES, Progress, Upload

if TYPE_CHECKING:
    import torch

    from app.client.grpc_transport import AsyncGrpcTransport, GrpcTransport

__all__ = [
    "CHUNK_BYTES",
    "DEFAULT_URL",
    "ApiError",
    "AsyncModelportClient",
    "AuthenticationError",
    "BadRequestError",
    "ConflictError",
    "InvalidInputError",
    "ModelportClient",
    "ModelportClientError",
    "NotAcceptableError",
    "NotFoundError",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "Prediction",
    "Progress",
    "ServerTimeout",
    "ServerUnreachable",
    "UnavailableError",
    "UnsendableInputError",
    "client_version",
    "error_for",
]

DEFAULT_URL = "http://127.0.0.1:8000"

Tensor: TypeAlias = "np.ndarray | torch.Tensor"
"""A batch as one array (batch dimension first): sent as a binary tensor."""
Inputs: TypeAlias = "Sequence[Any] | np.ndarray | torch.Tensor | Mapping[str, Any]"
"""A batch of samples: nested lists (sent as JSON), a numpy array or a torch tensor; or a batch
of each input by name, all arrays and tensors (sent as one ``.npz``) or all lists (JSON)."""


def client_version() -> str:
    """The installed modelport package's version (the client's)."""
    try:
        return metadata.version("modelport")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "0+unknown"


def _json(response: httpx.Response, *ok: int) -> dict[str, Any]:
    """The JSON object of a successful answer; an error answer raises its typed exception."""
    if response.status_code not in (ok or (200,)):
        raise error_for(response)
    body: dict[str, Any] = response.json()
    return body


def _predicted(response: httpx.Response, model: str) -> Prediction:
    if response.status_code != 200:
        raise error_for(response)
    return prediction_of(response, model)


def _no_content(response: httpx.Response) -> None:
    if response.status_code != 204:
        raise error_for(response)


def _failed(
    method: str, path: str, client: httpx.Client | httpx.AsyncClient, exc: httpx.TransportError
) -> ModelportClientError:
    """No answer: a timeout once connected (the request may have run), else unreachable."""
    reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    if isinstance(exc, httpx.TimeoutException) and not isinstance(exc, httpx.ConnectTimeout):
        return ServerTimeout(
            f"the server at {client.base_url} did not answer {method} {path} within the "
            f"client's timeout of {client.timeout.read} s ({reason})"
        )
    return ServerUnreachable(f"cannot reach the server at {client.base_url}: {reason}")


def _headers(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def _history_params(limit: int, before: int | None) -> dict[str, int]:
    return {"limit": limit} | ({"before": before} if before is not None else {})


class ModelportClient:
    """A synchronous client. ``token`` is sent as a bearer token: the admin token for
    management, the API token (when the server sets one) for prediction and metadata.
    ``timeout`` (seconds) bounds connecting and each wait for the server.

    ``grpc``: the server's gRPC door as ``HOST:PORT`` (its ``MODELPORT_GRPC_PORT``). Then
    :meth:`predict` and :meth:`prediction` of arrays and tensors for the raw outputs go over
    gRPC (``ModelInfer`` with raw tensors, the token as ``authorization`` metadata) and answer
    as over HTTP; lists, ``postprocess=True`` and every other method stay on HTTP."""

    def __init__(
        self,
        url: str = DEFAULT_URL,
        token: str | None = None,
        *,
        timeout: float = 60.0,
        transport: httpx.BaseTransport | None = None,
        grpc: str | None = None,
    ) -> None:
        self._http = httpx.Client(
            base_url=url, headers=_headers(token), timeout=timeout, transport=transport
        )
        self._grpc: GrpcTransport | None = None
        if grpc is not None:
            from app.client.grpc_transport import GrpcTransport  # grpc loads only when asked for

            self._grpc = GrpcTransport(grpc, token, timeout)

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
        if self._grpc is not None:
            self._grpc.close()

    def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            return self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise _failed(method, path, self._http, exc) from exc

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

    @overload
    def predict(
        self,
        model: str,
        inputs: Tensor,
        *,
        postprocess: Literal[False] | None = None,
        binary: Binary = "raw",
    ) -> np.ndarray: ...
    @overload
    def predict(
        self,
        model: str,
        inputs: Sequence[Any],
        *,
        postprocess: Literal[False],
        binary: Binary = "raw",
    ) -> np.ndarray: ...
    @overload
    def predict(
        self,
        model: str,
        inputs: Sequence[Any],
        *,
        postprocess: Literal[True] | None = None,
        binary: Binary = "raw",
    ) -> dict[str, Any]: ...
    @overload
    def predict(
        self, model: str, inputs: Tensor, *, postprocess: Literal[True], binary: Binary = "raw"
    ) -> dict[str, Any]: ...
    @overload
    def predict(
        self,
        model: str,
        inputs: Mapping[str, Any],
        *,
        postprocess: bool | None = None,
        binary: Binary = "raw",
    ) -> dict[str, Any]: ...
    @overload
    def predict(
        self,
        model: str,
        inputs: Inputs,
        *,
        postprocess: bool | None = None,
        binary: Binary = "raw",
    ) -> np.ndarray | dict[str, Any]: ...
    def predict(
        self,
        model: str,
        inputs: Inputs,
        *,
        postprocess: bool | None = None,
        binary: Binary = "raw",
    ) -> np.ndarray | dict[str, Any]:
        """Run a batch (batch dimension first). A numpy array or torch tensor is sent as a
        binary tensor (``binary``: raw bytes with shape and dtype headers, or ``.npy``) and the
        answer is the model's raw output tensor as a numpy array; lists are sent as JSON and the
        answer is ``{"model", "version", "outputs"}``, one postprocessed output per sample.
        ``postprocess=True`` asks for that JSON answer for arrays too, ``False`` for the raw
        tensor for lists too.

        ``inputs`` may also be a dict of each input's batch by name (a model of several inputs
        takes only that): all arrays and tensors go as one ``.npz`` and the raw outputs come
        back as a dict of numpy arrays by output name (``{"output": ...}`` for a model of one
        output); all lists go as JSON and the answer is the JSON one (one object of outputs
        by name per sample for a model of several outputs). ``postprocess`` picks the other
        answer as above; ``binary`` does not apply. A mix raises UnsendableInputError.

        With the client's ``grpc`` door, arrays and tensors (one, or a dict by name) go over
        gRPC unless ``postprocess=True``, and answer the same (``binary`` does not apply)."""
        answer = self.prediction(model, inputs, postprocess=postprocess, binary=binary)
        return predict_result(answer)

    def prediction(
        self,
        model: str,
        inputs: Inputs,
        *,
        postprocess: bool | None = None,
        binary: Binary = "raw",
    ) -> Prediction:
        """As :meth:`predict`, with the version that computed the outputs in either form."""
        if self._grpc is not None:
            tensors = binary_tensors(inputs, postprocess)
            if tensors is not None:
                return self._grpc.prediction(model, tensors)
        call = predict_call(inputs, postprocess, binary)
        path = f"/v1/models/{model}/predict"
        response = self._send("POST", path, content=call.content, headers=call.headers)
        return _predicted(response, model)

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
        upload = Upload(Path(path), progress, chunk_bytes)
        response = self._send(
            "PUT",
            f"/v1/models/{model}/weights",
            content=upload.chunks(),
            **upload.request(activate, sha256),
        )
        return _json(response, 200, 201)

    def versions(self, model: str) -> dict[str, Any]:
        """``{"model", "active", "previous", "versions": [...]}``, oldest first."""
        return _json(self._send("GET", f"/v1/models/{model}/versions"))

    def activate(self, model: str, version: str) -> dict[str, Any]:
        """Serve a stored version; returns it."""
        path = f"/v1/models/{model}/versions/{version}/activate"
        return _json(self._send("POST", path))

    def rollback(self, model: str) -> dict[str, Any]:
        """Switch back to the previously active version; returns it."""
        return _json(self._send("POST", f"/v1/models/{model}/rollback"))

    def delete(self, model: str, version: str) -> None:
        """Remove a stored version (its record and bytes). ConflictError for the active or
        the previous version and for the bundled weights; NotFoundError for an unknown one."""
        _no_content(self._send("DELETE", f"/v1/models/{model}/versions/{version}"))

    def history(self, model: str, *, limit: int = 50, before: int | None = None) -> dict[str, Any]:
        """The recorded management actions, newest first: ``{"model", "entries": [{"seq",
        "at", "action", "from_version", "to_version", "request_id", "client"}, ...],
        "next_before"}``; pass ``next_before`` as ``before`` for the next (older) page."""
        params = _history_params(limit, before)
        return _json(self._send("GET", f"/v1/models/{model}/history", params=params))


class AsyncModelportClient:
    """The asynchronous twin of :class:`ModelportClient`, with the same methods awaited (and
    ``grpc`` over ``grpc.aio``)."""

    def __init__(
        self,
        url: str = DEFAULT_URL,
        token: str | None = None,
        *,
        timeout: float = 60.0,
        transport: httpx.AsyncBaseTransport | None = None,
        grpc: str | None = None,
    ) -> None:
        self._http = httpx.AsyncClient(
            base_url=url, headers=_headers(token), timeout=timeout, transport=transport
        )
        self._grpc: AsyncGrpcTransport | None = None
        if grpc is not None:
            from app.client.grpc_transport import AsyncGrpcTransport  # as ModelportClient

            self._grpc = AsyncGrpcTransport(grpc, token, timeout)

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
        if self._grpc is not None:
            await self._grpc.aclose()

    async def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            return await self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise _failed(method, path, self._http, exc) from exc

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

    @overload
    async def predict(
        self,
        model: str,
        inputs: Tensor,
        *,
        postprocess: Literal[False] | None = None,
        binary: Binary = "raw",
    ) -> np.ndarray: ...
    @overload
    async def predict(
        self,
        model: str,
        inputs: Sequence[Any],
        *,
        postprocess: Literal[False],
        binary: Binary = "raw",
    ) -> np.ndarray: ...
    @overload
    async def predict(
        self,
        model: str,
        inputs: Sequence[Any],
        *,
        postprocess: Literal[True] | None = None,
        binary: Binary = "raw",
    ) -> dict[str, Any]: ...
    @overload
    async def predict(
        self, model: str, inputs: Tensor, *, postprocess: Literal[True], binary: Binary = "raw"
    ) -> dict[str, Any]: ...
    @overload
    async def predict(
        self,
        model: str,
        inputs: Mapping[str, Any],
        *,
        postprocess: bool | None = None,
        binary: Binary = "raw",
    ) -> dict[str, Any]: ...
    @overload
    async def predict(
        self,
        model: str,
        inputs: Inputs,
        *,
        postprocess: bool | None = None,
        binary: Binary = "raw",
    ) -> np.ndarray | dict[str, Any]: ...
    async def predict(
        self,
        model: str,
        inputs: Inputs,
        *,
        postprocess: bool | None = None,
        binary: Binary = "raw",
    ) -> np.ndarray | dict[str, Any]:
        """See :meth:`ModelportClient.predict`."""
        answer = await self.prediction(model, inputs, postprocess=postprocess, binary=binary)
        return predict_result(answer)

    async def prediction(
        self,
        model: str,
        inputs: Inputs,
        *,
        postprocess: bool | None = None,
        binary: Binary = "raw",
    ) -> Prediction:
        """See :meth:`ModelportClient.prediction`."""
        if self._grpc is not None:
            tensors = binary_tensors(inputs, postprocess)
            if tensors is not None:
                return await self._grpc.prediction(model, tensors)
        call = predict_call(inputs, postprocess, binary)
        path = f"/v1/models/{model}/predict"
        response = await self._send("POST", path, content=call.content, headers=call.headers)
        return _predicted(response, model)

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
        upload = Upload(Path(path), progress, chunk_bytes)
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

    async def delete(self, model: str, version: str) -> None:
        """See :meth:`ModelportClient.delete`."""
        _no_content(await self._send("DELETE", f"/v1/models/{model}/versions/{version}"))

    async def history(
        self, model: str, *, limit: int = 50, before: int | None = None
    ) -> dict[str, Any]:
        """See :meth:`ModelportClient.history`."""
        params = _history_params(limit, before)
        return _json(await self._send("GET", f"/v1/models/{model}/history", params=params))
