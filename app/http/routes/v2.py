"""Open Inference Protocol (V2) REST endpoints, as tritonclient and KServe's client speak them.

Every error here answers ``{"error": "..."}``: 400 for bad input, 404 for an unknown model or
version, 503 when it cannot serve. A ``/versions/{version}`` route serves that stored version:
the active or previous one as they are, any other loaded on demand and kept in a small cache.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from app.codecs.v2 import (
    EXTENSIONS,
    PLATFORM,
    ModelMetadata,
    ModelReady,
    ServerLive,
    ServerMetadata,
    ServerReady,
    TensorMetadata,
    datatype_of,
)
from app.http.answers import json_response
from app.http.deps import API_SECURITY, ApiDep, RegistryDep
from app.http.schemas import InferenceErrorResponse
from app.serving.inference import INPUT_NAME, OUTPUT_NAME
from app.serving.model import ServedModel

ERROR_DESCRIPTIONS = {
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
            "description": ERROR_DESCRIPTIONS[status],
            "model": InferenceErrorResponse,
            "content": {"application/json": {"example": {"error": "..."}}},
        }
        for status in statuses
    }


router = APIRouter(prefix="/v2", tags=["open inference protocol (v2)"])


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
    await asyncio.to_thread(model.record, version)  # 404 when there is none
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
        await asyncio.to_thread(model.record, version)  # 404 when there is none
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
