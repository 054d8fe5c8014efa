"""app.client over the server's gRPC door (``grpc="HOST:PORT"``), sync and async, against a real
server process: the same answers as over HTTP, really over gRPC, the token as metadata, the
status codes as the client's typed errors; and, without a server, the client's messages read
and its answers written by the server's own gRPC codec, for every dtype."""

from __future__ import annotations

import contextlib
import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import grpc.aio
import httpx
import numpy as np
import pytest
import torch

from app.client import (
    ApiError,
    AsyncModelportClient,
    AuthenticationError,
    ConflictError,
    InvalidInputError,
    ModelportClient,
    ModelportClientError,
    NotAcceptableError,
    NotFoundError,
    PayloadTooLargeError,
    PermissionDeniedError,
    Prediction,
    ServerTimeout,
    ServerUnreachable,
    UnavailableError,
    UnsendableInputError,
)
from app.client.grpc_transport import GrpcPredictions
from app.client.tensors import WIRE_DTYPES, as_array
from app.grpc.proto import grpc_predict_v2_pb2 as pb
from app.grpc.tensors import add_output, decode_inputs
from tests.helpers import (
    API_TOKEN,
    BROKEN,
    BUNDLED,
    LINEAR,
    SAMPLE,
    SENTIMENT,
    TOKENS,
    ServerProcess,
    clean_env,
    first,
    free_port,
    metric,
    sentiment_outputs,
    wait_until,
    write_config,
)

pytestmark = pytest.mark.process

LIMIT = 64 * 1024
"""MODELPORT_MAX_BODY_BYTES of the server here: the largest gRPC message it takes."""
BATCH = np.random.default_rng(0).standard_normal((64, 10), dtype=np.float32)
INFER = "/inference.GRPCInferenceService/ModelInfer"


@dataclass(frozen=True)
class Served:
    """A server process serving linear and sentiment (and broken, which cannot serve), and the
    address of its gRPC door."""

    process: ServerProcess
    target: str

    def client(self, token: str | None = API_TOKEN) -> ModelportClient:
        return ModelportClient(self.process.url, token, grpc=self.target)

    def infer_calls(self, model: str) -> float:
        """How many ModelInfer calls on ``model`` the server answered."""
        auth = {"Authorization": f"Bearer {API_TOKEN}"}
        scrape = httpx.get(f"{self.process.url}/metrics", headers=auth, timeout=10)
        assert scrape.status_code == 200, scrape.text
        labels = {"endpoint": INFER, "model": model, "status": "200"}
        return metric(scrape.text, "modelport_requests_total", missing=0.0, **labels)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """``python -m app`` with its gRPC door on a free port, the API token required; live (not
    ready: broken cannot serve)."""
    directory = tmp_path_factory.mktemp("client-grpc")
    port, grpc_port = free_port(), free_port()
    env = clean_env(
        MODELPORT_STORE_DIR=str(directory / "store"),
        MODELPORT_GRPC_PORT=str(grpc_port),
        MODELPORT_API_TOKEN=API_TOKEN,
        MODELPORT_MAX_BODY_BYTES=str(LIMIT),
    )
    config = write_config(directory, LINEAR, SENTIMENT, BROKEN)
    args = [sys.executable, "-m", "app", "--port", str(port), "--config", str(config)]
    process = ServerProcess(args, env, port, directory / "server.log")
    try:
        wait_until(lambda: process.answers("/health/live"), 60, "live", every=0.1, server=process)
        yield Served(process, f"127.0.0.1:{grpc_port}")
    finally:
        process.stop()


