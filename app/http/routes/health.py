"""Liveness, readiness and the Prometheus scrape."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from app.http.deps import API_SECURITY, MetricsDep, RegistryDep
from app.http.openapi import REF
from app.http.schemas import ErrorResponse, Liveness, Readiness
from app.http.shutdown import draining
from app.observability.metrics import Metrics

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
    """200 only when every configured model can serve; else 503 naming those that cannot.
    503 as well from SIGTERM on, while the process drains."""
    unavailable = registry.unavailable()
    is_draining = draining.is_set()
    readiness = Readiness(
        ready=not unavailable and not is_draining,
        draining=is_draining,
        models={m.name: "unavailable" if m.name in unavailable else "ready" for m in registry},
        unavailable=unavailable,
    )
    return JSONResponse(readiness.model_dump(), status_code=200 if readiness.ready else 503)


metrics_router = APIRouter(tags=["health"])
_ERROR_BODY = {"$ref": REF.format(model=ErrorResponse.__name__)}


@metrics_router.get(
    "/metrics",
    summary="Prometheus metrics",
    dependencies=[MetricsDep],
    response_class=PlainTextResponse,
    responses={
        200: {"content": {"text/plain": {"schema": {"type": "string"}}}},
        # JSON, not the route's text/plain, which "model" would document
        401: {
            "description": "MODELPORT_API_TOKEN is set (and MODELPORT_METRICS_PUBLIC is not); "
            "no (or a malformed) bearer token",
            "content": {"application/json": {"schema": _ERROR_BODY}},
        },
        403: {
            "description": "MODELPORT_API_TOKEN is set; a wrong token",
            "content": {"application/json": {"schema": _ERROR_BODY}},
        },
    },
    openapi_extra=API_SECURITY,
)
async def get_metrics(request: Request) -> Response:
    """Requests, latency (queue wait and compute apart), batch sizes, queue depth, the active
    version of each model and management outcomes, in the Prometheus text format."""
    metrics: Metrics = request.app.state.metrics
    body, content_type = await asyncio.to_thread(metrics.render)  # reads the workers' files
    return Response(body, media_type=content_type)
