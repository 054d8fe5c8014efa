"""The binary predict path: raw little-endian tensors and .npy in and out, every dtype."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from torch import nn

from app.codecs.dtypes import BY_NAME as DTYPES
from app.serving.catalog import register
from tests.helpers import LINEAR, make_settings, serve_in_process

pytestmark = pytest.mark.app

TORCH_DTYPES = {name: getattr(torch, name) for name in DTYPES}


def _identity(dtype: torch.dtype) -> type[nn.Module]:
    class Identity(nn.Module):
        """Returns its input unchanged, in its own dtype."""

        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("unused", torch.zeros(1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    Identity.__qualname__ = f"Identity_{dtype}".replace("torch.", "")
    return Identity


for _name, _dtype in TORCH_DTYPES.items():
    register(f"test-identity-{_name}", input_shape=(3,), input_dtype=_dtype)(_identity(_dtype))


@pytest.fixture
def identity_settings(tmp_path: Path) -> Any:
    entries = []
    for name, cls_name in ((n, f"test-identity-{n}") for n in DTYPES):
        torch.save({"unused": torch.zeros(1)}, tmp_path / f"{name}.pth")
        entries.append({"name": f"id-{name}", "class": cls_name, "weights": f"{name}.pth"})
    return make_settings(tmp_path, *entries)


def sample(dtype: torch.dtype) -> torch.Tensor:
    values = torch.tensor([[0, 1, 2], [3, 4, 5]])
    return values.bool() if dtype == torch.bool else values.to(dtype)


def raw_bytes(tensor: torch.Tensor) -> bytes:
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.uint16).numpy().tobytes()
    return tensor.numpy().tobytes()


async def test_raw_tensors_of_every_dtype_round_trip_unchanged(identity_settings: Any) -> None:
    async with serve_in_process(identity_settings) as client:
        for name, dtype in TORCH_DTYPES.items():
            tensor = sample(dtype)
            response = await client.post(
                f"/v1/models/id-{name}/predict",
                content=raw_bytes(tensor),
                headers={
                    "Content-Type": "application/octet-stream",
                    "Accept": "application/octet-stream",
                    "X-Tensor-Shape": "2,3",
                    "X-Tensor-Dtype": name,
                },
            )
            assert response.status_code == 200, (name, response.text)
            assert response.headers["X-Tensor-Dtype"] == name
            assert response.headers["X-Tensor-Shape"] == "2,3"
            assert response.headers["Content-Type"] == "application/octet-stream"
            assert response.content == raw_bytes(tensor), name


async def test_npy_bodies_of_every_numpy_dtype_round_trip(identity_settings: Any) -> None:
    async with serve_in_process(identity_settings) as client:
        for name, dtype in TORCH_DTYPES.items():
            tensor = sample(dtype)
            array = tensor.float().numpy() if dtype == torch.bfloat16 else tensor.numpy()
            body = io.BytesIO()
            np.save(body, array)
            response = await client.post(
                f"/v1/models/id-{name}/predict",
                content=body.getvalue(),
                headers={"Content-Type": "application/x-npy", "Accept": "application/x-npy"},
            )
            assert response.status_code == 200, (name, response.text)
            answer = np.load(io.BytesIO(response.content), allow_pickle=False)
            np.testing.assert_array_equal(answer, array)


async def test_binary_request_can_be_answered_in_json_with_the_same_outputs(
    client: httpx.AsyncClient,
) -> None:
    inputs = np.arange(20, dtype=np.float32).reshape(2, 10)
    as_json = await client.post("/v1/models/linear/predict", json={"inputs": inputs.tolist()})
    as_raw = await client.post(
        "/predict?model=linear",
        content=inputs.tobytes(),
        headers={
            "Content-Type": "application/octet-stream",
            "X-Tensor-Shape": "2,10",
            "X-Tensor-Dtype": "float32",
        },
    )
    assert as_raw.status_code == 200
    assert as_raw.json() == as_json.json()
    assert as_raw.headers["X-Model-Version"] == as_json.headers["X-Model-Version"]


async def test_json_request_can_be_answered_as_raw_bytes(client: httpx.AsyncClient) -> None:
    inputs = [[float(i) for i in range(10)]]
    as_json = await client.post("/v1/models/linear/predict", json={"inputs": inputs})
    as_raw = await client.post(
        "/v1/models/linear/predict",
        json={"inputs": inputs},
        headers={"Accept": "application/octet-stream"},
    )
    decoded = np.frombuffer(as_raw.content, dtype="<f4").reshape(1, 2)
    np.testing.assert_allclose(decoded, as_json.json()["outputs"], rtol=1e-6)


async def test_binary_answers_carry_the_raw_output_before_postprocess(
    client: httpx.AsyncClient,
) -> None:
    from models.digits import EXAMPLE_ZERO

    response = await client.post(
        "/v1/models/digits/predict",
        content=np.array([EXAMPLE_ZERO], dtype=np.float32).tobytes(),
        headers={
            "Content-Type": "application/octet-stream",
            "Accept": "application/octet-stream",
            "X-Tensor-Shape": "1,8,8",
            "X-Tensor-Dtype": "float32",
        },
    )
    logits = np.frombuffer(response.content, dtype="<f4").reshape(1, 10)
    assert int(logits.argmax()) == 0


BAD_BINARY = [
    pytest.param({"X-Tensor-Dtype": "float32"}, b"\0" * 40, 400, "X-Tensor-Shape", id="no-shape"),
    pytest.param({"X-Tensor-Shape": "1,10"}, b"\0" * 40, 400, "X-Tensor-Dtype", id="no-dtype"),
    pytest.param(
        {"X-Tensor-Shape": "", "X-Tensor-Dtype": "float32"}, b"\0" * 4, 400, "scalar", id="scalar"
    ),
    pytest.param(
        {"X-Tensor-Shape": "1,x", "X-Tensor-Dtype": "float32"}, b"", 400, "malformed", id="shape"
    ),
    pytest.param(
        {"X-Tensor-Shape": "1,10", "X-Tensor-Dtype": "complex64"},
        b"\0" * 80,
        400,
        "unknown X-Tensor-Dtype",
        id="unknown-dtype",
    ),
    pytest.param(
        {"X-Tensor-Shape": "1,10", "X-Tensor-Dtype": "float32"},
        b"\0" * 39,
        400,
        "needs 40",
        id="short-body",
    ),
    pytest.param(
        {"X-Tensor-Shape": "1,3", "X-Tensor-Dtype": "float32"},
        b"\0" * 12,
        422,
        "wrong sample shape",
        id="wrong-shape",
    ),
    pytest.param(
        {"X-Tensor-Shape": "1,10", "X-Tensor-Dtype": "bool"},
        b"\0" * 10,
        422,
        "received booleans",
        id="wrong-dtype",
    ),
    pytest.param(
        {"X-Tensor-Shape": "1,10", "X-Tensor-Dtype": "float32"},
        np.full(10, np.nan, dtype=np.float32).tobytes(),
        422,
        "NaN",
        id="nan",
    ),
    pytest.param(
        {"X-Tensor-Shape": "0,10", "X-Tensor-Dtype": "float32"}, b"", 422, "empty", id="empty"
    ),
]


@pytest.mark.parametrize(("headers", "body", "status", "message"), BAD_BINARY)
async def test_bad_binary_input_gets_a_clear_4xx(
    client: httpx.AsyncClient, headers: dict[str, str], body: bytes, status: int, message: str
) -> None:
    response = await client.post(
        "/v1/models/linear/predict",
        content=body,
        headers={"Content-Type": "application/octet-stream", **headers},
    )
    assert response.status_code == status, response.text
    assert message in response.json()["error"]


async def test_npy_holding_python_objects_is_refused_unpickled(client: httpx.AsyncClient) -> None:
    body = io.BytesIO()
    np.save(body, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    response = await client.post(
        "/v1/models/linear/predict",
        content=body.getvalue(),
        headers={"Content-Type": "application/x-npy"},
    )
    assert response.status_code == 400
    assert "holds object" in response.json()["error"]


async def test_unknown_content_type_gets_415(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/v1/models/linear/predict", content=b"a,b", headers={"Content-Type": "text/csv"}
    )
    assert response.status_code == 415
    assert response.json()["code"] == "unsupported_media_type"


async def test_binary_body_over_the_limit_gets_413(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, LINEAR, max_body_bytes=1024)
    async with serve_in_process(settings) as client:
        response = await client.post(
            "/v1/models/linear/predict",
            content=b"\0" * 4000,
            headers={
                "Content-Type": "application/octet-stream",
                "X-Tensor-Shape": "100,10",
                "X-Tensor-Dtype": "float32",
            },
        )
    assert response.status_code == 413