@contextlib.contextmanager
def silent_door() -> Iterator[str]:
    """``HOST:PORT`` of a port that takes connections (the kernel completes them) and never
    answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield f"127.0.0.1:{sock.getsockname()[1]}"


def assert_same(got: Prediction, expected: Prediction, what: str) -> None:
    """The same model, version and outputs: arrays of the same dtype, shape and values, one or
    by name in the same order."""
    assert (got.model, got.version) == (expected.model, expected.version), what
    outputs, wanted = got.outputs, expected.outputs
    if isinstance(wanted, dict):
        assert isinstance(outputs, dict), what
        assert list(outputs) == list(wanted), what
    else:
        outputs, wanted = {"": outputs}, {"": wanted}
    for name, array in wanted.items():
        assert isinstance(outputs[name], np.ndarray), what
        assert outputs[name].dtype == array.dtype, what
        np.testing.assert_array_equal(outputs[name], array, err_msg=f"{what}: {name}")


INPUTS: dict[str, tuple[str, Any]] = {
    "float32": ("linear", BATCH),
    "big-endian float64 in Fortran order": ("linear", np.asfortranarray(BATCH.astype(">f8"))),
    "float16": ("linear", BATCH.astype(np.float16)),
    "torch bfloat16": ("linear", torch.from_numpy(BATCH).to(torch.bfloat16)),
    "linear by name": ("linear", {"input": BATCH[:3]}),
    "sentiment by name, uint8": ("sentiment", TOKENS),
    "sentiment by name, torch int64": (
        "sentiment",
        {name: torch.from_numpy(value.astype(np.int64)) for name, value in first(3).items()},
    ),
}
"""Arrays and tensors, one or by input name, in dtypes the server converts to the model's."""


# --- against a server -----------------------------------------------------------------------


def test_arrays_over_grpc_answer_as_they_do_over_http(served: Served) -> None:
    calls = {model: served.infer_calls(model) for model in ("linear", "sentiment")}
    with ModelportClient(served.process.url, API_TOKEN) as http, served.client() as over_grpc:
        answers = {
            what: (over_grpc.prediction(model, inputs), http.prediction(model, inputs))
            for what, (model, inputs) in INPUTS.items()
        }
        one = over_grpc.predict("linear", BATCH)
        by_name = over_grpc.predict("sentiment", first(5))

    for what, (got, expected) in answers.items():
        assert_same(got, expected, what)
    assert served.infer_calls("linear") == calls["linear"] + 6  # 5 of INPUTS, and one
    assert served.infer_calls("sentiment") == calls["sentiment"] + 3
    assert isinstance(one, np.ndarray)
    assert (one.shape, one.dtype) == ((64, 2), np.float32)
    np.testing.assert_allclose(one, BUNDLED.outputs(BATCH), rtol=0, atol=1e-6)
    assert isinstance(by_name, dict)
    assert list(by_name) == ["logits", "embedding"]
    for name, values in sentiment_outputs(first(5)).items():
        np.testing.assert_allclose(by_name[name], values, rtol=0, atol=1e-6)


def test_arrays_go_over_grpc_while_lists_and_postprocessed_answers_stay_on_http(
    served: Served,
) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    linear, sentiment = served.infer_calls("linear"), served.infer_calls("sentiment")

    with ModelportClient(closed, API_TOKEN, grpc=served.target) as client:
        outputs = client.predict("linear", BATCH)
        by_name = client.predict("sentiment", first(2))
        for inputs, postprocess in (([SAMPLE], None), (BATCH, True), ({"input": [SAMPLE]}, False)):
            with pytest.raises(ServerUnreachable):
                client.predict("linear", inputs, postprocess=postprocess)

    np.testing.assert_allclose(outputs, BUNDLED.outputs(BATCH), rtol=0, atol=1e-6)
    assert list(by_name) == ["logits", "embedding"]
    assert served.infer_calls("linear") == linear + 1
    assert served.infer_calls("sentiment") == sentiment + 1


