"""Weight management: upload, list, activate, roll back and delete versions."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any

from fastapi import APIRouter, Header, Path, Query, Request
from starlette.responses import Response

from app.codecs.text import decimal
from app.config import NAME_PATTERN
from app.errors import ModelportError, PayloadTooLarge
from app.http.deps import API_SECURITY, AdminDep, ApiDep, RegistryDep, SettingsDep
from app.http.schemas import (
    ErrorResponse,
    HistoryItem,
    HistoryPage,
    UploadResponse,
    VersionInfo,
    VersionList,
)
from app.http.uploads import UploadBody
from app.observability.logs import WRITTEN, request_id
from app.serving.manager import VersionManager
from app.serving.model import ServedModel
from app.state.database import Actor, Pointers
from app.state.records import VERSION_PATTERN, VersionRecord

logger = logging.getLogger("app.audit")

ModelName = Annotated[str, Path(pattern=NAME_PATTERN, description="A served model.")]
VersionId = Annotated[
    str, Path(pattern=VERSION_PATTERN.pattern, description="A version id (12 hex digits).")
]


def _errors(*statuses: int, token: str = "admin") -> dict[int | str, dict[str, Any]]:
    """Error answers in the one body; 401 and 403 refuse the admin token (management) or the
    API token (``token="api"``, only when MODELPORT_API_TOKEN is set)."""
    refusals = {
        "admin": (
            "No (or a malformed) bearer token",
            "A wrong admin token, or management disabled (MODELPORT_ADMIN_TOKEN unset)",
        ),
        "api": (
            "MODELPORT_API_TOKEN is set; no (or a malformed) bearer token",
            "MODELPORT_API_TOKEN is set; a wrong token",
        ),
    }[token]
    return {
        401: {"model": ErrorResponse, "description": refusals[0]},
        403: {"model": ErrorResponse, "description": refusals[1]},
        **{status: {"model": ErrorResponse} for status in (404, *statuses)},
    }


router = APIRouter(prefix="/v1/models/{name}", tags=["weights"])


@contextmanager
def _audited(action: str, model: str, request: Request) -> Iterator[dict[str, str]]:
    """Log and count every management action: action, model, version, sha256, client,
    outcome (a refusal's outcome is its error code; an unexpected failure's is ``failed``)."""
    facts: dict[str, str] = {}
    metrics = request.app.state.metrics
    counter, label = metrics.management, metrics.model_label(model)
    try:
        yield facts
    except ModelportError as exc:
        _audit(logging.WARNING, action, model, request, facts, f"refused:{exc.code}")
        counter.labels(label, action, f"refused:{exc.code}").inc()
        raise
    except Exception:
        _audit(logging.ERROR, action, model, request, facts, "failed:internal_error")
        counter.labels(label, action, "failed:internal_error").inc()
        raise
    outcome = facts.get("outcome", "ok")
    _audit(logging.INFO, action, model, request, facts, outcome)
    counter.labels(label, action, outcome).inc()


def _audit(
    level: int, action: str, model: str, request: Request, facts: dict[str, str], outcome: str
) -> None:
    logger.log(
        level,
        "%s model=%s version=%s sha256=%s client=%s outcome=%s",
        action,
        model,
        facts.get("version", "-"),
        facts.get("sha256", "-"),
        request.client.host if request.client else "-",
        outcome,
        extra=WRITTEN,
    )


@router.put(
    "/weights",
    summary="Upload new weights (validated, stored as a version, activated by default)",
    dependencies=[AdminDep],
    status_code=201,
    response_model=UploadResponse,
    responses={
        200: {"model": UploadResponse, "description": "Identical bytes: the existing version"},
        **_errors(400, 409, 413, 422, 507),
    },
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "properties": {"file": {"type": "string", "format": "binary"}},
                        "required": ["file"],
                    }
                },
            },
        }
    },
)
async def upload_weights(
    name: ModelName,
    request: Request,
    registry: RegistryDep,
    settings: SettingsDep,
    activate: Annotated[bool, Query(description="Switch to the new version once valid.")] = True,
    sha256: Annotated[str | None, Query(description="Expected sha256 of the body.")] = None,
    filename: Annotated[str | None, Query(description="Name to record for the file.")] = None,
    x_content_sha256: Annotated[str | None, Header(description="Expected sha256.")] = None,
) -> Response:
    """The body is the weights file, raw (`curl -T new.pth`) or as the multipart field `file`;
    torch or safetensors, told apart by content. It is streamed to the store with a size cap and
    hashed, checked against an expected sha256 if given, then validated beside the serving
    version (load without code, key/shape/dtype fit, finite values, smoke test, acceptance
    check) before it is stored and, unless `activate=false`, switched to."""
    with _audited("upload", name, request) as facts:
        model = registry.get(name)
        limit = settings.max_upload_bytes
        declared = decimal(request.headers.get("content-length"))
        if declared is not None and declared > limit:
            raise PayloadTooLarge(f"upload of {declared} bytes exceeds the limit of {limit}")
        body = UploadBody(request, filename, limit)
        staged = await model.state.incoming.receive(name, body.chunks(), limit)
        facts["sha256"] = staged.sha256
        expected = [digest for digest in (sha256, x_content_sha256) if digest]
        manager = VersionManager(model, settings.keep_versions)
        outcome = await manager.upload(staged, body.filename, expected, activate, _actor(request))
        facts["version"] = outcome.record.id
        facts["outcome"] = "created" if outcome.created else "existing"
    info = VersionInfo.of(outcome.record, outcome.pointers)
    answer = UploadResponse(**info.model_dump(), model=name, created=outcome.created)
    return Response(
        answer.model_dump_json(), 201 if outcome.created else 200, media_type="application/json"
    )


@router.get(
    "/versions",
    summary="List the versions of a model",
    dependencies=[ApiDep],
    responses=_errors(token="api"),
    openapi_extra=API_SECURITY,
)
async def list_versions(name: ModelName, registry: RegistryDep) -> VersionList:
    """The bundled weights and every stored version, oldest first, with which one serves."""
    model = registry.get(name)
    pointers, records = await asyncio.to_thread(_pointers_and_versions, model)
    active = pointers.active or model.bundled_id()
    return VersionList(
        model=name,
        active=active,
        previous=pointers.previous,
        versions=[VersionInfo.of(record, pointers, active) for record in records],
    )


def _pointers_and_versions(model: ServedModel) -> tuple[Pointers, list[VersionRecord]]:
    return model.state.db.pointers(model.name), model.versions()


@router.post(
    "/versions/{version}/activate",
    summary="Serve a stored version",
    dependencies=[AdminDep],
    responses=_errors(422),
)
async def activate_version(
    name: ModelName,
    version: VersionId,
    request: Request,
    registry: RegistryDep,
    settings: SettingsDep,
) -> VersionInfo:
    """Build and smoke-test the version beside the serving one, record it as active (every
    replica follows), then switch to it."""
    with _audited("activate", name, request) as facts:
        model = registry.get(name)
        facts["version"] = version
        record, pointers = await VersionManager(model, settings.keep_versions).activate(
            version, _actor(request)
        )
        facts["sha256"] = record.sha256
    return VersionInfo.of(record, pointers)


@router.post(
    "/rollback",
    summary="Switch back to the previously active version",
    dependencies=[AdminDep],
    responses=_errors(409),
)
async def rollback_version(
    name: ModelName,
    request: Request,
    registry: RegistryDep,
    settings: SettingsDep,
    to: Annotated[
        str | None,
        Query(
            pattern=VERSION_PATTERN.pattern,
            description="A stored version to go back to (default: the one active before).",
        ),
    ] = None,
) -> VersionInfo:
    """Back to the version that was active before the current one, as the version database
    records it (instant: it is kept loaded), or to the version `to`."""
    with _audited("rollback", name, request) as facts:
        model = registry.get(name)
        manager = VersionManager(model, settings.keep_versions)
        record, pointers = await manager.rollback(_actor(request), to)
        facts |= {"version": record.id, "sha256": record.sha256}
    return VersionInfo.of(record, pointers)


@router.delete(
    "/versions/{version}",
    summary="Delete a version that is not active",
    dependencies=[AdminDep],
    status_code=204,
    responses=_errors(409),
)
async def delete_version(
    name: ModelName,
    version: VersionId,
    request: Request,
    registry: RegistryDep,
    settings: SettingsDep,
) -> Response:
    """Remove a stored version's record and bytes; the active and the previous version (as
    the version database records them, whichever replica is asked) and the bundled weights
    stay."""
    with _audited("delete", name, request) as facts:
        model = registry.get(name)
        facts["version"] = version
        await VersionManager(model, settings.keep_versions).delete(version, _actor(request))
    return Response(status_code=204)


@router.get(
    "/history",
    summary="The recorded management actions, newest first",
    dependencies=[AdminDep],
    responses=_errors(),
)
async def get_history(
    name: ModelName,
    registry: RegistryDep,
    limit: Annotated[int, Query(ge=1, le=500, description="Entries per page.")] = 50,
    before: Annotated[
        int | None, Query(ge=1, description="Only entries older than this seq (the next page).")
    ] = None,
) -> HistoryPage:
    """Uploads, activations, rollbacks, deletions, retention and imports as the version
    database recorded them: time, action, from and to version, request id, client address.
    `next_before` asks for the next (older) page."""
    model = registry.get(name)
    entries = await asyncio.to_thread(model.state.db.history, name, limit, before)
    next_before = entries[-1].seq if len(entries) == limit else None
    return HistoryPage(
        model=name,
        entries=[HistoryItem.model_validate(e, from_attributes=True) for e in entries],
        next_before=next_before,
    )


def _actor(request: Request) -> Actor:
    """Who asked: the request id and the client address, for the history."""
    return Actor(request_id.get(), request.client.host if request.client else None)
