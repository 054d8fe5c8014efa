"""Predict endpoints against the real app and real torch models: answers and every bad input."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from app.codecs.binary import DTYPE_HEADER, RAW, SHAPE_HEADER
from app.codecs.float_json import FROM_BYTES
from app.serving.catalog import register
from models.digits import EXAMPLE_ZERO
from tests.helpers import BUNDLED, LINEAR, SAMPLE, make_settings, serve_in_process

pytestmark = pytest.mark.app


async def test_linear_predict_equals_the_model_forward_in_input_order(
    client: httpx.AsyncClient,
) -> None:
    samples = [[float(i + j) for j in range(10)] for i in range(5)]
    response = await client.post("/v1/models/linear/predict", json={"inputs": samples})
    assert response.status_code == 200
    body = response.json()
    assert body["model"] == "linear"
    assert np.allclose(body["outputs"], BUNDLED.outputs(samples), atol=1e-6)
    assert response.headers["X-Model-Version"] == body["version"]


async def test_a_large_json_body_answers_as_its_samples_sent_raw(
    client: httpx.AsyncClient,
) -> None:
    """A body of many floats is read straight into an array (app.codecs.float_json): the same
    answer as the same float32 samples sent as raw bytes."""
    samples = np.random.default_rng(3).normal(size=(32, 10))
    body = json.dumps({"inputs": samples.tolist()}).encode()
    assert len(body) >= FROM_BYTES
    headers = {"Content-Type": "application/json"}
    as_json = await client.post("/v1/models/linear/predict", content=body, headers=headers)
    raw_headers = {"Content-Type": RAW, SHAPE_HEADER: "32,10", DTYPE_HEADER: "float32"}
    raw = samples.astype(np.float32).tobytes()
    as_raw = await client.post("/v1/models/linear/predict", content=raw, headers=raw_headers)
    assert as_json.status_code == as_raw.status_code == 200
    assert as_json.json()["outputs"] == as_raw.json()["outputs"]
    assert np.allclose(as_json.json()["outputs"], BUNDLED.outputs(samples.tolist()), atol=1e-6)


async def test_version_is_the_weights_sha256_prefix(client: httpx.AsyncClient) -> None:
    info = (await client.get("/v1/models/linear")).json()
    response = await client.post("/v1/models/linear/predict", json={"inputs": [SAMPLE]})
    assert response.json()["version"] == info["weights"]["sha256"][:12] == info["version"]


async def test_digits_answers_label_and_probabilities(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/models/digits/predict", json={"inputs": [EXAMPLE_ZERO]})
    assert response.status_code == 200
    (output,) = response.json()["outputs"]
    assert output["label"] == 0
    assert len(output["probabilities"]) == 10
    assert sum(output["probabilities"]) == pytest.approx(1.0, abs=1e-4)


async def test_predict_without_model_uses_the_named_model(client: httpx.AsyncClient) -> None:
    response = await client.post("/predict", json={"model": "linear", "inputs": [SAMPLE]})
    assert response.status_code == 200
    assert response.json()["model"] == "linear"


async def test_predict_without_model_is_refused_when_several_are_served(
    client: httpx.AsyncClient,
) -> None:
    response = await client.post("/predict", json={"inputs": [SAMPLE]})
    assert response.status_code == 422
    assert "name one in 'model'" in response.json()["error"]


async def test_predict_without_model_uses_the_only_model(tmp_path: Path) -> None:
    async with serve_in_process(make_settings(tmp_path, LINEAR)) as client:
        response = await client.post("/predict", json={"inputs": [SAMPLE]})
    assert response.status_code == 200
    assert response.json()["model"] == "linear"


async def test_predict_without_model_uses_the_configured_default(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, default_model="digits")
    async with serve_in_process(settings) as client:
        response = await client.post("/predict", json={"inputs": [EXAMPLE_ZERO]})
    assert response.json()["model"] == "digits"


async def test_integers_are_accepted_for_a_float_model(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/models/linear/predict", json={"inputs": [list(range(10))]})
    assert response.status_code == 200


BAD_INPUTS = [
    pytest.param(b'{"inputs": [[1, 2', 400, "malformed JSON", id="malformed-json"),
    pytest.param(b"[1, 2, 3]", 400, "JSON object", id="not-an-object"),
    pytest.param(b'{"input": [[1]]}', 422, "no 'inputs'", id="missing-inputs"),
    pytest.param(b'{"inputs": [], "extra": 1}', 422, "unknown field", id="unknown-field"),
    pytest.param(b'{"inputs": []}', 422, "empty", id="empty-batch"),
    pytest.param(b'{"inputs": 3}', 422, "must be a list", id="not-a-list"),
    pytest.param(b'{"inputs": [[1, 2, 3]]}', 422, "expected 1 sample(s) of shape [10]", id="shape"),
    pytest.param(b'{"inputs": [1, 2]}', 422, "received shape [2]", id="missing-batch-dim"),
    pytest.param(b'{"inputs": [[1,2,3,4,5,6,7,8,9,10], [1]]}', 422, "ragged", id="ragged-samples"),
    pytest.param(
        b'{"inputs": [["a","b","c","d","e","f","g","h","i","j"]]}', 422, "strings", id="strings"
    ),
    pytest.param(b'{"inputs": [[1,2,3,4,5,6,7,8,9,null]]}', 422, "non-numeric", id="null-value"),
    pytest.param(
        b'{"inputs": [[true,true,true,true,true,true,true,true,true,true]]}',
        422,
        "received booleans",
        id="booleans",
    ),
    pytest.param(b'{"inputs": [[NaN,2,3,4,5,6,7,8,9,10]]}', 422, "NaN", id="nan"),
    pytest.param(b'{"inputs": [[Infinity,2,3,4,5,6,7,8,9,10]]}', 422, "infinity", id="inf"),
    pytest.param(b'{"inputs": [[1e300,2,3,4,5,6,7,8,9,10]]}', 422, "too large", id="overflow"),
    pytest.param(b"\xff\xfe", 400, "malformed JSON", id="not-utf8"),
]


@pytest.mark.parametrize(("body", "status", "message"), BAD_INPUTS)
async def test_bad_input_gets_a_clear_4xx_in_the_one_error_format(
    client: httpx.AsyncClient, body: bytes, status: int, message: str
) -> None:
    response = await client.post("/v1/models/linear/predict", content=body)
    assert response.status_code == status, response.text
    error = response.json()
    assert set(error) <= {"error", "code", "detail"}
    assert message in error["error"]
    # the model keeps serving after every refusal
    ok = await client.post("/v1/models/linear/predict", json={"inputs": [SAMPLE]})
    assert ok.status_code == 200


async def test_wrong_dtype_for_an_integer_model_names_both(tmp_path: Path) -> None:
    @register("test-embedding-bag", input_shape=(4,), input_dtype=torch.int64, output_shape=(3,))
    class TokenModel(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embedding = torch.nn.EmbeddingBag(20, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.embedding(x)

    torch.save(TokenModel().state_dict(), tmp_path / "tokens.pth")
    entry = {"name": "tokens", "class": "test-embedding-bag", "weights": "tokens.pth"}
    async with serve_in_process(make_settings(tmp_path, entry)) as client:
        floats = await client.post("/predict", json={"inputs": [[1.5, 2, 3, 4]]})
        ints = await client.post("/predict", json={"inputs": [[1, 2, 3, 4]]})
        huge = await client.post("/predict", json={"inputs": [[2**70, 2, 3, 4]]})
    assert floats.status_code == 422
    assert "takes integers (int64); received floating-point numbers" in floats.json()["error"]
    assert ints.status_code == 200
    assert huge.status_code == 422


async def test_more_samples_than_the_limit_is_refused(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, LINEAR, max_samples_per_request=4)
    async with serve_in_process(settings) as client:
        response = await client.post("/predict", json={"inputs": [SAMPLE] * 5})
        ok = await client.post("/predict", json={"inputs": [SAMPLE] * 4})
    assert response.status_code == 422
    assert "received 5, the limit is 4" in response.json()["error"]
    assert ok.status_code == 200


async def test_body_over_the_limit_gets_413(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, LINEAR, max_body_bytes=2048)
    body = json.dumps({"inputs": [SAMPLE] * 40}).encode()
    assert len(body) > 2048
    async with serve_in_process(settings) as client:
        declared = await client.post("/predict", content=body)

        async def chunks():  # no Content-Length: the cap applies while streaming
            yield body

        streamed = await client.post("/predict", content=chunks())
    for response in (declared, streamed):
        assert response.status_code == 413
        assert response.json()["code"] == "payload_too_large"


async def test_unknown_model_gets_404_naming_the_served_ones(client: httpx.AsyncClient) -> None:
    for response in (
        await client.post("/v1/models/nope/predict", json={"inputs": [SAMPLE]}),
        await client.post("/predict", json={"model": "nope", "inputs": [SAMPLE]}),
    ):
        assert response.status_code == 404
        assert response.json() == {
            "error": "no model named 'nope'; served models: digits, linear",
            "code": "model_not_found",
        }


async def test_wrong_method_gets_405_in_the_one_error_format(client: httpx.AsyncClient) -> None:
    response = await client.get("/v1/models/linear/predict")
    assert response.status_code == 405
    assert response.json()["code"] == "method_not_allowed"
    assert "allowed: POST" in response.json()["error"]


async def test_unknown_path_gets_404_in_the_one_error_format(client: httpx.AsyncClient) -> None:
    response = await client.get("/v1/nothing")
    assert response.status_code == 404
    assert response.json()["code"] == "not_found"
