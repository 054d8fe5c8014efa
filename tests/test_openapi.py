"""The OpenAPI document: valid OpenAPI 3.1, every ``$ref`` resolving, security and error answers
as the server behaves, and a bounded schemathesis run against a real server process."""

from __future__ import annotations

import contextlib
import json
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from openapi_spec_validator import OpenAPIV31SpecValidator
from schemathesis import Case, GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.errors import FailureGroup
from schemathesis.schemas import APIOperation
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from app.http.app import create_app
from tests.helpers import DIGITS, LINEAR, make_settings, run_server, serve_in_process, write_config

API_TOKEN = "a" * 32
ADMIN_TOKEN = "b" * 32
OPEN = None
"""No security requirement: the endpoint never asks for a token."""
API = [{}, {"HTTPBearer": []}]
"""Open by default; the bearer token once MODELPORT_API_TOKEN is set."""
ADMIN = [{"HTTPBearer": []}]
"""The admin token, always."""
SECURITY = {
    ("get", "/health/live"): OPEN,
    ("get", "/health/ready"): OPEN,
    ("get", "/v2/health/live"): OPEN,
    ("get", "/v2/health/ready"): OPEN,
    ("get", "/v2/models/{name}/ready"): OPEN,
    ("get", "/v2/models/{name}/versions/{version}/ready"): OPEN,
    ("get", "/v2"): OPEN,
    ("get", "/metrics"): API,
    ("post", "/predict"): API,
    ("post", "/v1/models/{name}/predict"): API,
    ("get", "/v1/models"): API,
    ("get", "/v1/models/{name}"): API,
    ("get", "/v1/models/{name}/versions"): API,
    ("get", "/v2/models/{name}"): API,
    ("get", "/v2/models/{name}/versions/{version}"): API,
    ("get", "/v2/models/{name}/config"): API,
    ("get", "/v2/models/{name}/versions/{version}/config"): API,
    ("post", "/v2/repository/index"): API,
    ("post", "/v2/repository/models/{name}/load"): API,
    ("post", "/v2/repository/models/{name}/unload"): API,
    ("get", "/v2/models/stats"): API,
    ("get", "/v2/models/{name}/stats"): API,
    ("get", "/v2/models/{name}/versions/{version}/stats"): API,
    ("post", "/v2/models/{name}/infer"): API,
    ("post", "/v2/models/{name}/versions/{version}/infer"): API,
    ("put", "/v1/models/{name}/weights"): ADMIN,
    ("post", "/v1/models/{name}/versions/{version}/activate"): ADMIN,
    ("post", "/v1/models/{name}/rollback"): ADMIN,
    ("delete", "/v1/models/{name}/versions/{version}"): ADMIN,
    ("get", "/v1/models/{name}/history"): ADMIN,
}
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
]
EXAMPLES_PER_VARIANT = 25
"""Generated cases per operation, per generation mode and per kind of model name (any, served)."""


def _document(tmp_path: Path) -> dict[str, Any]:
    document: dict[str, Any] = create_app(make_settings(tmp_path)).openapi()
    return document