async def test_the_async_client_answers_over_grpc_as_over_http_and_raises_the_same_errors(
    served: Served,
) -> None:
    url, target = served.process.url, served.target
    calls = served.infer_calls("linear")
    async with (
        AsyncModelportClient(url, API_TOKEN) as http,
        AsyncModelportClient(url, API_TOKEN, grpc=target) as over_grpc,
        AsyncModelportClient(url, grpc=target) as anonymous,
    ):
        for what, (model, inputs) in INPUTS.items():
            expected = await http.prediction(model, inputs)
            assert_same(await over_grpc.prediction(model, inputs), expected, what)
        with pytest.raises(NotFoundError) as unknown:
            await over_grpc.predict("nope", {"input": BATCH})
        with pytest.raises(InvalidInputError) as wrong_shape:
            await over_grpc.predict("linear", np.ones((2, 3), np.float32))
        with pytest.raises(AuthenticationError) as no_token:
            await anonymous.predict("linear", {"input": BATCH})

    assert served.infer_calls("linear") == calls + 5  # five of INPUTS are for linear
    assert "no model named 'nope'" in unknown.value.message
    assert "wrong sample shape" in wrong_shape.value.message
    assert no_token.value.grpc_code == "UNAUTHENTICATED"


def test_the_token_goes_as_authorization_metadata_and_is_required(served: Served) -> None:
    with served.client() as client:
        allowed = client.predict("linear", BATCH)
    refusals = {}
    for what, token in {"no token": None, "a wrong token": "x" * 40}.items():
        for form, inputs in {"one array": BATCH, "by name": {"input": BATCH}}.items():
            with served.client(token) as client, pytest.raises(AuthenticationError) as refused:
                client.predict("linear", inputs)
            refusals[what, form] = refused.value

    np.testing.assert_allclose(allowed, BUNDLED.outputs(BATCH), rtol=0, atol=1e-6)
    for (what, _), error in refusals.items():
        expected = "missing credentials" if what == "no token" else "the API token is wrong"
        assert expected in error.message
        assert (error.status, error.code, error.grpc_code) == (
            401,
            "unauthenticated",
            "UNAUTHENTICATED",
        )
        assert str(error).endswith("(gRPC UNAUTHENTICATED)")


def test_refusals_are_the_typed_errors_http_raises_with_the_servers_words(
    served: Served,
) -> None:
    nan = BATCH[:2].copy()
    nan[1, 3] = np.nan
    too_large = np.zeros((2000, 10), np.float32)  # 80 kB: over the server's 64 kB
    refused: dict[str, tuple[str, Any]] = {
        "unknown model": ("nope", BATCH),
        "unknown model by name": ("nope", {"input": BATCH}),
        "wrong shape": ("linear", np.ones((2, 3), np.float32)),
        "NaN": ("linear", nan),
        "one array for two outputs": ("sentiment", TOKENS["input_ids"]),
        "an input missing": ("sentiment", {"input_ids": TOKENS["input_ids"]}),
        "too large": ("linear", too_large),
        "a model that cannot serve": ("broken", BATCH),
    }

    errors: dict[str, tuple[ApiError, ApiError]] = {}
    with ModelportClient(served.process.url, API_TOKEN) as http, served.client() as over_grpc:
        for what, (model, inputs) in refused.items():
            with pytest.raises(ApiError) as by_grpc:
                over_grpc.predict(model, inputs)
            with pytest.raises(ApiError) as by_http:
                http.predict(model, inputs)
            errors[what] = by_grpc.value, by_http.value
        with pytest.raises(UnsendableInputError):
            over_grpc.predict("linear", np.ones((1, 10), np.complex64))

    for what, (by_grpc, by_http) in errors.items():
        assert type(by_grpc) is type(by_http), what
        assert by_grpc.status == by_http.status, what
    grpc_errors = {what: by_grpc for what, (by_grpc, _) in errors.items()}
    assert type(grpc_errors["unknown model"]) is NotFoundError
    assert grpc_errors["unknown model"].message == errors["unknown model"][1].message
    assert "no model named 'nope'" in grpc_errors["unknown model by name"].message
    assert type(grpc_errors["wrong shape"]) is InvalidInputError
    assert "wrong sample shape" in grpc_errors["wrong shape"].message
    assert grpc_errors["wrong shape"].grpc_code == "INVALID_ARGUMENT"
    assert "sample 1 holds NaN" in grpc_errors["NaN"].message
    assert type(grpc_errors["one array for two outputs"]) is NotAcceptableError
    assert grpc_errors["one array for two outputs"].message.startswith(
        "model 'sentiment' has 2 outputs (logits, embedding)"
    )
    assert "takes the inputs ['input_ids', 'attention_mask']; received ['input_ids']" in (
        grpc_errors["an input missing"].message
    )
    assert type(grpc_errors["too large"]) is PayloadTooLargeError
    assert grpc_errors["too large"].grpc_code == "RESOURCE_EXHAUSTED"
    unavailable = grpc_errors["a model that cannot serve"]
    assert type(unavailable) is UnavailableError
    assert (unavailable.grpc_code, unavailable.message) == (
        "UNAVAILABLE",
        errors["a model that cannot serve"][1].message,
    )


