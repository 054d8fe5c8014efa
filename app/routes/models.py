"""Describing the served models."""

from __future__ import annotations

from fastapi import APIRouter

from app.deps import ApiDep, RegistryDep
from app.schemas import ErrorResponse, ModelInfo, ModelList

router = APIRouter(prefix="/v1/models", tags=["models"], dependencies=[ApiDep])


@router.get("", summary="List the served models")
async def list_models(registry: RegistryDep) -> ModelList:
    """Every configured model with its input contract, weights identity and status."""
    return ModelList(models=[ModelInfo.of(model) for model in registry])


@router.get(
    "/{name}",
    summary="Describe one served model",
    responses={404: {"model": ErrorResponse, "description": "No model of that name"}},
)
async def get_model(name: str, registry: RegistryDep) -> ModelInfo:
    """Class, device, input shape and dtype, parameters, weights file and sha256, load report."""
    return ModelInfo.of(registry.get(name))