def _operations(document: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in document["paths"].items():
        for method, operation in item.items():
            yield method, path, operation


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _refs(value)


def _resolve(document: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), f"{ref}: not a reference into the document"
    node: Any = document
    for part in ref[2:].split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def test_the_document_is_valid_openapi_3_1_and_every_ref_resolves(tmp_path: Path) -> None:
    document = _document(tmp_path)
    assert document["openapi"].startswith("3.1.")
    problems = [
        f"{'/'.join(map(str, error.absolute_path))}: {error.message}"
        for error in OpenAPIV31SpecValidator(document).iter_errors()
    ]
    assert problems == []
    unresolved = set()
    for ref in _refs(document):
        try:
            _resolve(document, ref)
        except KeyError:
            unresolved.add(ref)
    assert unresolved == set()
    assert not {"HTTPValidationError", "ValidationError"} & set(document["components"]["schemas"])


def test_security_declarations_match_each_class_of_endpoint(tmp_path: Path) -> None:
    document = _document(tmp_path)
    declared = {(m, p): operation.get("security") for m, p, operation in _operations(document)}
    assert declared == SECURITY
    assert "security" not in document  # no global requirement: health and /v2 stay open
    assert document["components"]["securitySchemes"] == {
        "HTTPBearer": {
            "type": "http",
            "scheme": "bearer",
            "description": document["components"]["securitySchemes"]["HTTPBearer"]["description"],
        }
    }


def test_every_token_endpoint_documents_401_and_403_and_open_ones_document_neither(
    tmp_path: Path,
) -> None:
    for method, path, operation in _operations(_document(tmp_path)):
        refusals = {"401", "403"} & set(operation["responses"])
        if SECURITY[method, path] is OPEN:
            assert refusals == set(), f"{method} {path}"
        else:
            assert refusals == {"401", "403"}, f"{method} {path}"


def test_every_error_answer_documents_the_error_body_of_its_protocol(tmp_path: Path) -> None:
    document = _document(tmp_path)
    for method, path, operation in _operations(document):
        for status, response in operation["responses"].items():
            if int(status) < 400 or (path, status) == ("/health/ready", "503"):
                continue  # readiness answers its Readiness body, ready or not
            schema = response["content"]["application/json"]["schema"]
            schema = _resolve(document, schema["$ref"]) if "$ref" in schema else schema
            # /v2 answers {"error"} as its protocol requires, but for the answers given before
            # its routes (a 422 for parameters, the draining 503): those carry the native body.
            required = set(schema["required"])
            assert required == {"error", "code"} or path.startswith("/v2"), f"{method} {path}"
            assert "error" in required, f"{method} {path} {status}"
            assert schema["properties"]["error"]["type"] == "string"


def test_every_endpoint_the_shutdown_gate_covers_documents_the_draining_503(
    tmp_path: Path,
) -> None:
    for method, path, operation in _operations(_document(tmp_path)):
        probe_or_scrape = path.startswith(("/health/", "/v2/health/", "/metrics"))
        assert probe_or_scrape or "503" in operation["responses"], f"{method} {path}"


async def _answer(
    client: httpx.AsyncClient,
    document: dict[str, Any],
    route: tuple[str, str],
    version: str,
    token: str | None,
) -> int:
    """The status of a plausible request to the route, after checking that the document
    describes the answer: its status, its content type and the error body's fields."""
    method, path = route
    url = path.replace("{name}", "linear").replace("{version}", version)
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    sample = [0] * 10
    body: Any = {"inputs": [sample]} if method in ("post", "put") else None
    if path.endswith("/infer"):
        body = {"inputs": [{"name": "input", "shape": [1, 10], "datatype": "FP32", "data": sample}]}
    response = await client.request(
        method, url, content=None if body is None else json.dumps(body), headers=headers
    )
    documented = document["paths"][path][method]["responses"]
    status = str(response.status_code)
    assert status in documented, f"{method} {path}: {status} undocumented"
    media_type = response.headers["content-type"].split(";")[0]
    assert media_type in documented[status].get("content", {}), f"{method} {path}: {status}"
    if response.status_code >= 400:
        assert "error" in response.json()
    return response.status_code


@pytest.mark.app
async def test_documented_security_is_what_the_server_does_with_and_without_tokens(
    tmp_path: Path,
) -> None:
    for directory in ("doc", "open", "guarded"):
        (tmp_path / directory).mkdir()
    document = _document(tmp_path / "doc")
    guarded = make_settings(tmp_path / "guarded", api_token=API_TOKEN, admin_token=ADMIN_TOKEN)
    async with serve_in_process(make_settings(tmp_path / "open")) as client:
        version = (await client.get("/v1/models/linear/versions")).json()["active"]
        for route, security in SECURITY.items():
            status = await _answer(client, document, route, version, None)
            if security == ADMIN:  # no admin token configured: management is disabled
                assert status == 403, route
            else:  # open by default
                assert status not in (401, 403), (route, status)
    async with serve_in_process(guarded) as client:
        for route, security in SECURITY.items():
            if security is OPEN:
                status = await _answer(client, document, route, version, None)
                assert status not in (401, 403), (route, status)
                continue
            assert await _answer(client, document, route, version, None) == 401, route
            assert await _answer(client, document, route, version, "c" * 32) == 403, route


def _known_good_cases(operation: APIOperation, version: str) -> list[Case]:
    """Requests that reach each operation's success answer (random ones mostly miss the
    served model names and shapes), so 2xx bodies and headers are checked too."""
    names = {"name": "linear", "version": version}
    path_parameters = {p.name: names[p.name] for p in operation.path_parameters}
    sample = [0.0] * 10
    bodies: dict[str, Any] = {
        "POST /predict": {"model": "linear", "inputs": [sample]},
        "POST /v1/models/{name}/predict": {"inputs": [sample, sample]},
        "POST /v2/models/{name}/infer": {
            "inputs": [{"name": "input", "shape": [1, 10], "datatype": "FP32", "data": sample}]
        },
    }
    bodies["POST /v2/models/{name}/versions/{version}/infer"] = bodies[
        "POST /v2/models/{name}/infer"
    ]
    if operation.label in bodies:
        return [
            operation.Case(
                path_parameters=path_parameters,
                body=bodies[operation.label],
                media_type="application/json",
            )
        ]
    if operation.method.upper() == "GET":
        return [operation.Case(path_parameters=path_parameters)]
    return []  # management: refused (403) while no admin token is configured


def _explore(operation: APIOperation, check: Callable[[Case], None]) -> None:
    """Generated cases: schema-valid and schema-breaking, with any model name and with a served
    one. Failures are collected by ``check``, so Hypothesis runs every example, no shrinking."""
    variants: list[dict[str, Any] | None] = [None]
    if any(p.name == "name" for p in operation.path_parameters):
        variants.append({"name": "linear"})
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
        for path_parameters in variants:

            @settings(
                max_examples=EXAMPLES_PER_VARIANT,
                derandomize=True,
                database=None,
                deadline=None,
                suppress_health_check=list(HealthCheck),
            )
            @given(operation.as_strategy(generation_mode=mode, path_parameters=path_parameters))
            def run(case: Case) -> None:
                check(case)

            with contextlib.suppress(Unsatisfiable):  # a negative mode with nothing to break
                run()


@pytest.mark.process
def test_a_bounded_schemathesis_run_finds_no_5xx_and_no_answer_contradicting_the_schema(
    tmp_path: Path,
) -> None:
    failures: list[str] = []
    answered: Counter[tuple[str, int]] = Counter()
    session = requests.Session()
    with run_server(tmp_path, write_config(tmp_path, LINEAR, DIGITS)) as server:
        version = httpx.get(f"{server.url}/v1/models/linear/versions").json()["active"]
        schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")

        def check(case: Case) -> None:
            try:
                response = case.call_and_validate(
                    base_url=server.url, session=session, checks=CHECKS, timeout=10
                )
            except (AssertionError, FailureGroup) as exc:  # one failed check, or several
                failures.append(f"{case.operation.label}: {exc}")
            else:
                answered[case.operation.label, response.status_code] += 1

        for result in schema.get_all_operations():
            operation = result.ok()
            for case in _known_good_cases(operation, version):
                check(case)
            _explore(operation, check)
        log = server.output()
    session.close()
    assert failures == [], "\n\n".join(failures[:10])
    assert "Traceback" not in log
    assert sum(answered.values()) >= 20 * len(SECURITY)  # about 1,000 cases
    successes = {label for label, status in answered if status < 300}
    management = [operation for operation, security in SECURITY.items() if security == ADMIN]
    refused = ["POST /v2/repository/models/{name}/unload"]  # always 400: models are configured
    assert not successes & set(refused)
    assert len(successes) == len(SECURITY) - len(management) - len(refused)  # no admin: 403
