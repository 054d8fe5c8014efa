"""The app factory: ``create_app(settings)``; the lifespan loads the models and stops them."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from pydantic import ValidationError

from app.config import Settings, load_service_config, settings_error_line
from app.errors import ConfigError, install_error_handlers
from app.registry import ModelRegistry
from app.routes import admin, health, models
from app.routes.predict import predict_router

logger = logging.getLogger(__name__)

DESCRIPTION = """Serve PyTorch models from a registered `nn.Module` class plus a `state_dict` file.

Every error answers `{"error": "...", "code": "..."}` with a 4xx status saying what was expected
and what was received."""


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    registry: ModelRegistry = app.state.registry
    await asyncio.to_thread(registry.load_all)
    registry.start()
    try:
        yield
    finally:
        registry.close()


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the service. Checks the config at once (ConfigError); weights load in the lifespan.

    Without ``settings`` (as ``uvicorn --factory app.main:create_app`` calls it) the settings
    come from the environment and a bad config exits with one line on stderr.
    """
    if settings is None:
        return _create_app_or_exit()
    registry = ModelRegistry.from_settings(settings, load_service_config(settings.config))
    app = FastAPI(
        title="modelport",
        version="0.1.0",
        description=DESCRIPTION,
        lifespan=_lifespan,
    )
    app.state.settings = settings
    app.state.registry = registry
    install_error_handlers(app)
    app.include_router(health.router)
    app.include_router(models.router)
    app.include_router(admin.router)
    app.include_router(predict_router({m.name: m.spec.example(m.kwargs) for m in registry}))
    return app


def load_settings() -> Settings:
    """Settings from the environment, raising ConfigError with one line on a bad value."""
    try:
        return Settings()
    except ValidationError as exc:
        raise ConfigError(settings_error_line(exc)) from None


def configure_logging(level: str) -> None:
    """Plain one-line log records for the service's own loggers."""
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


def _create_app_or_exit() -> FastAPI:
    try:
        settings = load_settings()
        configure_logging(settings.log_level)
        return create_app(settings)
    except ConfigError as exc:
        print(f"modelport: config error: {exc.message}", file=sys.stderr)
        raise SystemExit(2) from None
