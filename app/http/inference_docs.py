"""The OpenAPI description of the inference endpoints, which :mod:`app.http.endpoint` serves.

They are not framework routes (routing and dependency injection cost more than the whole
request on a small model), so their path items are written here from the same pydantic models.
"""

from __future__ import annotations

from typing import Any

from app.codecs.binary import DTYPE_HEADER, NPY, NPZ, RAW, SHAPE_HEADER
from app.codecs.dtypes import BY_NAME
from app.codecs.v2 import HEADER_LENGTH, InferenceRequest, InferenceResponse
from app.http import VERSION_HEADER
from app.http.deps import API_SECURITY
from app.http.openapi import REF, add_components
from app.http.routes.v2 import ERROR_DESCRIPTIONS
from app.http.schemas import (
    ErrorResponse,
    InferenceErrorResponse,
    ModelPredictRequest,
    PredictRequest,
    PredictResponse,
)

_ERRORS = {
    "400": "Malformed JSON, or a raw body without its shape/dtype headers",
    "401": "MODELPORT_API_TOKEN is set and no (or a malformed) bearer token was sent",
    "403": "MODELPORT_API_TOKEN is set and the bearer token is neither it nor the admin token",
    "404": "No model of that name",
    "413": "Body over MODELPORT_MAX_BODY_BYTES",
    "406": "One raw tensor or .npy asked of a model of several outputs (ask for .npz or JSON)",
    "415": "A Content-Type other than JSON, raw tensor bytes, .npy or .npz",
    "422": "Inputs do not fit the model (shape, dtype, values, count)",
    "503": "The model cannot serve, or its queue is full (Retry-After)",
    "504": "Not answered within MODELPORT_REQUEST_TIMEOUT_S",
}
_TENSOR_HEADERS = {
    SHAPE_HEADER: {"description": "Comma-separated shape, e.g. 2,10", "schema": {"type": "string"}},
    DTYPE_HEADER: {
        "description": f"One of {', '.join(BY_NAME)}",
        "schema": {"type": "string", "enum": list(BY_NAME)},
    },
}
_BINARY = {"schema": {"type": "string", "format": "binary"}}


def add_inference_paths(schema: dict[str, Any], examples: dict[str, Any]) -> None:
    """Add the inference endpoints to an OpenAPI document, with one example body per served
    model for the native ones."""
    add_components(schema, ModelPredictRequest, PredictRequest, PredictResponse, ErrorResponse)
    per_model = {n: {"value": {"inputs": _batch_of(x)}} for n, x in examples.items()}
    named = {n: {"value": {"model": n, "inputs": _batch_of(x)}} for n, x in examples.items()}
    schema["paths"]["/v1/models/{name}/predict"] = {
        "post": _operation(
            "predict",
            "Predict with one model",
            "ModelPredictRequest",
            per_model,
            [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}],
        )
    }
    schema["paths"]["/predict"] = {
        "post": _operation(
            "predict_default",
            "Predict with the named, default or only model",
            "PredictRequest",
            named,
            [
                {
                    "name": "model",
                    "in": "query",
                    "required": False,
                    "description": "The model, for raw or .npy bodies (JSON names it in 'model')",
                    "schema": {"type": "string"},
                }
            ],
        )
    }
    _add_v2_infer(schema)


def _batch_of(example: Any) -> Any:
    """A request's ``inputs`` holding one example sample: a list of it, or (for a model whose
    inputs are named) a list of each input's sample by name."""
    if isinstance(example, dict):
        return {name: [sample] for name, sample in example.items()}
    return [example]


def _operation(
    operation_id: str,
    summary: str,
    request: str,
    examples: dict[str, Any],
    parameters: list[dict[str, Any]],
) -> dict[str, Any]:
    return {
        "tags": ["predict"],
        "summary": summary,
        "operationId": operation_id,
        "description": (
            "Run the samples of `inputs` through the model (gathered with concurrent requests "
            "into one forward pass); outputs come back in input order with the version that "
            f"computed them (body and `{VERSION_HEADER}`). Large tensors can be sent as raw "
            f"little-endian bytes (`{RAW}` with `{SHAPE_HEADER}` and `{DTYPE_HEADER}`) or as "
            f"`{NPY}`; `Accept: {RAW}` or `{NPY}` answers the raw output tensor in that form. "
            "A model of several inputs takes `inputs` as an object of sample lists by input "
            f"name, or one `{NPZ}` of its inputs by name; `Accept: {NPZ}` answers every output "
            "by name."
        ),
        "parameters": parameters,
        **API_SECURITY,
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": {"$ref": REF.format(model=request)},
                    "examples": examples,
                },
                RAW: _BINARY,
                NPY: _BINARY,
                NPZ: _BINARY,
            },
        },
        "responses": {
            "200": {
                "description": "Outputs in input order",
                "headers": {
                    VERSION_HEADER: {
                        "description": "The version that served the request",
                        "schema": {"type": "string"},
                    },
                    **_TENSOR_HEADERS,
                },
                "content": {
                    "application/json": {"schema": {"$ref": REF.format(model="PredictResponse")}},
                    RAW: _BINARY,
                    NPY: _BINARY,
                    NPZ: _BINARY,
                },
            },
            **{
                status: {
                    "description": description,
                    "content": {
                        "application/json": {"schema": {"$ref": REF.format(model="ErrorResponse")}}
                    },
                }
                for status, description in _ERRORS.items()
            },
        },
    }


def _add_v2_infer(schema: dict[str, Any]) -> None:
    """``POST /v2/models/{name}[/versions/{version}]/infer``."""
    add_components(schema, InferenceRequest, InferenceResponse, InferenceErrorResponse)
    name = _path_parameter("name")
    schema["paths"]["/v2/models/{name}/infer"] = {
        "post": _v2_operation("infer", "Inference", [name])
    }
    schema["paths"]["/v2/models/{name}/versions/{version}/infer"] = {
        "post": _v2_operation(
            "infer_version", "Inference with one version", [name, _path_parameter("version")]
        )
    }


def _path_parameter(name: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}


def _v2_operation(operation_id: str, summary: str, parameters: list[Any]) -> dict[str, Any]:
    return {
        "tags": ["open inference protocol (v2)"],
        "summary": summary,
        "operationId": operation_id,
        "description": (
            "JSON or binary tensors in (with or without a Content-Type, optionally gzip or "
            "deflate), the raw forward output out, as JSON or binary per `binary_data` / "
            "`binary_data_output`. A version in the path serves that stored version (loaded on "
            "demand)."
        ),
        "parameters": parameters,
        **API_SECURITY,
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": {"$ref": REF.format(model="InferenceRequest")}},
                RAW: {
                    "schema": {
                        "type": "string",
                        "format": "binary",
                        "description": f"The JSON header ({HEADER_LENGTH} bytes), then tensors.",
                    }
                },
            },
        },
        "responses": {
            "200": {
                "description": "JSON, or JSON header + binary outputs",
                "content": {
                    "application/json": {"schema": {"$ref": REF.format(model="InferenceResponse")}},
                    RAW: _BINARY,
                },
            },
            **{
                str(status): {
                    "description": description,
                    "content": {
                        "application/json": {
                            "schema": {"$ref": REF.format(model="InferenceErrorResponse")}
                        }
                    },
                }
                for status, description in ERROR_DESCRIPTIONS.items()
            },
        },
    }