def test_no_grpc_door_is_unreachable_and_a_silent_one_times_out() -> None:
    closed = f"127.0.0.1:{free_port()}"
    with (
        ModelportClient(grpc=closed, timeout=5) as down,
        pytest.raises(ServerUnreachable) as unreachable,
    ):
        down.predict("linear", {"input": BATCH})
    with (
        silent_door() as target,
        ModelportClient(grpc=target, timeout=0.5) as slow,
        pytest.raises(ServerTimeout) as timed_out,
    ):
        slow.predict("linear", BATCH)

    assert f"cannot reach the gRPC door at {closed}" in unreachable.value.message
    assert f"gRPC door at {target} did not answer within the client's timeout of 0.5 s" in (
        timed_out.value.message
    )


async def test_the_async_client_finds_no_door_unreachable_and_a_silent_one_timing_out() -> None:
    closed = f"127.0.0.1:{free_port()}"
    async with AsyncModelportClient(grpc=closed, timeout=5) as down:
        with pytest.raises(ServerUnreachable):
            await down.predict("linear", BATCH)
    with silent_door() as target:
        async with AsyncModelportClient(grpc=target, timeout=0.5) as slow:
            with pytest.raises(ServerTimeout):
                await slow.predict("linear", {"input": BATCH})


# --- without a server -------------------------------------------------------------------------


def refusal(code: grpc.StatusCode, answered: bool) -> grpc.RpcError:
    """A failed call as grpc raises it: with the server's request id when the server ended it."""
    trailers = grpc.aio.Metadata(("x-request-id", "abc")) if answered else grpc.aio.Metadata()
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), trailers, "the server's words")


@pytest.mark.unit
def test_each_status_code_the_server_sends_is_the_error_its_rest_door_raises() -> None:
    predictions = GrpcPredictions("127.0.0.1:8001", None, 2.5)
    expected: dict[grpc.StatusCode, tuple[type[ModelportClientError], int]] = {
        grpc.StatusCode.INVALID_ARGUMENT: (InvalidInputError, 422),
        grpc.StatusCode.NOT_FOUND: (NotFoundError, 404),
        grpc.StatusCode.UNAUTHENTICATED: (AuthenticationError, 401),
        grpc.StatusCode.PERMISSION_DENIED: (PermissionDeniedError, 403),
        grpc.StatusCode.FAILED_PRECONDITION: (ConflictError, 409),
        grpc.StatusCode.RESOURCE_EXHAUSTED: (PayloadTooLargeError, 413),
        grpc.StatusCode.UNAVAILABLE: (UnavailableError, 503),
        grpc.StatusCode.INTERNAL: (ApiError, 500),
    }

    for code, (cls, status) in expected.items():
        error = predictions.failure(refusal(code, answered=True))
        assert type(error) is cls, code
        assert isinstance(error, ApiError)
        assert (error.message, error.status, error.grpc_code) == (
            "the server's words",
            status,
            code.name,
        )
    server_timeout = predictions.failure(refusal(grpc.StatusCode.DEADLINE_EXCEEDED, True))
    client_timeout = predictions.failure(refusal(grpc.StatusCode.DEADLINE_EXCEEDED, False))
    no_connection = predictions.failure(refusal(grpc.StatusCode.UNAVAILABLE, answered=False))

    assert type(server_timeout) is ServerTimeout
    assert server_timeout.message == "the server's words"
    assert type(client_timeout) is ServerTimeout
    assert "did not answer within the client's timeout of 2.5 s" in client_timeout.message
    assert type(no_connection) is ServerUnreachable
    assert no_connection.message == (
        "cannot reach the gRPC door at 127.0.0.1:8001: the server's words"
    )


