"""Models of several named inputs and outputs: registration (decorator and TOML), the batcher
stacking every input, and the bundled ``sentiment`` model (``input_ids`` + ``attention_mask``
-> ``logits`` + ``embedding``) through every protocol: native JSON and .npz, V2 REST JSON and
binary (tritonclient.http), and gRPC (tritonclient.grpc), each giving the model's own outputs."""

from __future__ import annotations

import asyncio
import io
import re
import zipfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from torch import nn

from app.config import ServedModelConfig
from app.errors import ConfigError, SmokeTestFailed
from app.serving.catalog import Input, ModelSpec, register
from app.serving.classes import spec_for
from app.serving.runtime import build_runtime
from tests.helpers import (
    CPU,
    SENTIMENT,
    free_port,
    make_settings,
    metric,
    run_server,
    sentiment_outputs,
    serve_in_process,
    write_config,
)

IDS = np.array([[5, 17, 42, 8, 0, 0, 0, 0], [1, 2, 3, 4, 5, 6, 7, 8], [9, 9, 0, 0, 0, 0, 0, 0]])
MASK = np.array([[1, 1, 1, 1, 0, 0, 0, 0], [1] * 8, [1, 1, 0, 0, 0, 0, 0, 0]])
NPZ = "application/x-npz"
LIMIT = 64 * 1024
"""MODELPORT_MAX_BODY_BYTES of the in-process app: what an .npz may inflate to at most."""


def expected() -> dict[str, np.ndarray]:
    """The bundled weights' own outputs on IDS and MASK, from the module called directly."""
    return sentiment_outputs({"input_ids": IDS, "attention_mask": MASK})


def npz(**arrays: np.ndarray) -> bytes:
    stream = io.BytesIO()
    np.savez(stream, **arrays)
    return stream.getvalue()


def unpacked(body: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(body), allow_pickle=False) as archive:
        return {name: archive[name] for name in archive.files}


# --- registration -----------------------------------------------------------------------------


