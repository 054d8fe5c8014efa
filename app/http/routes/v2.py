"""Open Inference Protocol (V2) REST endpoints, as tritonclient and KServe's client speak them.

Every error here answers ``{"error": "..."}``: 400 for bad input, 404 for an unknown model or
version, 503 when it cannot serve. A ``/versions/{version}`` route serves that stored version:
the active or previous one as they are, any other loaded on demand and kept in a small cache.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from fastapi.routing import APIRoute
from pydantic import BaseModel
from starlette.responses import Response

from app.codecs.arrays import check_array, read_capped
from app.codecs.v2 import (
    EXTENSIONS,
    HEADER_LENGTH,
    INPUT_NAME,
    OUTPUT_NAME,
    PLATFORM,
    DecodedRequest,
    InferenceRequest,
    InferenceResponse,
    ModelMetadata,
    ModelReady,
    ResponseOutput,
    ServerLive,
    ServerMetadata,
    ServerReady,
    TensorMetadata,
    datatype_of,
    decode_request,
    decompress,
    encode_response,
    from_bytes,
)
from app.config import Settings
from app.errors import (
    InvalidInput,
    ModelportError,
    VersionNotFound,
    WeightsError,
    json_response,
)
from app.http.deps import API_SECURITY, ApiDep, RegistryDep, SettingsDep
from app.http.openapi import REF
from app.http.predict import VERSION_HEADER
from app.serving.model import ServedModel
from app.state.records import VERSION_PATTERN


def _v2_error(exc: ModelportError) -> Response:
    """The protocol's error body; input problems are 400 and weights that cannot load are 503."""
    status = exc.status
    if isinstance(exc, WeightsError):
        status = 503
    elif status == 422:
        status = 400
    return json_response({"error": exc.message}, status, exc.headers)


class V2Route(APIRoute):
    """A route whose errors answer ``{"error": "..."}``, whatever raised them below."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            try:
                return await handler(request)
            except ModelportError as exc:
                return _v2_error(exc)

        return handle


class InferenceErrorResponse(BaseModel):
    """The protocol's error body."""

    error: str


_DESCRIPTIONS = {
    400: "Bad input",
    401: "MODELPORT_API_TOKEN is set; no (or a malformed) bearer token",
    403: "MODELPORT_API_TOKEN is set; a wrong bearer token",
    404: "Unknown model or version",
    413: "Body over MODELPORT_MAX_BODY_BYTES",
    503: "Cannot serve",
}


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for the protocol's error answers."""
    return {
        status: {
            "description": _DESCRIPTIONS[status],
            "model": InferenceErrorResponse,
            "content": {"application/json": {"example": {"error": "..."}}},
        }
        for status in statuses
    }


router = APIRouter(prefix="/v2", tags=["open inference protocol (v2)"], route_class=V2Route)


@router.get("", summary="Server metadata")
async def get_server_metadata(request: Request) -> ServerMetadata:
    """Name, version and the protocol extensions served."""
    return ServerMetadata(name="modelport", version=request.app.version, extensions=EXTENSIONS)


@router.get("/health/live", summary="Server live", response_model=ServerLive)
async def get_server_live() -> Response:
    """``{"live": true}`` while the process runs."""
    return json_response({"live": True})


@router.get(
    "/health/ready", summary="Server ready", response_model=ServerReady, responses=_errors(503)
)
async def get_server_ready(registry: RegistryDep) -> Response:
    """``{"ready": true}`` when every model can serve; else 503 naming those that cannot."""
    unavailable = registry.unavailable()
    if not unavailable:
        return json_response({"ready": True})
    reasons = "; ".join(f"{name}: {reason}" for name, reason in unavailable.items())
    return json_response({"ready": False, "error": f"models cannot serve: {reasons}"}, 503)


