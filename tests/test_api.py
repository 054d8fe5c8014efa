"""Health, model metadata and the OpenAPI document of the real app."""

from __future__ import annotations

import hashlib
from pathlib import Path

import httpx
import pytest
import torch

from models.linear import MyModel
from tests.helpers import BROKEN, DIGITS, LINEAR, WEIGHTS, make_settings, serve_in_process

pytestmark = pytest.mark.app


async def test_liveness_and_readiness_answer_200_when_every_model_serves(
    client: httpx.AsyncClient,
) -> None:
    live = await client.get("/health/live")
    ready = await client.get("/health/ready")
    assert (live.status_code, live.json()) == (200, {"live": True})
    assert ready.status_code == 200
    assert ready.json() == {
        "ready": True,
        "draining": False,
        "models": {"linear": "ready", "digits": "ready"},
        "unavailable": {},
    }


async def test_a_model_whose_weights_do_not_fit_makes_readiness_503_naming_it(
    tmp_path: Path,
) -> None:
    async with serve_in_process(make_settings(tmp_path, LINEAR, BROKEN)) as client:
        ready = await client.get("/health/ready")
        predict = await client.post("/v1/models/broken/predict", json={"inputs": [[0] * 10]})
        info = (await client.get("/v1/models/broken")).json()
        healthy = await client.post("/v1/models/linear/predict", json={"inputs": [[0] * 10]})
        live = await client.get("/health/live")
    assert ready.status_code == 503
    assert ready.json()["models"] == {"linear": "ready", "broken": "unavailable"}
    assert "missing keys: linear.weight, linear.bias" in ready.json()["unavailable"]["broken"]
    assert predict.status_code == 503
    assert predict.json()["code"] == "model_unavailable"
    assert info["status"] == "unavailable"
    assert "unexpected keys" in info["error"]
    assert healthy.status_code == 200
    assert live.status_code == 200


async def test_model_metadata_describes_class_shapes_weights_and_load(
    client: httpx.AsyncClient,
) -> None:
    info = (await client.get("/v1/models/digits")).json()
    data = (WEIGHTS / "digits.pth").read_bytes()
    assert info["name"] == "digits"
    assert info["class"] == "digits"
    assert info["class_path"] == "models.digits.DigitsCNN"
    assert info["status"] == "ready"
    assert info["device"] == "cpu"
    assert info["input_shape"] == [8, 8]
    assert info["input_dtype"] == "float32"
    assert info["output_shape"] == [10]
    assert info["kwargs"] == {"num_classes": 10}
    assert len(info["example_input"]) == 8
    assert info["parameter_count"] > 30_000
    assert info["weights"] == {
        "file": "digits.pth",
        "sha256": hashlib.sha256(data).hexdigest(),
        "size": len(data),
        "format": "torch",
    }
    assert info["loaded_at"].startswith("20")
    assert info["load_report"]["strict"] is True
    assert info["load_report"]["missing_keys"] == []


async def test_model_list_holds_every_served_model(client: httpx.AsyncClient) -> None:
    listing = (await client.get("/v1/models")).json()
    assert [m["name"] for m in listing["models"]] == ["linear", "digits"]


async def test_non_strict_load_reports_the_skipped_keys_in_metadata(tmp_path: Path) -> None:
    state = MyModel().state_dict()
    state["linear.bias"] = torch.zeros(3)  # wrong shape: skipped
    state["head.weight"] = torch.zeros(1)  # unexpected: skipped
    torch.save(state, tmp_path / "partial.pth")
    entry = {"name": "partial", "class": "linear", "weights": "partial.pth", "strict": False}
    async with serve_in_process(make_settings(tmp_path, entry)) as client:
        info = (await client.get("/v1/models/partial")).json()
        predict = await client.post("/predict", json={"inputs": [[1] * 10]})
    report = info["load_report"]
    assert info["status"] == "ready"
    assert report["strict"] is False
    assert report["loaded_keys"] == 1
    assert report["missing_keys"] == []
    assert report["unexpected_keys"] == ["head.weight"]
    assert report["mismatched"] == [
        {
            "key": "linear.bias",
            "expected_shape": [2],
            "found_shape": [3],
            "expected_dtype": "float32",
            "found_dtype": "float32",
        }
    ]
    assert predict.status_code == 200


async def test_one_class_serves_several_shapes_through_kwargs(tmp_path: Path) -> None:
    from models.digits import DigitsCNN

    torch.save(DigitsCNN(num_classes=3).state_dict(), tmp_path / "three.pth")
    three = {
        "name": "three",
        "class": "digits",
        "weights": "three.pth",
        "kwargs": {"num_classes": 3},
    }
    async with serve_in_process(make_settings(tmp_path, DIGITS, three)) as client:
        info = (await client.get("/v1/models/three")).json()
        predict = await client.post("/v1/models/three/predict", json={"inputs": [[[0] * 8] * 8]})
    assert info["output_shape"] == [3]
    assert len(predict.json()["outputs"][0]["probabilities"]) == 3


async def test_openapi_documents_every_endpoint_with_schemas_and_examples(
    client: httpx.AsyncClient,
) -> None:
    spec = (await client.get("/openapi.json")).json()
    paths = spec["paths"]
    assert set(paths) >= {
        "/health/live",
        "/health/ready",
        "/v1/models",
        "/v1/models/{name}",
        "/v1/models/{name}/predict",
        "/predict",
        "/v1/models/{name}/weights",
        "/v1/models/{name}/versions",
        "/v1/models/{name}/versions/{version}",
        "/v1/models/{name}/versions/{version}/activate",
        "/v1/models/{name}/rollback",
    }
    for path, operations in paths.items():
        for method, operation in operations.items():
            success = min(code for code in operation["responses"] if code.startswith("2"))
            if success == "204":
                continue
            content = operation["responses"][success]["content"]
            assert all(c["schema"] for c in content.values()), f"{method} {path}: no schema"
    for path in ("/v1/models/{name}/predict", "/predict"):
        body = paths[path]["post"]["requestBody"]["content"]["application/json"]
        request_schema = spec["components"]["schemas"][body["schema"]["$ref"].split("/")[-1]]
        assert "inputs" in request_schema["properties"]
        assert set(body["examples"]) == {"linear", "digits"}
        assert paths[path]["post"]["responses"]["422"]["content"]["application/json"]["schema"]
    docs = await client.get("/docs")
    assert docs.status_code == 200


async def test_every_openapi_example_body_really_predicts(client: httpx.AsyncClient) -> None:
    spec = (await client.get("/openapi.json")).json()
    for path, name in (("/v1/models/linear/predict", "linear"), ("/predict", "digits")):
        template = path if path == "/predict" else "/v1/models/{name}/predict"
        examples = spec["paths"][template]["post"]["requestBody"]["content"]["application/json"]
        response = await client.post(path, json=examples["examples"][name]["value"])
        assert response.status_code == 200, response.text
