"""Describing the served models."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter

from app.errors import StateUnavailable
from app.http.deps import API_SECURITY, ApiDep, RegistryDep
from app.http.schemas import ErrorResponse, ModelInfo, ModelList
from app.serving.model import ServedModel

router = APIRouter(prefix="/v1/models", tags=["models"], dependencies=[ApiDep])
_TOKEN_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {
        "model": ErrorResponse,
        "description": "MODELPORT_API_TOKEN is set; no (or a malformed) bearer token",
    },
    403: {"model": ErrorResponse, "description": "MODELPORT_API_TOKEN is set; a wrong token"},
}


@router.get(
    "",
    summary="List the served models",
    responses=_TOKEN_ERRORS,
    openapi_extra=API_SECURITY,
)
async def list_models(registry: RegistryDep) -> ModelList:
    """Every configured model with its input contract, weights identity and status."""
    return ModelList(models=[await _describe(model) for model in registry])


@router.get(
    "/{name}",
    summary="Describe one served model",
    responses={
        **_TOKEN_ERRORS,
        404: {"model": ErrorResponse, "description": "No model of that name"},
    },
    openapi_extra=API_SECURITY,
)
async def get_model(name: str, registry: RegistryDep) -> ModelInfo:
    """Class, device, input shape and dtype, parameters, weights file and sha256, load report,
    and the version the database records as active beside the one this replica serves."""
    return await _describe(registry.get(name))


async def _describe(model: ServedModel) -> ModelInfo:
    try:
        pointers = await asyncio.to_thread(model.state.db.pointers, model.name)
    except StateUnavailable:
        pointers = None  # the replica's own view still describes it
    return ModelInfo.of(model, pointers)