@router.get(
    "/models/{name}/ready",
    summary="Model ready",
    response_model=ModelReady,
    responses=_errors(404, 503),
)
async def get_model_ready(name: str, registry: RegistryDep) -> Response:
    """``{"name": ..., "ready": true}`` when the model serves; else 503 with the reason."""
    return _model_ready(registry.get(name), None)


@router.get(
    "/models/{name}/versions/{version}/ready",
    summary="Model version ready",
    response_model=ModelReady,
    responses=_errors(404, 503),
)
async def get_model_version_ready(name: str, version: str, registry: RegistryDep) -> Response:
    """Ready when that version is loaded here (active, previous or loaded for an inference);
    a stored version that is not answers 503 until an inference loads it. A pure read."""
    model = registry.get(name)
    await asyncio.to_thread(model.record, _checked(model, version))  # 404 when there is none
    if model.loaded(version) is None:
        return _model_ready(model, f"version {version} is stored but not loaded")
    return _model_ready(model, None)


def _model_ready(model: ServedModel, problem: str | None) -> Response:
    if problem is None and model.runtime is None:
        problem = model.error or "not loaded"
    if problem is None:
        return json_response({"name": model.name, "ready": True})
    return json_response({"name": model.name, "ready": False, "error": problem}, 503)


@router.get(
    "/models/{name}",
    summary="Model metadata",
    dependencies=[ApiDep],
    responses=_errors(401, 403, 404, 503),
    openapi_extra=API_SECURITY,
)
async def get_model_metadata(name: str, registry: RegistryDep) -> ModelMetadata:
    """Input and output tensors (-1 for the batch dimension), platform and versions."""
    return await _metadata(registry.get(name), None)


@router.get(
    "/models/{name}/versions/{version}",
    summary="Model version metadata",
    dependencies=[ApiDep],
    responses=_errors(401, 403, 404, 503),
    openapi_extra=API_SECURITY,
)
async def get_model_version_metadata(
    name: str, version: str, registry: RegistryDep
) -> ModelMetadata:
    """Like the model's metadata, for one stored version (loaded on demand)."""
    return await _metadata(registry.get(name), version)


async def _metadata(model: ServedModel, version: str | None) -> ModelMetadata:
    """The output's datatype and shape are those the model's load-time smoke test saw (the same
    class and kwargs for every version), so metadata never runs the model."""
    if version is not None:
        await asyncio.to_thread(model.record, _checked(model, version))  # 404 when there is none
    spec, runtime = model.spec, model.active()
    return ModelMetadata(
        name=model.name,
        versions=[record.id for record in await asyncio.to_thread(model.versions)],
        platform=PLATFORM,
        inputs=[
            TensorMetadata(
                name=INPUT_NAME,
                datatype=datatype_of(spec.input_dtype),
                shape=[-1, *model.sample_shape],
            )
        ],
        outputs=[
            TensorMetadata(
                name=OUTPUT_NAME,
                datatype=datatype_of(runtime.output_dtype),
                shape=[-1, *runtime.output_sample_shape],
            )
        ],
    )


_INFER_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {"$ref": REF.format(model="InferenceRequest")}},
            "application/octet-stream": {
                "schema": {
                    "type": "string",
                    "format": "binary",
                    "description": f"The JSON header ({HEADER_LENGTH} bytes), then the tensors.",
                },
            },
        },
    },
    **API_SECURITY,
}
COMPONENTS = (InferenceRequest,)
"""Models only the hand-written request body above refers to: the app adds their schemas."""
_INFER_OK: dict[int | str, dict[str, Any]] = {
    200: {"model": InferenceResponse, "description": "JSON, or JSON header + binary outputs"},
    **_errors(400, 401, 403, 404, 413, 503),
}


