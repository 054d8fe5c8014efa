"""Liveness and readiness."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from app.deps import RegistryDep
from app.schemas import Liveness, Readiness

router = APIRouter(prefix="/health", tags=["health"])


@router.get("/live", summary="The process is up")
async def get_liveness() -> Liveness:
    """200 while the process runs."""
    return Liveness()


@router.get(
    "/ready",
    summary="Every configured model can serve",
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "Some model cannot serve"}},
)
async def get_readiness(registry: RegistryDep) -> JSONResponse:
    """200 only when every configured model can serve; else 503 naming those that cannot."""
    unavailable = registry.unavailable()
    readiness = Readiness(
        ready=not unavailable,
        models={m.name: "unavailable" if m.name in unavailable else "ready" for m in registry},
        unavailable=unavailable,
    )
    return JSONResponse(readiness.model_dump(), status_code=503 if unavailable else 200)
