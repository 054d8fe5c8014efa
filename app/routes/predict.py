"""Prediction: ``POST /v1/models/{name}/predict`` and ``POST /predict``.

The body is read with a byte cap and decoded with orjson + numpy rather than pydantic, which
costs per element on large nested lists; the pydantic models only document the endpoints.
"""

from __future__ import annotations

import json
from typing import Any

import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response

from app.deps import ApiDep, RegistryDep, SettingsDep
from app.errors import BadRequest, InvalidInput, PayloadTooLarge
from app.inputs import to_batch
from app.schemas import ErrorResponse, ModelPredictRequest, PredictRequest, PredictResponse
from app.served import ServedModel

VERSION_HEADER = "X-Model-Version"

_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "Malformed JSON"},
    401: {"model": ErrorResponse, "description": "MODELPORT_API_TOKEN is set; no bearer token"},
    403: {"model": ErrorResponse, "description": "Wrong bearer token"},
    404: {"model": ErrorResponse, "description": "No model of that name"},
    413: {"model": ErrorResponse, "description": "Body over the configured size limit"},
    422: {"model": ErrorResponse, "description": "Inputs do not fit the model"},
    503: {"model": ErrorResponse, "description": "The model cannot serve"},
}
_OK: dict[int | str, dict[str, Any]] = {
    200: {
        "model": PredictResponse,
        "headers": {
            VERSION_HEADER: {
                "description": "Version that served the request",
                "schema": {"type": "string"},
            }
        },
    }
}


def predict_router(examples: dict[str, Any]) -> APIRouter:
    """The predict routes, documented with one example body per served model."""
    router = APIRouter(tags=["predict"], responses={**_OK, **_ERRORS}, dependencies=[ApiDep])

    @router.post(
        "/v1/models/{name}/predict",
        summary="Predict with one model",
        openapi_extra=_request_body(
            ModelPredictRequest, {n: {"value": {"inputs": [x]}} for n, x in examples.items()}
        ),
    )
    async def predict(
        name: str, request: Request, registry: RegistryDep, settings: SettingsDep
    ) -> Response:
        """Run the samples of ``inputs`` through the model; outputs come back in input order."""
        body = await _read_json(request, settings.max_body_bytes, {"inputs"})
        return await _run(registry.get(name), body["inputs"], settings.max_samples_per_request)

    @router.post(
        "/predict",
        summary="Predict with the named, default or only model",
        openapi_extra=_request_body(
            PredictRequest,
            {n: {"value": {"model": n, "inputs": [x]}} for n, x in examples.items()},
        ),
    )
    async def predict_default(
        request: Request, registry: RegistryDep, settings: SettingsDep
    ) -> Response:
        """Like the per-model route; ``model`` may be left out when one model is served or a
        default model is configured."""
        body = await _read_json(request, settings.max_body_bytes, {"inputs", "model"})
        model = body.get("model")
        if model is not None and not isinstance(model, str):
            raise InvalidInput(f"'model' must be a string; received {type(model).__name__}")
        served = registry.resolve(model)
        return await _run(served, body["inputs"], settings.max_samples_per_request)

    return router


async def _run(model: ServedModel, inputs: Any, max_samples: int) -> Response:
    batch = to_batch(
        inputs,
        model.sample_shape,
        model.spec.input_dtype,
        max_samples=max_samples,
        allow_non_finite=model.spec.allow_non_finite_input,
    )
    runtime, outputs = await model.predict(batch)
    body = {"model": model.name, "version": runtime.version, "outputs": outputs}
    return Response(
        orjson.dumps(body),
        media_type="application/json",
        headers={VERSION_HEADER: runtime.version},
    )


async def _read_json(request: Request, limit: int, fields: set[str]) -> dict[str, Any]:
    """The body as a JSON object holding ``inputs`` and no keys outside ``fields``."""
    body = await _read_capped(request, limit)
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        parsed = _parse_with_non_finite(body, exc)
    if not isinstance(parsed, dict):
        raise BadRequest(f"the body must be a JSON object; received {type(parsed).__name__}")
    if "inputs" not in parsed:
        raise InvalidInput("the body has no 'inputs': send {\"inputs\": [sample, ...]}")
    unknown = sorted(set(parsed) - fields)
    if unknown:
        raise InvalidInput(f"unknown field(s) {unknown}; expected {sorted(fields)}")
    return parsed


def _parse_with_non_finite(body: bytes, error: orjson.JSONDecodeError) -> Any:
    """Strict JSON failed; Python's json also reads NaN/Infinity (as json.dumps writes them),
    so such inputs reach the finite check and get a precise answer instead of 'malformed'."""
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise BadRequest(f"malformed JSON: {error}") from None


async def _read_capped(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"body of {declared} bytes exceeds the limit of {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _request_body(model: type[ModelPredictRequest], examples: dict[str, Any]) -> dict[str, Any]:
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": model.model_json_schema(), "examples": examples}
            },
        }
    }
