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
    RepositoryEntry,
    RepositoryIndexRequest,
    ServerLive,
    ServerMetadata,
    ServerReady,
    tensor_metadata,
)
from app.http.answers import json_response
from app.http.deps import API_SECURITY, ApiDep, RegistryDep
from app.http.schemas import InferenceErrorResponse
from app.observability.metrics import Metrics
from app.observability.statistics import model_statistics
from app.serving.describe import configuration, load, repository_index, serving, unload
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
    "/models/stats",
    summary="Inference statistics of every model",
    dependencies=[ApiDep],
    responses=_errors(401, 403),
    openapi_extra=API_SECURITY,
)
async def get_statistics(request: Request, registry: RegistryDep) -> dict[str, Any]:
    """Triton's inference statistics of every version that served here, and each model's
    active version. (Declared before the model metadata, which would take ``stats`` for a
    model name.)"""
    return _statistics(request, [serving(model) for model in registry], only_given=False)


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
    """The versions that can serve, and the tensors (:func:`_tensors`)."""
    if version is not None:
        await asyncio.to_thread(model.record, version)  # 404 when there is none
    return ModelMetadata(
        name=model.name,
        versions=[record.id for record in await asyncio.to_thread(model.versions)],
        platform=PLATFORM,
        inputs=tensor_metadata(model.inputs),
        outputs=tensor_metadata(model.outputs),
    )


# --- Triton's extensions: model configuration, repository index, statistics ------------------


@router.get(
    "/models/{name}/config",
    summary="Model configuration",
    dependencies=[ApiDep],
    responses=_errors(401, 403, 404, 503),
    openapi_extra=API_SECURITY,
)
async def get_model_config(name: str, registry: RegistryDep) -> dict[str, Any]:
    """The model's tensors and dynamic batching in Triton's model configuration shape."""
    return configuration(registry.get(name))


@router.get(
    "/models/{name}/versions/{version}/config",
    summary="Model version configuration",
    dependencies=[ApiDep],
    responses=_errors(401, 403, 404, 503),
    openapi_extra=API_SECURITY,
)
async def get_model_version_config(
    name: str, version: str, registry: RegistryDep
) -> dict[str, Any]:
    """As the model's configuration (the same for every version), for a stored version."""
    model = registry.get(name)
    await asyncio.to_thread(model.record, version)  # 404 when there is none
    return configuration(model)


@router.post(
    "/repository/index",
    summary="Model repository index",
    dependencies=[ApiDep],
    responses=_errors(400, 401, 403),
    openapi_extra=API_SECURITY,
)
async def post_repository_index(
    registry: RegistryDep, body: RepositoryIndexRequest | None = None
) -> list[RepositoryEntry]:
    """Every model with the version it serves, READY or UNAVAILABLE with the reason; with
    ``{"ready": true}`` only those that can serve. The body may be empty."""
    return repository_index(registry, ready_only=bool(body and body.ready))


@router.post(
    "/repository/models/{name}/load",
    summary="Load a model",
    dependencies=[ApiDep],
    responses=_errors(401, 403, 404, 503),
    openapi_extra=API_SECURITY,
)
async def post_model_load(name: str, registry: RegistryDep) -> dict[str, Any]:
    """The models are loaded from the configuration at startup: 200 (``{}``) when this one
    serves, 503 saying why it cannot. Any body (Triton's load parameters) is ignored."""
    load(registry, name)
    return {}


@router.post(
    "/repository/models/{name}/unload",
    summary="Unload a model (refused)",
    dependencies=[ApiDep],
    responses=_errors(400, 401, 403, 404),
    openapi_extra=API_SECURITY,
)
async def post_model_unload(name: str, registry: RegistryDep) -> dict[str, Any]:
    """Refused with 400: every model the configuration names serves while the process runs."""
    unload(registry, name)


@router.get(
    "/models/{name}/stats",
    summary="Inference statistics of a model",
    dependencies=[ApiDep],
    responses=_errors(401, 403, 404),
    openapi_extra=API_SECURITY,
)
async def get_model_statistics(
    name: str, request: Request, registry: RegistryDep
) -> dict[str, Any]:
    """As every model's statistics, for one model."""
    return _statistics(request, [serving(registry.get(name))], only_given=False)


@router.get(
    "/models/{name}/versions/{version}/stats",
    summary="Inference statistics of a model version",
    dependencies=[ApiDep],
    responses=_errors(401, 403, 404),
    openapi_extra=API_SECURITY,
)
async def get_model_version_statistics(
    name: str, version: str, request: Request, registry: RegistryDep
) -> dict[str, Any]:
    """As every model's statistics, for one stored version."""
    model = registry.get(name)
    await asyncio.to_thread(model.record, version)  # 404 when there is none
    return _statistics(request, [(model.name, version)], only_given=True)


def _statistics(
    request: Request, versions: list[tuple[str, str]], *, only_given: bool
) -> dict[str, Any]:
    metrics: Metrics = request.app.state.metrics
    return {"model_stats": model_statistics(metrics, versions, only_given=only_given)}
