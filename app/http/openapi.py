"""Finishing the OpenAPI document with what the framework cannot see from the routes: schemas
used only by hand-written bodies, the one error body of validation errors, and the draining 503
answered in front of every route."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from app.http import PROBE_PATHS
from app.http.schemas import ErrorResponse, InferenceErrorResponse

REF = "#/components/schemas/{model}"
"""Where every ``$ref`` of the document points: OpenAPI resolves refs from the document's root,
so pydantic's default ``#/$defs/...`` would not resolve once a schema is placed in an operation."""
_FRAMEWORK_ONLY = ("HTTPValidationError", "ValidationError")
_DRAINING = "The server is shutting down (Retry-After); retry on another replica"
_INVALID = "Path, query or header parameters that do not validate"


def component_schemas(*models: type[BaseModel]) -> dict[str, Any]:
    """The JSON schemas of ``models`` and of the models they contain, by name, for
    ``components.schemas``."""
    found: dict[str, Any] = {}
    for model in models:
        schema = model.model_json_schema(ref_template=REF)
        found.update(schema.pop("$defs", {}))
        found[model.__name__] = schema
    return found


def add_components(document: dict[str, Any], *models: type[BaseModel]) -> None:
    """Add the schemas of ``models`` (and those they contain) to the document's components."""
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    schemas.update(component_schemas(*models))


def describe_shared_answers(document: dict[str, Any]) -> None:
    """Answers every route shares whatever it declares, in its protocol's error body
    (:func:`app.http.answers.error_answer`): a request that does not validate gets the one error
    body, not the framework's ``detail`` list (under ``/v2`` its path parameters are plain
    strings, which always validate); and from SIGTERM on, every endpoint but probes and scrapes
    answers 503 (:class:`app.http.shutdown.ShutdownGate`)."""
    add_components(document, ErrorResponse, InferenceErrorResponse)
    framework_error = {"$ref": REF.format(model="HTTPValidationError")}
    for path, operations in document["paths"].items():
        v2 = path.startswith("/v2")
        error = _error_content("InferenceErrorResponse" if v2 else "ErrorResponse")
        for operation in operations.values():
            responses = operation["responses"]
            invalid = responses.get("422", {}).get("content", {}).get("application/json", {})
            if invalid.get("schema") == framework_error:
                del responses["422"]
                if not v2:
                    responses["422"] = {"description": _INVALID, "content": error}
            if not path.startswith(PROBE_PATHS):
                responses.setdefault("503", {"description": _DRAINING, "content": error})
    for name in _FRAMEWORK_ONLY:
        document["components"]["schemas"].pop(name, None)


def _error_content(schema: str) -> dict[str, Any]:
    return {"application/json": {"schema": {"$ref": REF.format(model=schema)}}}