@router.post(
    "/models/{name}/infer",
    summary="Inference",
    dependencies=[ApiDep],
    responses=_INFER_OK,
    openapi_extra=_INFER_BODY,
)
async def infer(
    name: str, request: Request, registry: RegistryDep, settings: SettingsDep
) -> Response:
    """JSON or binary tensors in (with or without a Content-Type, optionally gzip/deflate),
    the raw forward output out, as JSON or binary per ``binary_data`` / ``binary_data_output``."""
    return await _infer(registry.get(name), None, request, settings)


@router.post(
    "/models/{name}/versions/{version}/infer",
    summary="Inference with one version",
    dependencies=[ApiDep],
    responses=_INFER_OK,
    openapi_extra=_INFER_BODY,
)
async def infer_version(
    name: str, version: str, request: Request, registry: RegistryDep, settings: SettingsDep
) -> Response:
    """Like inference, served by the given stored version (loaded on demand)."""
    model = registry.get(name)
    await model.runtime_for(_checked(model, version))  # 404 (or loaded) before the body is read
    return await _infer(model, version, request, settings)


async def _infer(
    model: ServedModel, version: str | None, request: Request, settings: Settings
) -> Response:
    limit = settings.max_body_bytes
    body = decompress(
        await read_capped(request.stream(), request.headers.get("content-length"), limit),
        request.headers.get("content-encoding"),
        limit,
    )
    header_length = request.headers.get(HEADER_LENGTH)
    if header_length is not None and header_length.strip() == "0":
        decoded = _raw_request(model, body)
    else:
        decoded = decode_request(body, header_length)
    array = _model_input(model, decoded)
    batch = check_array(
        array,
        model.sample_shape,
        model.spec.input_dtype,
        max_samples=settings.max_samples_per_request,
        allow_non_finite=model.spec.allow_non_finite_input,
    )
    runtime, output = await model.infer(batch, version=version)
    binary = decoded.binary_output
    for wanted in decoded.outputs or []:
        if wanted.name != OUTPUT_NAME:
            raise InvalidInput(
                f"model {model.name!r} has no output {wanted.name!r}; its output is {OUTPUT_NAME!r}"
            )
        binary = wanted.parameters.get("binary_data", binary) is True
    meta = ResponseOutput(
        name=OUTPUT_NAME, datatype=datatype_of(output.dtype), shape=list(output.shape)
    )
    answer = InferenceResponse(
        model_name=model.name, model_version=runtime.version, id=decoded.id, outputs=[]
    )
    content, json_length = encode_response(answer, [(meta, output, binary)])
    headers = {VERSION_HEADER: runtime.version}
    if json_length is None:
        return Response(content, headers=headers, media_type="application/json")
    headers[HEADER_LENGTH] = str(json_length)
    return Response(content, headers=headers, media_type="application/octet-stream")


def _checked(model: ServedModel, version: str) -> str:
    """A version id of the right form, or VersionNotFound (the protocol's 404)."""
    if not VERSION_PATTERN.fullmatch(version):
        raise VersionNotFound(f"model {model.name!r} has no version {version!r}")
    return version


def _raw_request(model: ServedModel, body: bytes) -> DecodedRequest:
    """``Inference-Header-Content-Length: 0``: the body is one sample of the model's one input,
    and every output comes back binary."""
    shape = [1, *model.sample_shape]
    datatype = datatype_of(model.spec.input_dtype)
    array = from_bytes(body, datatype, shape, INPUT_NAME)
    return DecodedRequest(None, {INPUT_NAME: array}, None, binary_output=True)


def _model_input(model: ServedModel, decoded: DecodedRequest) -> np.ndarray:
    names = list(decoded.inputs)
    if names != [INPUT_NAME]:
        raise InvalidInput(
            f"model {model.name!r} takes one input named {INPUT_NAME!r}; received {names}"
        )
    array = decoded.inputs[INPUT_NAME]
    if array.ndim == 0:
        raise InvalidInput(
            f"input {INPUT_NAME!r} has shape []; expected [-1, "
            f"{', '.join(map(str, model.sample_shape))}] (the batch dimension first)"
        )
    return array