class Pair(nn.Module):
    """Two inputs in, a tuple of two outputs back."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(3))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        kept = x * self.scale * mask
        return kept, kept.sum(dim=1)


class PlainPair(Pair):
    """Pair, not decorated: a register table in the config declares it."""


class Misnamed(Pair):
    """Pair, registered with one output name too many."""


register(
    "test-multi-pair",
    inputs={"x": Input((3,)), "mask": Input((3,), torch.bool)},
    outputs=["kept", "total"],
)(Pair)


@pytest.mark.unit
def test_a_tuple_output_is_named_by_the_registration_in_order(tmp_path: Path) -> None:
    path = tmp_path / "pair.pth"
    torch.save(Pair().state_dict(), path)
    runtime = build_runtime(spec_named("test-multi-pair"), {}, path, CPU)

    x = np.array([[1.0, 2.0, 3.0]], np.float32)
    outputs = runtime.run({"x": x, "mask": np.array([[True, False, True]])})

    assert [o.name for o in runtime.outputs] == ["kept", "total"]
    assert [o.shape for o in runtime.outputs] == [(3,), ()]
    assert outputs["kept"].tolist() == [[1.0, 0.0, 3.0]]
    assert outputs["total"].tolist() == [4.0]
    assert runtime.postprocess(outputs) == [{"kept": [1.0, 0.0, 3.0], "total": 4.0}]


def spec_named(name: str) -> ModelSpec:
    config = ServedModelConfig.model_validate({"name": name, "class": name, "weights": "w.pth"})
    return spec_for(config)


@pytest.mark.unit
@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"input_shape": (3,), "inputs": {"x": Input((3,))}}, "input_shape (one input) or"),
        ({}, "input_shape (one input) or inputs"),
        ({"inputs": {"x": Input((3,)), "other": Input((3,))}}, "cannot take the inputs"),
        ({"inputs": {"x": (3,)}}, "must map each input's name to an Input"),
        ({"inputs": {"x": Input((3,)), "mask": Input((3,))}, "outputs": ["a b"]}, "names must"),
        ({"input_shape": (3,), "output_shape": (3,), "outputs": ["a"]}, "output_shape (one"),
    ],
)
def test_a_registration_whose_inputs_or_outputs_cannot_serve_is_refused_at_import(
    options: dict[str, Any], fragment: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(fragment)):
        register(f"test-multi-bad-{len(options)}-{fragment[:8]}", **options)(Pair)


@pytest.mark.unit
def test_a_forward_returning_other_outputs_than_registered_fails_its_smoke_test(
    tmp_path: Path,
) -> None:
    register(
        "test-multi-misnamed",
        inputs={"x": Input((3,)), "mask": Input((3,), torch.bool)},
        outputs=["kept", "total", "third"],
    )(Misnamed)
    path = tmp_path / "pair.pth"
    torch.save(Pair().state_dict(), path)

    with pytest.raises(SmokeTestFailed, match=r"forward returned 2 outputs"):
        build_runtime(spec_named("test-multi-misnamed"), {}, path, CPU)


@pytest.mark.unit
def test_a_register_table_declares_several_inputs_and_outputs(tmp_path: Path) -> None:
    table = {
        "inputs": {
            "x": {"shape": [3], "dtype": "float32"},
            "mask": {"shape": [3], "dtype": "bool"},
        },
        "outputs": {"kept": [3], "total": []},
    }
    config = ServedModelConfig.model_validate(
        {"name": "p", "class": "tests.test_multi_io:PlainPair", "weights": "w", "register": table}
    )
    spec = spec_for(config)

    assert [(s.name, s.shape, s.dtype) for s in spec.signature({})] == [
        ("x", (3,), torch.float32),
        ("mask", (3,), torch.bool),
    ]
    assert spec.output_shapes({}) == {"kept": (3,), "total": ()}
    path = tmp_path / "pair.pth"
    torch.save(Pair().state_dict(), path)
    assert [o.name for o in build_runtime(spec, {}, path, CPU).outputs] == ["kept", "total"]


@pytest.mark.unit
@pytest.mark.parametrize(
    ("table", "fragment"),
    [
        ({"inputs": {"x": {"shape": [3]}}}, "x: expected { shape"),
        ({"inputs": {"x": {"shape": [3], "dtype": "float32"}}}, "cannot take the inputs"),
        ({"inputs": {}}, "a table of inputs by name"),
        ({"input_shape": [3], "input_dtype": "float32", "outputs": 3}, "the output names"),
    ],
)
def test_a_register_table_with_bad_inputs_or_outputs_is_a_one_line_config_error(
    table: dict[str, Any], fragment: str
) -> None:
    config = ServedModelConfig.model_validate(
        {"name": "p", "class": "tests.test_multi_io:PlainPair", "weights": "w", "register": table}
    )
    with pytest.raises(ConfigError, match=fragment) as info:
        spec_for(config)
    assert "\n" not in info.value.message


# --- native JSON and .npz, V2 REST, in process -------------------------------------------------


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    settings = make_settings(tmp_path, SENTIMENT, max_body_bytes=LIMIT, max_batch_delay_ms=50)
    async with serve_in_process(settings) as client:
        yield client


PREDICT = "/v1/models/sentiment/predict"


@pytest.mark.app
async def test_native_json_by_input_name_answers_one_object_of_named_outputs_per_sample(
    client: httpx.AsyncClient,
) -> None:
    body = {"inputs": {"input_ids": IDS.tolist(), "attention_mask": MASK.tolist()}}
    response = await client.post(PREDICT, json=body)

    assert response.status_code == 200, response.text
    outputs = response.json()["outputs"]
    assert [sorted(sample) for sample in outputs] == [["embedding", "logits"]] * 3
    for name, values in expected().items():
        np.testing.assert_allclose([s[name] for s in outputs], values, rtol=1e-6)


@pytest.mark.app
async def test_native_npz_in_and_out_gives_the_models_outputs_by_name(
    client: httpx.AsyncClient,
) -> None:
    response = await client.post(
        PREDICT,
        content=npz(input_ids=IDS, attention_mask=MASK),
        headers={"Content-Type": NPZ, "Accept": NPZ},
    )

    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == NPZ
    outputs = unpacked(response.content)
    assert sorted(outputs) == ["embedding", "logits"]
    for name, values in expected().items():
        np.testing.assert_allclose(outputs[name], values, rtol=1e-6)


@pytest.mark.app
async def test_an_npz_body_may_be_compressed_and_answers_json_unless_asked(
    client: httpx.AsyncClient,
) -> None:
    stream = io.BytesIO()
    np.savez_compressed(stream, input_ids=IDS, attention_mask=MASK)
    response = await client.post(PREDICT, content=stream.getvalue(), headers={"Content-Type": NPZ})

    assert response.status_code == 200, response.text
    logits = [sample["logits"] for sample in response.json()["outputs"]]
    np.testing.assert_allclose(logits, expected()["logits"], rtol=1e-6)


@pytest.mark.app
@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        ({"inputs": IDS.tolist()}, 422, "takes 2 inputs by name (input_ids, attention_mask)"),
        ({"inputs": {"input_ids": IDS.tolist()}}, 422, "received ['input_ids']"),
        (
            {"inputs": {"input_ids": IDS.tolist(), "attention_mask": MASK[:2].tolist()}},
            422,
            "different numbers of samples",
        ),
        (
            {"inputs": {"input_ids": IDS.tolist(), "attention_mask": MASK[:, :7].tolist()}},
            422,
            "input 'attention_mask': wrong sample shape",
        ),
        (
            {"inputs": {"input_ids": [["a"] * 8], "attention_mask": [[1] * 8]}},
            422,
            "input 'input_ids': wrong dtype",
        ),
        ({"inputs": {"input_ids": 3, "attention_mask": 4}}, 422, "'inputs' must be a list"),
    ],
)
async def test_inputs_that_do_not_fit_the_named_signature_are_refused_saying_which(
    client: httpx.AsyncClient, body: dict[str, Any], status: int, fragment: str
) -> None:
    response = await client.post(PREDICT, json=body)

    assert response.status_code == status, response.text
    assert fragment in response.json()["error"]


@pytest.mark.app
@pytest.mark.parametrize("accept", ["application/octet-stream", "application/x-npy"])
async def test_one_raw_tensor_for_several_outputs_is_not_acceptable_before_the_model_runs(
    client: httpx.AsyncClient, accept: str
) -> None:
    response = await client.post(
        PREDICT,
        content=npz(input_ids=IDS, attention_mask=MASK),
        headers={"Content-Type": NPZ, "Accept": accept},
    )

    assert response.status_code == 406, response.text
    assert "ask for application/x-npz" in response.json()["error"]
    scrape = (await client.get("/metrics")).text
    assert metric(scrape, "modelport_batch_size_count", missing=0.0, model="sentiment") == 0


@pytest.mark.app
async def test_one_unnamed_binary_tensor_for_a_model_of_several_inputs_is_refused(
    client: httpx.AsyncClient,
) -> None:
    stream = io.BytesIO()
    np.save(stream, IDS)
    response = await client.post(
        PREDICT, content=stream.getvalue(), headers={"Content-Type": "application/x-npy"}
    )

    assert response.status_code == 422, response.text
    assert "received one unnamed input" in response.json()["error"]


def _zip(*members: tuple[str, bytes], method: int = zipfile.ZIP_STORED) -> bytes:
    stream = io.BytesIO()
    with zipfile.ZipFile(stream, "w", compression=method) as archive:
        for name, data in members:
            archive.writestr(name, data)
    return stream.getvalue()


def _npy(array: np.ndarray) -> bytes:
    stream = io.BytesIO()
    np.save(stream, array, allow_pickle=True)
    return stream.getvalue()


HOSTILE_NPZ = {
    "zip bomb": (
        _zip(("input_ids.npy", _npy(np.zeros((1, 10**6), np.int64))), method=zipfile.ZIP_DEFLATED),
        413,
        "inflates past MODELPORT_MAX_BODY_BYTES",
    ),
    "not a zip": (b"PK\x03\x04 not really", 400, "malformed .npz body"),
    "pickled object member": (
        _zip(("input_ids.npy", _npy(np.array([{"a": 1}], dtype=object)))),
        400,
        "send numbers or booleans",
    ),
    "member not .npy": (_zip(("input_ids.txt", b"1 2 3")), 400, "not a named .npy"),
    "too many members": (
        _zip(*((f"m{i}.npy", _npy(np.zeros(1))) for i in range(65))),
        400,
        "at most 64",
    ),
    "truncated member": (
        _zip(("input_ids.npy", _npy(IDS)[:-8]), ("attention_mask.npy", _npy(MASK))),
        400,
        "bytes follow it",
    ),
    "empty archive": (_zip(), 400, "holds no tensor"),
}


@pytest.mark.app
@pytest.mark.parametrize("case", HOSTILE_NPZ)
async def test_a_hostile_npz_body_gets_a_clear_4xx_and_the_model_keeps_serving(
    client: httpx.AsyncClient, case: str
) -> None:
    body, status, fragment = HOSTILE_NPZ[case]
    assert len(body) < LIMIT
    response = await client.post(PREDICT, content=body, headers={"Content-Type": NPZ})

    assert response.status_code == status, response.text
    assert fragment in response.json()["error"]
    after = await client.post(
        PREDICT, content=npz(input_ids=IDS, attention_mask=MASK), headers={"Content-Type": NPZ}
    )
    assert after.status_code == 200


@pytest.mark.app
async def test_concurrent_requests_are_stacked_input_by_input_into_one_forward(
    client: httpx.AsyncClient,
) -> None:
    bodies = [
        {
            "inputs": {
                "input_ids": IDS[i : i + 1].tolist(),
                "attention_mask": MASK[i : i + 1].tolist(),
            }
        }
        for i in range(3)
    ]
    responses = await asyncio.gather(*(client.post(PREDICT, json=body) for body in bodies))

    want = expected()
    for i, response in enumerate(responses):
        [sample] = response.json()["outputs"]
        np.testing.assert_allclose(sample["embedding"], want["embedding"][i], rtol=1e-6)
    scrape = (await client.get("/metrics")).text
    assert metric(scrape, "modelport_batch_size_sum", model="sentiment") == 3
    assert metric(scrape, "modelport_batch_size_count", model="sentiment") == 1


@pytest.mark.app
async def test_descriptions_name_every_input_and_output(client: httpx.AsyncClient) -> None:
    native = (await client.get("/v1/models/sentiment")).json()
    v2 = (await client.get("/v2/models/sentiment")).json()
    config = (await client.get("/v2/models/sentiment/config")).json()

    assert native["inputs"] == [
        {"name": "input_ids", "shape": [8], "dtype": "int64"},
        {"name": "attention_mask", "shape": [8], "dtype": "int64"},
    ]
    assert native["outputs"] == [
        {"name": "logits", "shape": [3], "dtype": "float32"},
        {"name": "embedding", "shape": [4], "dtype": "float32"},
    ]
    assert (native["input_shape"], native["input_dtype"]) == (None, None)
    assert sorted(native["example_input"]) == ["attention_mask", "input_ids"]
    assert [(t["name"], t["datatype"], t["shape"]) for t in v2["inputs"]] == [
        ("input_ids", "INT64", [-1, 8]),
        ("attention_mask", "INT64", [-1, 8]),
    ]
    assert [t["name"] for t in v2["outputs"]] == ["logits", "embedding"]
    assert [(t["name"], t["dims"]) for t in config["output"]] == [
        ("logits", [3]),
        ("embedding", [4]),
    ]


def _v2_inputs() -> list[dict[str, Any]]:
    return [
        {"name": n, "datatype": "INT64", "shape": list(a.shape), "data": a.reshape(-1).tolist()}
        for n, a in (("input_ids", IDS), ("attention_mask", MASK))
    ]


@pytest.mark.app
async def test_v2_json_answers_every_output_by_name_or_only_those_asked_for(
    client: httpx.AsyncClient,
) -> None:
    every = (await client.post("/v2/models/sentiment/infer", json={"inputs": _v2_inputs()})).json()
    asked = await client.post(
        "/v2/models/sentiment/infer",
        json={"inputs": _v2_inputs(), "outputs": [{"name": "embedding"}]},
    )
    unknown = await client.post(
        "/v2/models/sentiment/infer",
        json={"inputs": _v2_inputs(), "outputs": [{"name": "output"}]},
    )

    want = expected()
    assert [o["name"] for o in every["outputs"]] == ["logits", "embedding"]
    for output in every["outputs"]:
        assert output["shape"] == list(want[output["name"]].shape)
        np.testing.assert_allclose(output["data"], want[output["name"]].reshape(-1), rtol=1e-6)
    assert [o["name"] for o in asked.json()["outputs"]] == ["embedding"]
    assert unknown.status_code == 400
    assert unknown.json() == {
        "error": "model 'sentiment' has no output 'output'; its outputs: ['logits', 'embedding']"
    }


# --- tritonclient over HTTP and gRPC, against a real server -----------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    directory = tmp_path_factory.mktemp("multi-io")
    grpc_port = free_port()
    config = write_config(directory, SENTIMENT)
    with run_server(directory, config, env={"MODELPORT_GRPC_PORT": str(grpc_port)}) as process:
        yield f"127.0.0.1:{process.port}", f"127.0.0.1:{grpc_port}"


def _triton_inputs(module: Any) -> list[Any]:
    tensors = []
    for name, array in (("input_ids", IDS), ("attention_mask", MASK)):
        tensor = module.InferInput(name, list(array.shape), "INT64")
        tensor.set_data_from_numpy(array.astype(np.int64))
        tensors.append(tensor)
    return tensors


@pytest.mark.process
def test_tritonclient_http_binary_sends_both_inputs_and_reads_both_outputs(
    server: tuple[str, str],
) -> None:
    client = triton_http.InferenceServerClient(url=server[0])
    outputs = [
        triton_http.InferRequestedOutput(n, binary_data=True) for n in ("logits", "embedding")
    ]
    result = client.infer("sentiment", _triton_inputs(triton_http), outputs=outputs)
    client.close()

    for name, values in expected().items():
        np.testing.assert_allclose(result.as_numpy(name), values, rtol=1e-6)


@pytest.mark.process
def test_tritonclient_grpc_sends_both_inputs_and_reads_both_outputs(
    server: tuple[str, str],
) -> None:
    client = triton_grpc.InferenceServerClient(url=server[1])
    metadata = client.get_model_metadata("sentiment", as_json=True)
    result = client.infer("sentiment", _triton_inputs(triton_grpc))
    only = client.infer(
        "sentiment",
        _triton_inputs(triton_grpc),
        outputs=[triton_grpc.InferRequestedOutput("logits")],
    )
    client.close()

    assert [t["name"] for t in metadata["inputs"]] == ["input_ids", "attention_mask"]
    assert [t["name"] for t in metadata["outputs"]] == ["logits", "embedding"]
    for name, values in expected().items():
        np.testing.assert_allclose(result.as_numpy(name), values, rtol=1e-6)
    assert only.as_numpy("embedding") is None
    np.testing.assert_allclose(only.as_numpy("logits"), expected()["logits"], rtol=1e-6)


@pytest.mark.app
async def test_the_openapi_example_body_of_a_model_of_several_inputs_really_predicts(
    client: httpx.AsyncClient,
) -> None:
    spec = (await client.get("/openapi.json")).json()
    operation = spec["paths"]["/v1/models/{name}/predict"]["post"]
    example = operation["requestBody"]["content"]["application/json"]["examples"]["sentiment"]

    response = await client.post(PREDICT, json=example["value"])

    assert response.status_code == 200, response.text
    assert sorted(example["value"]["inputs"]) == ["attention_mask", "input_ids"]
    assert NPZ in operation["requestBody"]["content"]
    assert "406" in operation["responses"]


@pytest.mark.app
@pytest.mark.parametrize(
    "names",
    [[f"x{i}" for i in range(2_000)], ["x" * 40_000], ["input_ids", "attention_mask", "extra"]],
    ids=["thousands of names", "one long name", "one name too many"],
)
async def test_input_names_that_do_not_fit_are_refused_with_a_short_message(
    client: httpx.AsyncClient, names: list[str]
) -> None:
    body = {"inputs": {name: [] for name in names}}
    response = await client.post(PREDICT, json=body)

    assert response.status_code == 422, response.text
    assert len(response.content) < 1024
    assert "takes the inputs ['input_ids', 'attention_mask']" in response.json()["error"]
