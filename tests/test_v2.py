"""Open Inference Protocol (V2): the protocol's details against the app in-process, then
tritonclient (the official client) against a real server process."""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import ml_dtypes
import numpy as np
import pytest
import torch
import tritonclient.http as triton
from torch import nn
from tritonclient.utils import InferenceServerException

from app.serving.catalog import register
from tests.helpers import (
    AUTH,
    BROKEN,
    BUNDLED,
    DIGITS,
    LINEAR,
    SAMPLE,
    TOKEN,
    ServerProcess,
    linear_weights,
    make_settings,
    run_server,
    serve_in_process,
    upload,
    wait_until,
    write_config,
)

HEADER = "Inference-Header-Content-Length"
INTEGERS = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]


@register(
    "v2-bool-sum",
    input_shape=(4,),
    input_dtype=torch.bool,
    output_shape=(1,),
    example_input=[True, False, True, False],
)
class BoolSum(nn.Module):
    """Weighted count of the true entries: a model that takes BOOL tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() * self.weight).sum(dim=1, keepdim=True)


def tensor(data: Any, datatype: str = "FP32", shape: list[int] | None = None) -> dict[str, Any]:
    return {
        "name": "input",
        "datatype": datatype,
        "shape": shape or list(np.shape(data)),
        "data": data,
    }


def binary_body(header: dict[str, Any], *tensors: bytes) -> tuple[bytes, dict[str, str]]:
    """A binary-extension body (JSON header, then the tensors) and its header-length header."""
    text = json.dumps(header).encode()
    return text + b"".join(tensors), {HEADER: str(len(text))}


def encode(values: list[Any], datatype: str) -> bytes:
    array = np.asarray(values, np.float32)
    if datatype == "BF16":
        return (array.view(np.uint32) >> 16).astype("<u2").tobytes()
    numpy_types = {"FP16": "<f2", "FP32": "<f4", "FP64": "<f8", "BOOL": "?"}
    return np.asarray(values).astype(numpy_types.get(datatype, datatype.lower())).tobytes()


def split(response: httpx.Response) -> tuple[dict[str, Any], bytes]:
    """The JSON header and the binary tail of an inference answer."""
    length = int(response.headers.get(HEADER, len(response.content)))
    header: dict[str, Any] = json.loads(response.content[:length])
    return header, response.content[length:]


# --- the protocol, in-process -----------------------------------------------------------------


async def test_server_metadata_names_the_server_and_its_extensions(
    client: httpx.AsyncClient,
) -> None:
    response = await client.get("/v2")
    assert response.status_code == 200
    assert response.json() == {
        "name": "modelport",
        "version": "0.1.0",
        "extensions": [
            "binary_tensor_data",
            "model_configuration",
            "model_repository",
            "statistics",
        ],
    }


async def test_health_answers_200_with_the_json_bodies_both_official_clients_read(
    client: httpx.AsyncClient,
) -> None:
    live = await client.get("/v2/health/live")
    ready = await client.get("/v2/health/ready")
    model_ready = await client.get("/v2/models/digits/ready")
    assert (live.status_code, live.json()) == (200, {"live": True})
    assert (ready.status_code, ready.json()) == (200, {"ready": True})
    assert (model_ready.status_code, model_ready.json()) == (200, {"name": "digits", "ready": True})


@pytest.mark.app
async def test_a_model_that_cannot_serve_answers_503_with_an_error(tmp_path: Path) -> None:
    async with serve_in_process(make_settings(tmp_path, LINEAR, BROKEN)) as client:
        ready = await client.get("/v2/health/ready")
        model_ready = await client.get("/v2/models/broken/ready")
        healthy = await client.get("/v2/models/linear/ready")
        infer = await client.post("/v2/models/broken/infer", json={"inputs": [tensor([SAMPLE])]})
    assert ready.status_code == 503
    assert ready.json()["ready"] is False
    assert "broken: " in ready.json()["error"]
    assert model_ready.status_code == 503
    assert model_ready.json()["ready"] is False
    assert "missing keys" in model_ready.json()["error"]
    assert healthy.status_code == 200
    assert infer.status_code == 503
    assert set(infer.json()) == {"error"}


@pytest.mark.parametrize(
    ("model", "input_shape", "output_shape"),
    [("linear", [-1, 10], [-1, 2]), ("digits", [-1, 8, 8], [-1, 10])],
)
async def test_model_metadata_gives_the_real_tensors_and_the_versions(
    client: httpx.AsyncClient, model: str, input_shape: list[int], output_shape: list[int]
) -> None:
    response = await client.get(f"/v2/models/{model}")
    version = (await client.get(f"/v1/models/{model}")).json()["version"]
    assert response.status_code == 200
    assert response.json() == {
        "name": model,
        "versions": [version],
        "platform": "pytorch_statedict",
        "inputs": [{"name": "input", "datatype": "FP32", "shape": input_shape}],
        "outputs": [{"name": "output", "datatype": "FP32", "shape": output_shape}],
    }


async def test_json_inference_echoes_the_id_and_names_the_model_and_version(
    client: httpx.AsyncClient,
) -> None:
    batch = [SAMPLE, INTEGERS]
    response = await client.post(
        "/v2/models/linear/infer", json={"id": "req-42", "inputs": [tensor(batch)]}
    )
    version = (await client.get("/v1/models/linear")).json()["version"]
    body = response.json()
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert HEADER.lower() not in response.headers
    assert body["id"] == "req-42"
    assert (body["model_name"], body["model_version"]) == ("linear", version)
    [output] = body["outputs"]
    assert (output["name"], output["datatype"], output["shape"]) == ("output", "FP32", [2, 2])
    assert np.allclose(np.reshape(output["data"], (2, 2)), BUNDLED.outputs(batch), atol=1e-6)


@pytest.mark.parametrize("datatype", ["FP16", "BF16", "FP32", "FP64"])
@pytest.mark.parametrize("encoding", ["json", "binary"])
async def test_every_float_datatype_is_accepted_as_json_and_as_binary(
    client: httpx.AsyncClient, datatype: str, encoding: str
) -> None:
    body, headers = _request([SAMPLE], datatype, encoding)
    response = await client.post("/v2/models/linear/infer", content=body, headers=headers)
    assert response.status_code == 200, response.text
    data = response.json()["outputs"][0]["data"]
    assert np.allclose(np.reshape(data, (1, 2)), BUNDLED.outputs([SAMPLE]), atol=1e-6)


@pytest.mark.parametrize(
    "datatype", ["UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64"]
)
@pytest.mark.parametrize("encoding", ["json", "binary"])
async def test_every_integer_datatype_is_accepted_as_json_and_as_binary(
    client: httpx.AsyncClient, datatype: str, encoding: str
) -> None:
    body, headers = _request([INTEGERS], datatype, encoding)
    response = await client.post("/v2/models/linear/infer", content=body, headers=headers)
    assert response.status_code == 200, response.text
    data = response.json()["outputs"][0]["data"]
    assert np.allclose(np.reshape(data, (1, 2)), BUNDLED.outputs([INTEGERS]), atol=1e-5)


def _request(batch: list[list[Any]], datatype: str, encoding: str) -> tuple[bytes, dict[str, str]]:
    shape = [len(batch), len(batch[0])]
    if encoding == "json":
        return json.dumps({"inputs": [tensor(batch, datatype)]}).encode(), {}
    raw = encode(batch, datatype)
    meta = {"name": "input", "datatype": datatype, "shape": shape}
    return binary_body({"inputs": [{**meta, "parameters": {"binary_data_size": len(raw)}}]}, raw)


@pytest.mark.parametrize(
    ("request_level", "per_output", "binary"),
    [
        (None, None, False),
        (True, None, True),
        (True, False, False),
        (None, True, True),
        (False, True, True),
    ],
)
async def test_outputs_are_binary_as_binary_data_output_and_binary_data_ask(
    client: httpx.AsyncClient, request_level: bool | None, per_output: bool | None, binary: bool
) -> None:
    request: dict[str, Any] = {"inputs": [tensor([SAMPLE, SAMPLE])]}
    if request_level is not None:
        request["parameters"] = {"binary_data_output": request_level}
    if per_output is not None:
        request["outputs"] = [{"name": "output", "parameters": {"binary_data": per_output}}]
    response = await client.post("/v2/models/linear/infer", json=request)
    header, tail = split(response)
    [output] = header["outputs"]
    expected = BUNDLED.outputs([SAMPLE, SAMPLE])
    assert response.status_code == 200
    if binary:
        assert response.headers["content-type"] == "application/octet-stream"
        assert output["parameters"] == {"binary_data_size": 16}
        assert "data" not in output
        assert np.allclose(np.frombuffer(tail, "<f4").reshape(2, 2), expected, atol=1e-6)
    else:
        assert HEADER.lower() not in response.headers
        assert np.allclose(np.reshape(output["data"], (2, 2)), expected, atol=1e-6)


async def test_a_raw_binary_body_is_one_sample_and_answers_binary(
    client: httpx.AsyncClient,
) -> None:
    raw = np.asarray(SAMPLE, "<f4").tobytes()
    response = await client.post("/v2/models/linear/infer", content=raw, headers={HEADER: "0"})
    header, tail = split(response)
    assert response.status_code == 200
    assert header["model_name"] == "linear"
    assert header["outputs"][0]["shape"] == [1, 2]
    assert np.allclose(np.frombuffer(tail, "<f4"), BUNDLED.outputs([SAMPLE])[0], atol=1e-6)


@pytest.mark.parametrize(
    ("encoding", "compress"), [("gzip", gzip.compress), ("deflate", zlib.compress)]
)
async def test_gzip_and_deflate_bodies_are_inflated_with_or_without_a_content_type(
    client: httpx.AsyncClient, encoding: str, compress: Any
) -> None:
    body, headers = _request([SAMPLE], "FP32", "binary")
    for content_type in ({}, {"Content-Type": "application/octet-stream"}):
        response = await client.post(
            "/v2/models/linear/infer",
            content=compress(body),
            headers={**headers, **content_type, "Content-Encoding": encoding},
        )
        assert response.status_code == 200, response.text
        data = response.json()["outputs"][0]["data"]
        assert np.allclose(data, BUNDLED.outputs([SAMPLE])[0], atol=1e-6)


async def test_a_body_that_inflates_past_the_limit_is_refused(client: httpx.AsyncClient) -> None:
    bomb = gzip.compress(b" " * (17 * 1024 * 1024))
    response = await client.post(
        "/v2/models/linear/infer", content=bomb, headers={"Content-Encoding": "gzip"}
    )
    assert response.status_code == 413
    assert set(response.json()) == {"error"}


def _valid(**changes: Any) -> bytes:
    return json.dumps({"inputs": [{**tensor([SAMPLE]), **changes}]}).encode()


_FP16 = np.ones(10, "<f2").tobytes()
BAD_REQUESTS: dict[str, tuple[bytes, dict[str, str], str]] = {
    "malformed JSON": (b'{"inputs": [', {}, "malformed JSON"),
    "not an object": (b"[1, 2]", {}, "must be a JSON object"),
    "no inputs": (b'{"inputs": []}', {}, "inputs"),
    # each field in a type the schema refuses (they pass the quick type check to pydantic)
    "inputs not objects": (b'{"inputs": [5]}', {}, "inputs.0"),
    "parameters null": (_valid()[:-1] + b', "parameters": null}', {}, "parameters"),
    "id not a string": (_valid()[:-1] + b', "id": 5}', {}, "id"),
    "outputs not a list": (_valid()[:-1] + b', "outputs": {}}', {}, "outputs"),
    "shape not counts": (_valid(shape=[1, "ten"]), {}, "shape"),
    "name not a string": (_valid(name=None), {}, "inputs.0.name"),
    "wrong input name": (_valid(name="x"), {}, "one input named 'input'"),
    "wrong sample shape": (_valid(data=[[1, 2, 3]], shape=[1, 3]), {}, "wrong sample shape"),
    "data and shape disagree": (_valid(shape=[1, 9]), {}, "holds 9 values"),
    "no batch dimension": (_valid(data=[1], shape=[]), {}, "batch dimension"),
    "NaN": (_valid(data=[[*SAMPLE[:9], float("nan")]]), {}, "NaN"),
    "strings": (_valid(data=[["a"] * 10]), {}, "must hold numbers"),
    "booleans for a float model": (_valid(datatype="BOOL", data=[[True] * 10]), {}, "booleans"),
    "integer out of range": (_valid(datatype="INT8", data=[[300] * 10]), {}, "[-128, 127]"),
    "BYTES": (_valid(datatype="BYTES", data=[["a"] * 10]), {}, "BYTES"),
    "unknown datatype": (_valid(datatype="FP8"), {}, "unknown datatype"),
    "negative shape": (_valid(shape=[-1, 10]), {}, "non-negative"),
    "too many samples": (_valid(data=[SAMPLE] * 257, shape=[257, 10]), {}, "too many samples"),
    "unknown output": (
        json.dumps({"inputs": [tensor([SAMPLE])], "outputs": [{"name": "logits"}]}).encode(),
        {},
        "no output 'logits'",
    ),
    "binary size does not fit the shape": (
        *binary_body(
            {"inputs": [{**tensor(None, "FP16", [1, 10]), "parameters": {"binary_data_size": 8}}]},
            _FP16[:8],
        ),
        "needs 20 bytes",
    ),
    "binary data missing": (
        *binary_body(
            {"inputs": [{**tensor(None, "FP16", [1, 10]), "parameters": {"binary_data_size": 20}}]}
        ),
        "only 0 follow",
    ),
    "bytes nobody claims": (*binary_body({"inputs": [tensor([SAMPLE])]}, b"\0\0"), "2 bytes"),
    "header length not a number": (_valid(), {HEADER: "ten"}, HEADER),
    "header length past the body": (_valid(), {HEADER: "99999"}, HEADER),
    "raw body of the wrong size": (b"\0" * 12, {HEADER: "0"}, "needs 40 bytes"),
    "not gzip": (_valid(), {"Content-Encoding": "gzip"}, "not valid gzip"),
    "unsupported encoding": (_valid(), {"Content-Encoding": "br"}, "Content-Encoding"),
}


async def test_a_header_in_types_the_schema_converts_is_served(client: httpx.AsyncClient) -> None:
    body = json.dumps({"id": None, "inputs": [{**tensor([SAMPLE]), "shape": ["1", "10"]}]}).encode()
    response = await client.post("/v2/models/linear/infer", content=body)
    assert response.status_code == 200, response.text
    assert response.json()["outputs"][0]["shape"] == [1, 2]


@pytest.mark.parametrize("case", BAD_REQUESTS)
async def test_bad_requests_answer_400_with_only_the_protocol_error_field(
    client: httpx.AsyncClient, case: str
) -> None:
    body, headers, message = BAD_REQUESTS[case]
    response = await client.post("/v2/models/linear/infer", content=body, headers=headers)
    assert response.status_code == 400, response.text
    assert list(response.json()) == ["error"]
    assert message in response.json()["error"]


@pytest.mark.parametrize(
    "path",
    [
        "/v2/models/nope",
        "/v2/models/nope/ready",
        "/v2/models/linear/versions/0123456789ab",
        "/v2/models/linear/versions/0123456789ab/ready",
        "/v2/models/linear/versions/latest",
    ],
)
async def test_unknown_models_and_versions_answer_404(client: httpx.AsyncClient, path: str) -> None:
    response = await client.get(path)
    infer = await client.post(f"{path.removesuffix('/ready')}/infer", json={"inputs": []})
    assert response.status_code == 404
    assert list(response.json()) == ["error"]
    assert infer.status_code == 404


@pytest.mark.app
async def test_bool_tensors_reach_a_model_that_takes_them(tmp_path: Path) -> None:
    torch.save(BoolSum().state_dict(), tmp_path / "bool.pth")
    model = {"name": "flags", "class": "v2-bool-sum", "weights": str(tmp_path / "bool.pth")}
    flags = [[True, False, True, True], [False, False, False, False]]
    raw = np.asarray(flags).tobytes()
    binary, headers = binary_body(
        {"inputs": [{**tensor(None, "BOOL", [2, 4]), "parameters": {"binary_data_size": 8}}]}, raw
    )
    async with serve_in_process(make_settings(tmp_path, model)) as client:
        metadata = (await client.get("/v2/models/flags")).json()
        as_json = await client.post(
            "/v2/models/flags/infer", json={"inputs": [tensor(flags, "BOOL")]}
        )
        as_binary = await client.post("/v2/models/flags/infer", content=binary, headers=headers)
        numbers = await client.post("/v2/models/flags/infer", json={"inputs": [tensor([[1] * 4])]})
    assert metadata["inputs"] == [{"name": "input", "datatype": "BOOL", "shape": [-1, 4]}]
    assert as_json.json()["outputs"][0]["data"] == [3.0, 0.0]
    assert as_binary.json()["outputs"][0]["data"] == [3.0, 0.0]
    assert numbers.status_code == 400
    assert "takes booleans" in numbers.json()["error"]


@pytest.mark.app
async def test_version_routes_serve_a_stored_version_loaded_on_demand(tmp_path: Path) -> None:
    one = linear_weights(1)
    request = {"inputs": [tensor([SAMPLE])]}
    async with serve_in_process(make_settings(tmp_path, LINEAR, admin_token=TOKEN)) as client:
        stored = await client.put(
            "/v1/models/linear/weights",
            content=one.data,
            headers=AUTH,
            params={"activate": "false"},
        )
        version = stored.json()["version"]
        metadata = await client.get("/v2/models/linear")
        version_metadata = await client.get(f"/v2/models/linear/versions/{version}")
        not_loaded = await client.get(f"/v2/models/linear/versions/{version}/ready")
        pinned = await client.post(f"/v2/models/linear/versions/{version}/infer", json=request)
        ready = await client.get(f"/v2/models/linear/versions/{version}/ready")
        active = await client.post("/v2/models/linear/infer", json=request)
    assert stored.status_code == 201
    assert version in metadata.json()["versions"]
    assert len(metadata.json()["versions"]) == 2
    assert version_metadata.status_code == 200
    assert version_metadata.json()["inputs"] == metadata.json()["inputs"]
    assert not_loaded.status_code == 503  # readiness is a pure read: it loads nothing
    assert "not loaded" in not_loaded.json()["error"]
    assert ready.json() == {"name": "linear", "ready": True}
    assert pinned.json()["model_version"] == version
    pinned_data = pinned.json()["outputs"][0]["data"]
    assert np.allclose(pinned_data, one.outputs([SAMPLE])[0], atol=1e-6)
    assert active.json()["model_version"] != version
    assert np.allclose(active.json()["outputs"][0]["data"], BUNDLED.outputs([SAMPLE])[0], atol=1e-6)


@pytest.mark.app
async def test_the_api_token_guards_inference_and_metadata_but_not_health(
    tmp_path: Path,
) -> None:
    async with serve_in_process(make_settings(tmp_path, LINEAR, api_token=TOKEN)) as client:
        refused = await client.post("/v2/models/linear/infer", json={"inputs": [tensor([SAMPLE])]})
        metadata = await client.get("/v2/models/linear")
        extensions = [
            await client.get("/v2/models/linear/config"),
            await client.get("/v2/models/stats"),
            await client.get("/v2/models/linear/stats"),
            await client.post("/v2/repository/index"),
        ]
        allowed = await client.get("/v2/models/linear", headers=AUTH)
        ready = await client.get("/v2/health/ready")
    assert refused.status_code == 401
    assert list(refused.json()) == ["error"]
    assert metadata.status_code == 401
    assert [answer.status_code for answer in extensions] == [401] * 4
    assert allowed.status_code == 200
    assert ready.status_code == 200


@pytest.mark.app
@pytest.mark.parametrize(
    "path",
    [
        "/v2/models/nope/config",
        "/v2/models/linear/versions/0123456789ab/config",
        "/v2/models/nope/stats",
        "/v2/models/linear/versions/0123456789ab/stats",
    ],
)
async def test_configuration_and_statistics_of_unknown_models_and_versions_answer_404(
    client: httpx.AsyncClient, path: str
) -> None:
    response = await client.get(path)
    assert response.status_code == 404, response.text
    assert list(response.json()) == ["error"]


@pytest.mark.app
async def test_repository_index_ready_filter_leaves_out_a_model_that_cannot_serve(
    tmp_path: Path,
) -> None:
    async with serve_in_process(make_settings(tmp_path, LINEAR, BROKEN)) as client:
        every = await client.post("/v2/repository/index")
        ready = await client.post("/v2/repository/index", json={"ready": True})
        malformed = await client.post("/v2/repository/index", json={"ready": "maybe"})
    states = {entry["name"]: entry["state"] for entry in every.json()}
    assert states == {"linear": "READY", BROKEN["name"]: "UNAVAILABLE"}
    assert [entry["reason"] for entry in every.json() if entry["state"] != "READY"] != [""]
    assert [entry["name"] for entry in ready.json()] == ["linear"]
    assert malformed.status_code == 400, malformed.text


# --- tritonclient against a real server process -----------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    directory = tmp_path_factory.mktemp("v2-server")
    config = write_config(directory, LINEAR, DIGITS)
    with run_server(directory, config, env={"MODELPORT_ADMIN_TOKEN": TOKEN}) as process:
        yield process


@pytest.fixture
def triton_client(server: ServerProcess) -> Iterator[triton.InferenceServerClient]:
    client = triton.InferenceServerClient(url=f"127.0.0.1:{server.port}")
    yield client
    client.close()


@pytest.mark.process
def test_tritonclient_reads_health_readiness_and_metadata(
    triton_client: triton.InferenceServerClient,
) -> None:
    assert triton_client.is_server_live()
    assert triton_client.is_server_ready()
    assert triton_client.is_model_ready("digits")
    assert not triton_client.is_model_ready("nope")
    extensions = triton_client.get_server_metadata()["extensions"]
    assert extensions == [
        "binary_tensor_data",
        "model_configuration",
        "model_repository",
        "statistics",
    ]
    metadata = triton_client.get_model_metadata("digits")
    assert metadata["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 8, 8]}]
    assert metadata["outputs"] == [{"name": "output", "datatype": "FP32", "shape": [-1, 10]}]


@pytest.mark.process
@pytest.mark.parametrize(
    ("datatype", "binary_input"),
    [("FP32", True), ("FP32", False), ("FP16", True), ("FP16", False), ("BF16", True)],
)
@pytest.mark.parametrize("binary_output", [True, False])
def test_tritonclient_infers_with_json_and_binary_tensors(
    triton_client: triton.InferenceServerClient,
    datatype: str,
    binary_input: bool,
    binary_output: bool,
) -> None:
    batch = np.array([SAMPLE, INTEGERS], np.float32)
    numpy_type = {"FP32": np.float32, "FP16": np.float16, "BF16": ml_dtypes.bfloat16}[datatype]
    tensor_in = triton.InferInput("input", list(batch.shape), datatype)
    tensor_in.set_data_from_numpy(batch.astype(numpy_type), binary_data=binary_input)
    wanted = triton.InferRequestedOutput("output", binary_data=binary_output)
    result = triton_client.infer("linear", [tensor_in], outputs=[wanted], request_id="7")
    response = result.get_response()
    assert (response["model_name"], response["id"]) == ("linear", "7")
    assert response["model_version"]
    assert ("parameters" in response["outputs"][0]) is binary_output
    assert np.allclose(result.as_numpy("output"), BUNDLED.outputs(batch.tolist()), atol=1e-5)


@pytest.mark.process
@pytest.mark.parametrize("compression", ["gzip", "deflate"])
def test_tritonclient_compressed_requests_and_default_binary_outputs(
    triton_client: triton.InferenceServerClient, compression: str
) -> None:
    tensor_in = triton.InferInput("input", [1, 10], "FP32")
    tensor_in.set_data_from_numpy(np.array([SAMPLE], np.float32))
    result = triton_client.infer("linear", [tensor_in], request_compression_algorithm=compression)
    assert np.allclose(result.as_numpy("output"), BUNDLED.outputs([SAMPLE]), atol=1e-6)


@pytest.mark.process
def test_tritonclient_errors_carry_the_server_message(
    triton_client: triton.InferenceServerClient,
) -> None:
    tensor_in = triton.InferInput("input", [1, 3], "FP32")
    tensor_in.set_data_from_numpy(np.ones((1, 3), np.float32))
    with pytest.raises(InferenceServerException) as refused:
        triton_client.infer("linear", [tensor_in])
    with pytest.raises(InferenceServerException) as unknown:
        triton_client.get_model_metadata("nope")
    assert refused.value.status() == "400"
    assert "wrong sample shape" in str(refused.value.message())
    assert unknown.value.status() == "404"
    assert "no model named 'nope'" in str(unknown.value.message())


@pytest.mark.process
def test_tritonclient_versioned_request_is_served_by_that_version(
    server: ServerProcess, triton_client: triton.InferenceServerClient
) -> None:
    two = linear_weights(2)
    stored = upload(server, two.data, activate="false")
    version = stored.json()["version"]
    tensor_in = triton.InferInput("input", [1, 10], "FP16")
    tensor_in.set_data_from_numpy(np.array([SAMPLE], np.float16))

    pinned = triton_client.infer("linear", [tensor_in], model_version=version)
    active = triton_client.infer("linear", [tensor_in])

    assert stored.status_code == 201, stored.text
    assert triton_client.is_model_ready("linear", model_version=version)
    assert not triton_client.is_model_ready("linear", model_version="0123456789ab")
    assert version in triton_client.get_model_metadata("linear", model_version=version)["versions"]
    assert pinned.get_response()["model_version"] == version
    expected = two.outputs([SAMPLE])
    assert np.allclose(pinned.as_numpy("output"), expected, atol=1e-6)
    assert active.get_response()["model_version"] != version


@pytest.mark.process
def test_tritonclient_reads_the_model_configuration_and_the_repository_index(
    triton_client: triton.InferenceServerClient,
) -> None:
    config = triton_client.get_model_config("digits")
    index = triton_client.get_model_repository_index()
    ready = triton_client.get_model_metadata("digits")["versions"][-1]

    assert config["name"] == "digits"
    assert config["max_batch_size"] == 32  # the shipped batching defaults
    assert config["input"] == [{"name": "input", "data_type": "TYPE_FP32", "dims": [8, 8]}]
    assert config["output"] == [{"name": "output", "data_type": "TYPE_FP32", "dims": [10]}]
    assert config["dynamic_batching"]["max_queue_delay_microseconds"] == 2000
    assert config["dynamic_batching"]["default_queue_policy"]["max_queue_size"] == 1024
    assert {entry["name"]: entry["state"] for entry in index} == {
        "linear": "READY",
        "digits": "READY",
    }
    assert ready in {entry["version"] for entry in index}


def _linear_statistics(client: triton.InferenceServerClient) -> dict[str, Any]:
    [stats] = [
        entry
        for entry in client.get_inference_statistics("linear")["model_stats"]
        if entry["version"] == BUNDLED.version
    ]
    return stats


@pytest.mark.process
def test_tritonclient_statistics_count_the_requests_and_forwards_served(
    tmp_path: Path,
) -> None:
    config = write_config(tmp_path, LINEAR)
    with run_server(tmp_path, config) as process:
        client = triton.InferenceServerClient(url=f"127.0.0.1:{process.port}")
        before = _linear_statistics(client)
        good = triton.InferInput("input", [2, 10], "FP32")
        good.set_data_from_numpy(np.array([SAMPLE, INTEGERS], np.float32))
        bad = triton.InferInput("input", [1, 3], "FP32")
        bad.set_data_from_numpy(np.ones((1, 3), np.float32))
        for _ in range(3):
            client.infer("linear", [good])
        with pytest.raises(InferenceServerException):
            client.infer("linear", [bad])
        after = _linear_statistics(client)
        client.close()

    def gained(statistic: str) -> int:
        count: int = after["inference_stats"][statistic]["count"]
        return count - before["inference_stats"][statistic]["count"]

    assert before["inference_count"] == 0  # a fresh server: nothing counted yet
    assert (gained("success"), gained("fail")) == (3, 1)
    assert gained("queue") == gained("compute_infer") == 3
    assert after["inference_count"] == 6  # samples
    assert after["execution_count"] == 3  # one forward each: nothing else was queued
    assert after["inference_stats"]["compute_infer"]["ns"] > 0
    assert after["last_inference"] > 0
    [batch] = after["batch_stats"]
    assert (batch["batch_size"], batch["compute_infer"]["count"]) == (2, 3)


@pytest.mark.process
def test_statistics_add_up_every_worker(tmp_path: Path) -> None:
    """Each request on a new connection: the kernel spreads them over both workers (all 20 on
    one: odds of 2**-19), and whichever answers the statistics reports the sum."""
    config = write_config(tmp_path, LINEAR)
    with run_server(tmp_path, config, "--workers", "2") as process:
        base = f"http://127.0.0.1:{process.port}"
        for _ in range(20):
            answer = httpx.post(f"{base}/v1/models/linear/predict", json={"inputs": [SAMPLE]})
            assert answer.status_code == 200, answer.text

        def success() -> int:
            stats = httpx.get(f"{base}/v2/models/linear/stats").json()["model_stats"]
            return sum(entry["inference_stats"]["success"]["count"] for entry in stats)

        wait_until(lambda: success() == 20, 5.0, "both workers' successes counted")


@pytest.mark.process
def test_tritonclient_json_tensors_of_many_floats_answer_as_binary_ones(
    triton_client: triton.InferenceServerClient,
) -> None:
    """A JSON request of many floats is read straight into arrays (app.codecs.float_json): the
    same outputs as the same tensor sent binary."""
    batch = np.random.default_rng(11).normal(size=(64, 10)).astype(np.float32)
    outputs = []
    for binary in (False, True):
        tensor_in = triton.InferInput("input", list(batch.shape), "FP32")
        tensor_in.set_data_from_numpy(batch, binary_data=binary)
        outputs.append(triton_client.infer("linear", [tensor_in]).as_numpy("output"))
    np.testing.assert_array_equal(outputs[0], outputs[1])
    assert np.allclose(outputs[0], BUNDLED.outputs(batch.tolist()), atol=1e-5)
