"""Finishing the OpenAPI document with what the framework cannot see from the routes: schemas
used only by hand-written bodies, the one error body of validation errors, and the draining 503
answered in front of every route."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from app.http.observer import UNOBSERVED_PATHS
from app.http.schemas import ErrorResponse

REF = "#/components/schemas/{model}"
"""Where every ``$ref`` of the document points: OpenAPI resolves refs from the document's root,
so pydantic's default ``#/$defs/...`` would not resolve once a schema is placed in an operation."""
_FRAMEWORK_ONLY = ("HTTPValidationError", "ValidationError")
_DRAINING = {
    "description": "The server is shutting down (Retry-After); retry on another replica",
    "content": {"application/json": {"schema": {"$ref": REF.format(model="ErrorResponse")}}},
}


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
    """Answers every route shares whatever it declares: a request that does not validate gets
    the one error body (:func:`app.errors.install_error_handlers`), not the framework's
    ``detail`` list; and from SIGTERM on, every endpoint but probes and scrapes answers 503
    (:class:`app.http.shutdown.ShutdownGate`)."""
    add_components(document, ErrorResponse)
    framework_error = {"$ref": REF.format(model="HTTPValidationError")}
    for path, operations in document["paths"].items():
        for operation in operations.values():
            responses = operation["responses"]
            invalid = responses.get("422", {}).get("content", {}).get("application/json", {})
            if invalid.get("schema") == framework_error:
                responses["422"] = {
                    "description": "Path, query or header parameters that do not validate",
                    "content": {
                        "application/json": {"schema": {"$ref": REF.format(model="ErrorResponse")}}
                    },
                }
            if not path.startswith(UNOBSERVED_PATHS):
                responses.setdefault("503", _DRAINING)
    for name in _FRAMEWORK_ONLY:
        document["components"]["schemas"].pop(name, None)
