"""The app factory: ``create_app(settings)``; the lifespan loads the models and stops them."""

from __future__ import annotations

import asyncio
import gc
import logging
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from starlette.types import Receive, Scope, Send

from app.config import Settings, load_service_config, load_settings
from app.errors import ConfigError
from app.http.answers import install_error_handlers
from app.http.endpoint import InferenceEndpoint
from app.http.inference_docs import add_inference_paths
from app.http.native import NativePredict
from app.http.observer import RequestObserver
from app.http.openapi import describe_shared_answers
from app.http.routes import admin, health, models, v2
from app.http.shutdown import ShutdownGate
from app.http.v2_infer import V2Infer
from app.observability.logs import AccessLog, configure_logging
from app.observability.metrics import Metrics
from app.observability.requests import RequestRecorder
from app.serving.inference import InferenceService
from app.serving.registry import ModelRegistry

logger = logging.getLogger(__name__)

Door = Callable[[FastAPI], AbstractAsyncContextManager[None]]
"""Another front door the lifespan opens once the models serve and closes before they stop
(the launcher adds the gRPC one, ``app.grpc.server``); it finds what it serves on ``app.state``."""

DESCRIPTION = """Serve PyTorch models from a registered `nn.Module` class plus a `state_dict` file.

Every error answers `{"error": "...", "code": "..."}` with a 4xx status saying what was expected
and what was received."""


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    registry: ModelRegistry = app.state.registry
    settings: Settings = app.state.settings
    await asyncio.to_thread(registry.load_all)
    registry.start()
    # What startup made (modules, models, tensors) lives as long as the process: out of the
    # collector's reach, its full collections stop pausing the event loop for tens of ms.
    gc.freeze()
    metrics: Metrics = app.state.metrics
    background = [asyncio.create_task(metrics.flush_periodically())]
    if settings.sync_interval_s > 0:
        count = metrics.sync_failures
        follower = registry.follow(settings.sync_interval_s, lambda m: count.labels(m).inc())
        background.append(asyncio.create_task(follower))
    access_log: AccessLog | None = app.state.access_log
    if access_log is not None:
        background.append(asyncio.create_task(access_log.flush_periodically()))
    doors = AsyncExitStack()
    try:
        for open_door in app.state.doors:  # the other front doors (gRPC), once models serve
            await doors.enter_async_context(open_door(app))
        yield
    finally:
        await doors.aclose()  # each drains before the models stop
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        await asyncio.to_thread(registry.close)  # waits for each batch in progress


class ModelportAPI(FastAPI):
    """FastAPI, with the lean inference path, the request observer and the shutdown gate in front
    of Starlette's own middleware (error pages, body limits, telemetry hooks), which would
    otherwise cost every prediction as much as its own work on a small model."""

    front: InferenceEndpoint | None = None
    """The lean inference path, in front of everything else once :meth:`put_in_front` ran."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.front is None:
            await super().__call__(scope, receive, send)
        else:
            await self.front(scope, receive, send)

    def put_in_front(
        self, registry: ModelRegistry, settings: Settings, recorder: RequestRecorder
    ) -> None:
        """Route every request through the front layers: the lean inference path, else the
        observer and the shutdown gate in front of FastAPI."""
        framework = RequestObserver(ShutdownGate(super().__call__), recorder)
        service = InferenceService(registry, settings.max_samples_per_request)
        self.state.inference = service  # for the other front doors
        doors = (NativePredict(), V2Infer())
        self.front = InferenceEndpoint(framework, service, settings, doors, recorder)


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the service. Checks the config at once (ConfigError); weights load in the lifespan.

    Without ``settings`` (as ``uvicorn --factory app.http.app:create_app`` calls it) the settings
    come from the environment and a bad config exits with one line on stderr.
    """
    if settings is None:
        return _create_app_or_exit()
    configs = load_service_config(settings.config)
    metrics = Metrics(lambda: registry.active_versions(), [config.name for config in configs])
    registry = ModelRegistry.from_settings(settings, configs, metrics)
    app = ModelportAPI(
        title="modelport",
        version="0.1.0",
        description=DESCRIPTION,
        lifespan=_lifespan,
        # app.observability.metrics and app.http.observer observe every request; OpenTelemetry
        # hooks would cost each request a provider lookup for nothing.
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    app.state.settings = settings
    app.state.registry = registry
    app.state.metrics = metrics
    app.state.doors = list[Door]()
    install_error_handlers(app)
    app.include_router(health.router)
    app.include_router(health.metrics_router)
    app.include_router(models.router)
    app.include_router(admin.router)
    app.include_router(v2.router)
    # access lines are INFO lines: a level above leaves them out, as it does uvicorn's
    info = logging.getLevelName(settings.log_level.upper()) <= logging.INFO
    app.state.access_log = AccessLog(settings.log_format) if settings.access_log and info else None
    app.state.recorder = RequestRecorder(
        metrics,
        app.state.access_log,
        count=settings.request_metrics,
        make_ids=settings.request_ids,
    )
    app.put_in_front(registry, settings, app.state.recorder)
    _document(app, {m.name: m.spec.example(m.kwargs) for m in registry})
    return app


def _document(app: FastAPI, examples: dict[str, Any]) -> None:
    """Generate the OpenAPI document: the routes', the inference endpoints the lean path
    serves, and the answers every route shares."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title,
                version=app.version,
                description=app.description,
                routes=app.routes,
            )
            add_inference_paths(schema, examples)
            describe_shared_answers(schema)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _create_app_or_exit() -> FastAPI:
    try:
        settings = load_settings()
        configure_logging(settings.log_level, settings.log_format)
        return create_app(settings)
    except ConfigError as exc:
        print(f"modelport: config error: {exc.message}", file=sys.stderr)
        raise SystemExit(2) from None