def wire_values(dtype: str) -> np.ndarray:
    """Values of ``dtype`` (a name of WIRE_DTYPES; bfloat16 as float32) exact in it, 2 x 3."""
    if dtype == "bool":
        return np.array([[True, False, True], [False, False, True]])
    held = np.float32 if dtype == "bfloat16" else np.dtype(dtype)
    return np.array([[0, 1, 2], [3, 100, 127]]).astype(held)


@pytest.mark.unit
@pytest.mark.parametrize("dtype", sorted(WIRE_DTYPES))
def test_the_server_reads_the_clients_tensors_and_the_client_its_answers_in_every_dtype(
    dtype: str,
) -> None:
    values = wire_values(dtype)
    tensor = torch.from_numpy(values)
    if dtype == "bfloat16":
        tensor = tensor.to(torch.bfloat16)
    sent = as_array(tensor)
    assert sent is not None
    predictions = GrpcPredictions("127.0.0.1:8001", None, 1.0)
    request = predictions.infer_request("m", {"x": sent})
    answer = pb.ModelInferResponse(model_name="m", model_version="v1")
    add_output(answer, "y", tensor, raw=True)

    read, raw = decode_inputs(request)
    got = predictions.prediction_of(answer, named=True)

    assert raw
    assert request.inputs[0].datatype == WIRE_DTYPES[dtype].datatype
    assert (got.model, got.version, list(got.outputs)) == ("m", "v1", ["y"])
    for array in (read["x"], got.outputs["y"]):
        assert array.dtype == values.dtype
        np.testing.assert_array_equal(array, values)


@pytest.mark.unit
def test_an_unnamed_array_goes_as_the_models_one_input_and_asks_for_its_one_output() -> None:
    predictions = GrpcPredictions("127.0.0.1:8001", None, 1.0)
    tensor = as_array(BATCH)
    assert tensor is not None
    tensors = pb.ModelMetadataResponse.TensorMetadata

    def described(inputs: list[str], outputs: list[str]) -> pb.ModelMetadataResponse:
        return pb.ModelMetadataResponse(
            inputs=[tensors(name=name) for name in inputs],
            outputs=[tensors(name=name) for name in outputs],
        )

    asked = predictions.metadata_request("m", tensor)
    for model, inputs, outputs in (
        ("m", ["x"], ["y"]),
        ("two in", ["a", "b"], ["y"]),
        ("two out", ["x"], ["y", "z"]),
    ):
        predictions.learn(model, described(inputs, outputs))
    request = predictions.infer_request("m", tensor)
    with pytest.raises(InvalidInputError) as two_inputs:
        predictions.infer_request("two in", tensor)
    with pytest.raises(NotAcceptableError) as two_outputs:
        predictions.infer_request("two out", tensor)

    assert asked == pb.ModelMetadataRequest(name="m")
    assert predictions.metadata_request("m", tensor) is None  # asked once
    assert predictions.metadata_request("other", {"x": tensor}) is None  # named: nothing to ask
    assert [(i.name, i.datatype, list(i.shape)) for i in request.inputs] == [
        ("x", "FP32", [64, 10])
    ]
    assert [output.name for output in request.outputs] == ["y"]
    assert request.raw_input_contents == [BATCH.tobytes()]
    assert two_inputs.value.message == (
        "model 'two in' takes 2 inputs by name (a, b); received one unnamed input"
    )
    assert (two_outputs.value.status, two_outputs.value.code) == (406, "not_acceptable")
    assert two_outputs.value.message.startswith("model 'two out' has 2 outputs (y, z)")
