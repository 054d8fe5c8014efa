"""Annotated dependency aliases for routes, with the bearer-token checks as dependencies."""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from app.config import Settings
from app.errors import ModelportError
from app.http.auth import authorize_admin, authorize_api
from app.serving.registry import ModelRegistry

audit = logging.getLogger("app.audit")
BEARER_SCHEME = "HTTPBearer"
"""The OpenAPI name of the one security scheme."""
_bearer = HTTPBearer(
    scheme_name=BEARER_SCHEME,
    auto_error=False,
    description="`Authorization: Bearer <token>`: MODELPORT_ADMIN_TOKEN for management, "
    "MODELPORT_API_TOKEN (when set) for prediction, metadata and /metrics.",
)
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


def get_registry(request: Request) -> ModelRegistry:
    """The app's model registry."""
    registry: ModelRegistry = request.app.state.registry
    return registry


def get_settings(request: Request) -> Settings:
    """The app's settings."""
    settings: Settings = request.app.state.settings
    return settings


RegistryDep = Annotated[ModelRegistry, Depends(get_registry)]
SettingsDep = Annotated[Settings, Depends(get_settings)]


def require_admin(request: Request, settings: SettingsDep, _: Credentials) -> None:
    """Management needs the admin token; with none configured it is disabled. Refusals are
    audited like every other management outcome."""
    try:
        authorize_admin(request.headers.get("authorization"), settings)
    except ModelportError as exc:
        audit.warning(
            "%s %s client=%s outcome=refused:%s",
            request.method,
            request.url.path,
            request.client.host if request.client else "-",
            exc.code,
        )
        # the route's name says the action: upload_weights, activate_version, ...
        action = getattr(request.scope.get("route"), "name", "-").split("_")[0]
        counter = request.app.state.metrics.management
        model = request.app.state.metrics.model_label(request.path_params.get("name", ""))
        counter.labels(model, action, f"refused:{exc.code}").inc()
        raise


def require_api(request: Request, settings: SettingsDep) -> None:
    """Prediction and metadata are open unless MODELPORT_API_TOKEN is set. No HTTPBearer
    dependency here: FastAPI would document the token as always required (see API_SECURITY)."""
    authorize_api(request.headers.get("authorization"), settings)


def require_metrics(request: Request, settings: SettingsDep) -> None:
    """The scrape needs the API token when one is set, unless MODELPORT_METRICS_PUBLIC (no
    HTTPBearer dependency, as in require_api: the route's openapi_extra says it is optional)."""
    if not settings.metrics_public:
        authorize_api(request.headers.get("authorization"), settings)


AdminDep = Depends(require_admin)
ApiDep = Depends(require_api)
MetricsDep = Depends(require_metrics)

API_SECURITY: dict[str, Any] = {"security": [{}, {BEARER_SCHEME: []}]}
"""``openapi_extra`` of the routes ApiDep guards: open by default, the bearer token once
MODELPORT_API_TOKEN is set (management's required token comes from its HTTPBearer dependency)."""
