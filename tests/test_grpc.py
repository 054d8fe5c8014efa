"""The Open Inference Protocol's gRPC door against real server processes, with tritonclient.grpc
(sync and aio) and the generated stubs: health, metadata, inference with raw and typed tensors
(the same numbers as native predict), versions, the API token, the protocol's status codes,
the message size bound, metrics, workers and draining. No JSON on the gRPC path."""

from __future__ import annotations

import asyncio
import contextlib
import filecmp
import importlib.util
import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton
import tritonclient.grpc.aio as triton_aio
import tritonclient.http as triton_http
from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, EnumDescriptor
from tritonclient.grpc import model_config_pb2 as triton_config
from tritonclient.grpc import service_pb2 as triton_service
from tritonclient.utils import InferenceServerException

from app.errors import (
    Forbidden,
    FrameworkError,
    InvalidInput,
    ModelportError,
    WeightsUnreadable,
)
from app.grpc.errors import Refusal, refusal
from app.grpc.proto import extensions_pb2, health_pb2, health_pb2_grpc
from app.grpc.proto import grpc_predict_v2_pb2 as pb
from app.grpc.proto import grpc_predict_v2_pb2_grpc as pb_grpc
from models.bench import CNN
from tests.helpers import (
    API_TOKEN,
    BUNDLED,
    DIGITS,
    LINEAR,
    ROOT,
    SAMPLE,
    TOKEN,
    PeakRss,
    ServerProcess,
    free_port,
    linear_weights,
    metric,
    run_server,
    saved,
    seeded_state_dict,
    socket_inodes,
    upload,
    wait_until,
    worker_pids,
    write_config,
)

pytestmark = pytest.mark.process

LIMIT = 64 * 1024
"""MODELPORT_MAX_BODY_BYTES of the servers here: the largest gRPC message they take."""
INTEGERS = [float(i) for i in range(1, 11)]
"""A second input of ``linear`` (exact in every float type)."""
BATCH = np.array([SAMPLE, INTEGERS], np.float32)
API_AUTH = {"authorization": f"Bearer {API_TOKEN}"}
METADATA = tuple(API_AUTH.items())
SERVICE = "inference.GRPCInferenceService"


@dataclass(frozen=True)
class Served:
    """A server process and the address of its gRPC door."""

    process: ServerProcess
    target: str


@contextlib.contextmanager
def serve(directory: Path, *extra: str, **variables: str) -> Iterator[Served]:
    """``python -m app`` serving linear and digits, its gRPC door on a free port, the API token
    required."""
    port = free_port()
    env = {
        "MODELPORT_GRPC_PORT": str(port),
        "MODELPORT_ADMIN_TOKEN": TOKEN,
        "MODELPORT_API_TOKEN": API_TOKEN,
        "MODELPORT_MAX_BODY_BYTES": str(LIMIT),
        **variables,
    }
    config = write_config(directory, LINEAR, DIGITS)
    with run_server(directory, config, *extra, env=env) as process:
        yield Served(process, f"127.0.0.1:{port}")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    with serve(tmp_path_factory.mktemp("grpc-server")) as found:
        yield found


@pytest.fixture
def client(served: Served) -> Iterator[triton.InferenceServerClient]:
    client = triton.InferenceServerClient(url=served.target)
    yield client
    client.close()


@pytest.fixture
def stub(served: Served) -> Iterator[pb_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(served.target) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def native_predict(served: Served, batch: np.ndarray, model: str = "linear") -> tuple[str, Any]:
    """(version, outputs) of native predict on the same server: raw float32 bytes in."""
    response = httpx.post(
        f"{served.process.url}/v1/models/{model}/predict",
        content=batch.astype(np.float32).tobytes(),
        headers={
            **API_AUTH,
            "Content-Type": "application/octet-stream",
            "X-Tensor-Shape": ",".join(map(str, batch.shape)),
            "X-Tensor-Dtype": "float32",
        },
        timeout=10,
    )
    assert response.status_code == 200, response.text
    return response.headers["X-Model-Version"], np.array(response.json()["outputs"], np.float32)


def triton_input(batch: np.ndarray, datatype: str) -> triton.InferInput:
    tensor = triton.InferInput("input", list(batch.shape), datatype)
    tensor.set_data_from_numpy(batch.astype({"FP32": np.float32, "FP16": np.float16}[datatype]))
    return tensor


def refused(call: Any) -> grpc.RpcError:
    """The error a call of the generated stubs ends with."""
    with pytest.raises(grpc.RpcError) as failed:
        call()
    return failed.value


# --- the generated code ---------------------------------------------------------------------


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "generate_grpc", ROOT / "scripts/generate_grpc.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.unit
def test_the_committed_generated_code_is_what_make_grpc_writes(tmp_path: Path) -> None:
    generator = _generator()
    written = generator.generate(tmp_path)
    stale = [
        str(name)
        for name, path in zip(generator.generated_names(), written, strict=True)
        if not filecmp.cmp(path, ROOT / name, shallow=False)
    ]
    assert not stale, f"run `make grpc`: {stale} differ from the .proto files"


def _kinds(base: type[ModelportError]) -> list[type[ModelportError]]:
    return [base, *(kind for sub in base.__subclasses__() for kind in _kinds(sub))]


@pytest.mark.unit
def test_every_error_of_ours_below_500_has_its_own_status_code_and_keeps_its_message() -> None:
    for kind in _kinds(ModelportError):
        error = FrameworkError(400, "m", None) if kind is FrameworkError else kind("m")
        answer = refusal(error, "/inference.GRPCInferenceService/ModelInfer")
        assert answer.message == "m"
        if error.status < 500:
            assert answer.code != grpc.StatusCode.INTERNAL, kind
    assert refusal(InvalidInput("m"), "/x") == Refusal(grpc.StatusCode.INVALID_ARGUMENT, "m", 400)
    assert refusal(Forbidden("m"), "/x").code == grpc.StatusCode.UNAUTHENTICATED
    assert refusal(WeightsUnreadable("m"), "/x").code == grpc.StatusCode.UNAVAILABLE
    bug = refusal(KeyError("secret"), "/x")
    assert (bug.code, bug.message) == (grpc.StatusCode.INTERNAL, "internal server error")


# --- health and metadata ----------------------------------------------------------------------


def test_health_and_server_metadata_answer_without_the_token(
    served: Served, client: triton.InferenceServerClient
) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("digits")
    assert client.is_model_ready("linear", model_version=BUNDLED.version)
    metadata = client.get_server_metadata(as_json=True)
    assert (metadata["name"], metadata["version"]) == ("modelport", "0.1.0")
    with pytest.raises(InferenceServerException) as unknown:
        client.is_model_ready("nope")
    assert unknown.value.status() == "StatusCode.NOT_FOUND"
    assert "no model named 'nope'" in str(unknown.value.message())


def test_the_standard_health_check_serves_liveness_and_readiness(served: Served) -> None:
    with grpc.insecure_channel(served.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        serving = health_pb2.HealthCheckResponse.SERVING
        assert health.Check(health_pb2.HealthCheckRequest(service="")).status == serving
        assert health.Check(health_pb2.HealthCheckRequest(service=SERVICE)).status == serving
        unknown = refused(lambda: health.Check(health_pb2.HealthCheckRequest(service="nope")))
    assert unknown.code() == grpc.StatusCode.NOT_FOUND


def test_model_metadata_gives_the_tensors_and_the_versions(
    client: triton.InferenceServerClient,
) -> None:
    digits = client.get_model_metadata("digits", headers=API_AUTH, as_json=True)
    linear = client.get_model_metadata("linear", headers=API_AUTH, as_json=True)
    assert digits["platform"] == "pytorch_statedict"
    assert digits["inputs"] == [{"name": "input", "datatype": "FP32", "shape": ["-1", "8", "8"]}]
    assert digits["outputs"] == [{"name": "output", "datatype": "FP32", "shape": ["-1", "10"]}]
    assert BUNDLED.version in linear["versions"]


# --- inference ------------------------------------------------------------------------------


@pytest.mark.parametrize("datatype", ["FP32", "FP16"])
def test_raw_inference_gives_exactly_what_native_predict_gives(
    served: Served, client: triton.InferenceServerClient, datatype: str
) -> None:
    version, expected = native_predict(served, BATCH)
    result = client.infer(
        "linear", [triton_input(BATCH, datatype)], request_id="7", headers=API_AUTH
    )
    response = result.get_response()
    assert (response.model_name, response.model_version, response.id) == ("linear", version, "7")
    assert len(response.raw_output_contents) == 1  # raw in, raw out
    output = result.as_numpy("output")
    assert output.dtype == np.float32
    assert np.array_equal(output, expected)


@pytest.mark.parametrize(
    ("datatype", "field"), [("FP32", "fp32_contents"), ("FP64", "fp64_contents")]
)
def test_typed_inference_gives_exactly_what_native_predict_gives(
    served: Served, stub: pb_grpc.GRPCInferenceServiceStub, datatype: str, field: str
) -> None:
    version, expected = native_predict(served, BATCH)
    tensor = pb.ModelInferRequest.InferInputTensor(name="input", datatype=datatype, shape=[2, 10])
    getattr(tensor.contents, field).extend(BATCH.reshape(-1).tolist())
    request = pb.ModelInferRequest(model_name="linear", id="typed", inputs=[tensor])

    response = stub.ModelInfer(request, metadata=METADATA)

    [output] = response.outputs
    assert (response.model_version, response.id) == (version, "typed")
    assert (output.name, output.datatype, list(output.shape)) == ("output", "FP32", [2, 2])
    assert not response.raw_output_contents  # typed in, typed out
    values = np.array(output.contents.fp32_contents, np.float32).reshape(2, 2)
    assert np.array_equal(values, expected)


async def test_the_aio_client_infers_and_reads_metadata(served: Served) -> None:
    _, expected = native_predict(served, BATCH)
    async with triton_aio.InferenceServerClient(url=served.target) as client:
        assert await client.is_server_ready()
        metadata = await client.get_model_metadata("linear", headers=API_AUTH)
        result = await client.infer("linear", [triton_input(BATCH, "FP32")], headers=API_AUTH)
    assert metadata.inputs[0].datatype == "FP32"
    assert np.array_equal(result.as_numpy("output"), expected)


def test_a_versioned_request_is_served_by_that_stored_version(
    served: Served, client: triton.InferenceServerClient
) -> None:
    two = linear_weights(3)
    stored = upload(served.process, two.data, activate="false")
    assert stored.status_code == 201, stored.text
    version = stored.json()["version"]
    tensor = triton_input(np.array([SAMPLE]), "FP32")

    pinned = client.infer("linear", [tensor], model_version=version, headers=API_AUTH)
    active = client.infer("linear", [tensor], headers=API_AUTH)
    with pytest.raises(InferenceServerException) as unknown:
        client.infer("linear", [tensor], model_version="0123456789ab", headers=API_AUTH)

    assert pinned.get_response().model_version == version
    assert np.array_equal(pinned.as_numpy("output"), np.array(two.outputs([SAMPLE]), np.float32))
    assert active.get_response().model_version != version
    assert client.is_model_ready("linear", model_version=version)
    assert unknown.value.status() == "StatusCode.NOT_FOUND"
    assert "has no version '0123456789ab'" in str(unknown.value.message())


# --- refusals -------------------------------------------------------------------------------


def test_inference_and_metadata_need_the_api_token(
    served: Served, stub: pb_grpc.GRPCInferenceServiceStub
) -> None:
    request = pb.ModelInferRequest(model_name="linear")
    missing = refused(lambda: stub.ModelInfer(request))
    wrong = refused(
        lambda: stub.ModelMetadata(
            pb.ModelMetadataRequest(name="linear"),
            metadata=(("authorization", f"Bearer {API_TOKEN}x"),),
        )
    )
    assert missing.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "missing credentials" in str(missing.details())
    assert wrong.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "the API token is wrong" in str(wrong.details())
    assert stub.ServerReady(pb.ServerReadyRequest()).ready  # health stays open


def test_an_unknown_model_is_not_found(client: triton.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException) as unknown:
        client.infer("nope", [triton_input(np.array([SAMPLE]), "FP32")], headers=API_AUTH)
    assert unknown.value.status() == "StatusCode.NOT_FOUND"
    assert "no model named 'nope'" in str(unknown.value.message())


def _raw(datatype: str, shape: list[int], data: bytes, **fields: Any) -> pb.ModelInferRequest:
    tensor = pb.ModelInferRequest.InferInputTensor(name="input", datatype=datatype, shape=shape)
    return pb.ModelInferRequest(
        model_name="linear", inputs=[tensor], raw_input_contents=[data], **fields
    )


def _typed(datatype: str, shape: list[int], **contents: list[Any]) -> pb.ModelInferRequest:
    tensor = pb.ModelInferRequest.InferInputTensor(
        name="input", datatype=datatype, shape=shape, contents=pb.InferTensorContents(**contents)
    )
    return pb.ModelInferRequest(model_name="linear", inputs=[tensor])


ONE = np.array([SAMPLE], np.float32)
BAD_REQUESTS = {
    "wrong sample shape": (_raw("FP32", [1, 3], ONE[:, :3].tobytes()), "wrong sample shape"),
    "bytes short of the shape": (_raw("FP32", [1, 10], ONE.tobytes()[:-4]), "needs 40 bytes"),
    "negative shape": (_raw("FP32", [-1, 10], ONE.tobytes()), "non-negative"),
    "unknown datatype": (_raw("FP31", [1, 10], ONE.tobytes()), "unknown datatype 'FP31'"),
    "typed FP16": (_typed("FP16", [1, 10], fp32_contents=SAMPLE), "send it in raw_input"),
    "values in the wrong field": (
        _typed("FP32", [1, 10], fp64_contents=SAMPLE),
        "FP32 values go in fp32_contents; received fp64_contents",
    ),
    "too few values": (
        _typed("FP32", [1, 10], fp32_contents=SAMPLE[:9]),
        "shape [1, 10] holds 10 values; fp32_contents holds 9",
    ),
    "INT8 out of range": (_typed("INT8", [1, 10], int_contents=[300] * 10), "[-128, 127]"),
    "unknown output": (
        _raw(
            "FP32",
            [1, 10],
            ONE.tobytes(),
            outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name="logits")],
        ),
        "has no output 'logits'",
    ),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_input_is_invalid_argument_saying_what_was_wrong(
    stub: pb_grpc.GRPCInferenceServiceStub, case: str
) -> None:
    request, message = BAD_REQUESTS[case]
    error = refused(lambda: stub.ModelInfer(request, metadata=METADATA))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert message in str(error.details())


def test_a_message_over_the_body_limit_is_refused_and_the_server_serves_on(
    stub: pb_grpc.GRPCInferenceServiceStub,
) -> None:
    rows = LIMIT // 40 + 1  # float32 samples of linear: just over the limit
    big = np.zeros((rows, 10), np.float32)
    error = refused(
        lambda: stub.ModelInfer(_raw("FP32", [rows, 10], big.tobytes()), metadata=METADATA)
    )
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert stub.ModelInfer(_raw("FP32", [1, 10], ONE.tobytes()), metadata=METADATA).outputs


def test_calls_are_counted_logged_and_answered_with_their_request_id(
    served: Served, stub: pb_grpc.GRPCInferenceServiceStub
) -> None:
    endpoint = f"/{SERVICE}/ModelInfer"

    def count(status: str) -> float:
        scrape = httpx.get(f"{served.process.url}/metrics", headers=API_AUTH, timeout=10).text
        labels = {"endpoint": endpoint, "model": "linear", "status": status}
        return metric(scrape, "modelport_requests_total", missing=0.0, **labels)

    ok, invalid = count("200"), count("400")
    request = _raw("FP32", [1, 10], ONE.tobytes())
    _, call = stub.ModelInfer.with_call(request, metadata=(*METADATA, ("x-request-id", "grpc-42")))
    refused(lambda: stub.ModelInfer(_raw("FP32", [1, 3], b"\0" * 12), metadata=METADATA))

    assert ("x-request-id", "grpc-42") in call.trailing_metadata()
    assert count("200") == ok + 1
    assert count("400") == invalid + 1
    line = f"[grpc-42] GRPC {endpoint} OK "
    wait_until(lambda: line in served.process.output(), 5, "the access log line")


# --- processes ------------------------------------------------------------------------------


LISTEN, ESTABLISHED = "0A", "01"


def _sockets_on(port: int) -> dict[int, str]:
    """Inode -> TCP state of every socket whose local port is ``port``."""
    found = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port:
                found[int(fields[9])] = fields[3]
    return found


def _holding(pids: list[int], port: int, state: str) -> set[int]:
    """Those of ``pids`` that hold a socket on ``port`` in ``state``."""
    sockets = _sockets_on(port)
    return {pid for pid in pids if any(sockets.get(i) == state for i in socket_inodes(pid))}


def _established(pid: int, port: int) -> int:
    """How many connections ``pid`` holds open on ``port``."""
    sockets = _sockets_on(port)
    return sum(sockets.get(inode) == ESTABLISHED for inode in set(socket_inodes(pid)))


def test_connections_that_never_handshake_or_stay_idle_are_let_go(tmp_path: Path) -> None:
    """A socket that never speaks HTTP/2 was held a minute, a channel with no call for ever:
    each a socket and a file descriptor the client chose to keep. Both go after the client
    timeout, and the channel's next call connects again."""
    with serve(tmp_path, MODELPORT_CLIENT_TIMEOUT_S="1") as served:
        port, pid = int(served.target.rsplit(":", 1)[1]), served.process.process.pid
        with (
            socket.create_connection(("127.0.0.1", port), timeout=20) as silent,
            grpc.insecure_channel(served.target) as channel,
        ):
            grpc.channel_ready_future(channel).result(timeout=10)
            wait_until(lambda: _established(pid, port) == 2, 10, "both connected")
            wait_until(lambda: _established(pid, port) == 0, 15, "both let go")
            while silent.recv(65536):  # the server's settings and goodbye, then the end
                pass
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            assert stub.ServerLive(pb.ServerLiveRequest(), timeout=10).live


HTTP2_HANDSHAKE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])
"""A client's HTTP/2 preface and an empty SETTINGS frame: a connection the server then holds
until it has been idle for the client timeout."""


def test_a_flood_of_connections_is_held_to_the_grpc_doors_share(tmp_path: Path) -> None:
    """Unbounded, every connection that finished its handshake was held for the client
    timeout, however many: a flood used up the process's file descriptors, which the HTTP
    door needs too. The gRPC door holds a quarter of MODELPORT_MAX_CONNECTIONS; the HTTP door
    still serves."""
    with serve(tmp_path, MODELPORT_MAX_CONNECTIONS="100") as served:
        port, pid = int(served.target.rsplit(":", 1)[1]), served.process.process.pid
        with contextlib.ExitStack() as flood:
            for _ in range(200):
                raw = flood.enter_context(socket.create_connection(("127.0.0.1", port)))
                raw.sendall(HTTP2_HANDSHAKE)
            wait_until(lambda: _established(pid, port) >= 25, 10, "the share taken")
            time.sleep(1)  # (the rest would be held by now)
            held = _established(pid, port)
            predict = native_predict(served, np.zeros((1, 10)))
    assert held == 25
    assert predict[0] == BUNDLED.version


async def _calls_without_a_message(target: str, count: int) -> None:
    """``count`` calls on one channel that send their headers and never a message; cancelled
    after two seconds."""
    never = asyncio.Event()

    async def nothing() -> Any:
        await never.wait()
        yield b""

    async with grpc.aio.insecure_channel(target) as channel:
        infer = channel.stream_unary(f"/{SERVICE}/ModelInfer")
        calls = [infer(nothing()) for _ in range(count)]
        await asyncio.sleep(2)
        for call in calls:
            call.cancel()


def test_calls_that_never_send_their_message_cost_no_memory(served: Served) -> None:
    """Unbounded, each stream a client opened cost the server ~8 KiB until the client let it
    go: 5,000 from one connection, ~40 MiB. At most 100 are open on a connection; the client's
    others wait for a free stream, in the client."""
    with PeakRss(served.process.process.pid) as peak:
        asyncio.run(_calls_without_a_message(served.target, 5_000))
    print(f"peak RSS growth {peak.growth_mib:.1f} MiB")
    assert peak.growth_mib < 16
    with grpc.insecure_channel(served.target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        assert stub.ServerLive(pb.ServerLiveRequest(), timeout=10).live


def test_two_workers_both_answer_on_the_one_grpc_port(tmp_path: Path) -> None:
    with serve(tmp_path, "--workers", "2") as served:
        port = int(served.target.rsplit(":", 1)[1])
        wait_until(
            lambda: len(_holding(worker_pids(served.process.process.pid), port, LISTEN)) == 2,
            60,
            "both workers listen on the gRPC port",
            server=served.process,
        )
        workers = sorted(_holding(worker_pids(served.process.process.pid), port, LISTEN))
        request = _raw("FP32", [1, 10], ONE.tobytes())
        expected = np.array(BUNDLED.outputs([SAMPLE]), np.float32)
        with contextlib.ExitStack() as channels:
            # each channel its own connection, which the kernel gives one worker or the other
            for _ in range(64):
                channel = channels.enter_context(
                    grpc.insecure_channel(
                        served.target, options=[("grpc.use_local_subchannel_pool", 1)]
                    )
                )
                answer = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
                    request, metadata=METADATA
                )
                output = np.frombuffer(answer.raw_output_contents[0], "<f4").reshape(1, 2)
                assert np.array_equal(output, expected)
                if _holding(workers, port, ESTABLISHED) == set(workers):
                    break
            assert _holding(workers, port, ESTABLISHED) == set(workers)


def test_on_sigterm_calls_in_flight_finish_and_new_ones_are_unavailable(tmp_path: Path) -> None:
    weights = tmp_path / "cnn.pth"
    weights.write_bytes(saved(seeded_state_dict(7, CNN)))  # ~5 ms a sample on one thread
    config = write_config(tmp_path, {"name": "cnn", "class": "bench-cnn", "weights": str(weights)})
    port = free_port()
    env = {
        "MODELPORT_GRPC_PORT": str(port),
        "MODELPORT_TORCH_THREADS": "1",
        "MODELPORT_MAX_BODY_BYTES": str(16 * 1024 * 1024),
        "MODELPORT_SHUTDOWN_GRACE_S": "30",
        "MODELPORT_MAX_BATCH_SIZE": "64",  # one call per forward: the others wait in the queue
    }
    batch = np.zeros((64, 3, 64, 64), np.float32)  # ~0.3 s a forward: every call arrives first
    request = pb.ModelInferRequest(
        model_name="cnn",
        inputs=[
            pb.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=batch.shape)
        ],
        raw_input_contents=[batch.tobytes()],
    )
    with (
        run_server(tmp_path, config, env=env) as server,
        grpc.insecure_channel(f"127.0.0.1:{port}") as channel,
    ):
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        in_flight = [stub.ModelInfer.future(request, timeout=60) for _ in range(8)]
        # every call accepted (one computing, the rest queued) before the signal: a call still
        # in grpc's hands then would be refused as new work
        wait_until(
            lambda: (
                metric(
                    httpx.get(f"{server.url}/metrics").text, "modelport_queue_depth", missing=0.0
                )
                >= len(in_flight) - 1
            ),
            20,
            "calls queued",
            server=server,
        )
        server.process.send_signal(signal.SIGTERM)
        wait_until(
            lambda: not stub.ServerReady(pb.ServerReadyRequest()).ready,
            10,
            "draining",
            server=server,
        )
        health = health_pb2_grpc.HealthStub(channel)
        readiness = health.Check(health_pb2.HealthCheckRequest(service=SERVICE)).status
        liveness = health.Check(health_pb2.HealthCheckRequest(service="")).status
        late = refused(lambda: stub.ModelInfer(request, timeout=10))
        answers = [call.result() for call in in_flight]
        assert server.process.wait(40) == 0
    assert readiness == health_pb2.HealthCheckResponse.NOT_SERVING
    assert liveness == health_pb2.HealthCheckResponse.SERVING  # draining is no reason to restart
    assert late.code() == grpc.StatusCode.UNAVAILABLE
    assert "shutting down" in str(late.details())
    assert all(list(answer.outputs[0].shape) == [64, 10] for answer in answers)


# --- KServe's client --------------------------------------------------------------------------

KSERVE = """
import asyncio, json, sys

import numpy as np
from kserve import InferenceGRPCClient, InferInput, InferRequest


async def main(target, token, batch):
    client = InferenceGRPCClient(target, timeout=30)
    auth = [("authorization", f"Bearer {token}")]
    answers = {
        "live": await client.is_server_live(),
        "ready": await client.is_server_ready(),
        "model_ready": await client.is_model_ready("linear"),
    }
    for binary in (True, False):  # raw_input_contents, or typed contents
        tensor = InferInput("input", list(batch.shape), "FP32")
        tensor.set_data_from_numpy(batch, binary_data=binary)
        result = await client.infer(InferRequest("linear", [tensor], request_id="k"), headers=auth)
        output = result.outputs[0]
        answers[f"binary={binary}"] = {
            "version": result.model_version,
            "id": result.id,
            "datatype": output.datatype,
            "output": output.as_numpy().tolist(),
        }
    try:
        await client.infer(InferRequest("nope", [tensor]), headers=auth)
    except Exception as error:
        answers["unknown"] = str(error)
    await client.close()
    print(json.dumps(answers))


asyncio.run(main(sys.argv[1], sys.argv[2], np.array(json.loads(sys.argv[3]), np.float32)))
"""


def test_kserve_grpc_client_reads_health_and_infers_raw_and_typed(served: Served) -> None:
    version, expected = native_predict(served, BATCH)
    # its own process: kserve's inference.* messages and tritonclient's cannot share one
    ran = subprocess.run(
        [sys.executable, "-c", KSERVE, served.target, API_TOKEN, json.dumps(BATCH.tolist())],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ran.returncode == 0, ran.stderr
    answers = json.loads(ran.stdout)
    assert (answers["live"], answers["ready"], answers["model_ready"]) == (True, True, True)
    for binary in (True, False):
        answer = answers[f"binary={binary}"]
        assert (answer["version"], answer["id"], answer["datatype"]) == (version, "k", "FP32")
        assert np.array_equal(np.array(answer["output"], np.float32), expected)
    assert "no model named 'nope'" in answers["unknown"]


# --- Triton's extensions: model configuration, repository index, statistics ------------------


def _triton_descriptor(name: str) -> Descriptor | EnumDescriptor:
    for module in (triton_service, triton_config):
        found = module.DESCRIPTOR.message_types_by_name.get(name)
        found = found or module.DESCRIPTOR.enum_types_by_name.get(name)
        if found is not None:
            return found
    raise AssertionError(f"tritonclient has no message {name}")


def _same_as_tritons(ours: Descriptor | EnumDescriptor) -> None:
    theirs = _triton_descriptor(ours.full_name.removeprefix("inference.").split(".")[0])
    for part in ours.full_name.split(".")[2:]:  # a nested message
        theirs = theirs.nested_types_by_name[part]
    assert theirs.full_name == ours.full_name
    if isinstance(ours, EnumDescriptor):
        assert {v.name: v.number for v in ours.values} == {v.name: v.number for v in theirs.values}
        return
    assert isinstance(theirs, Descriptor)
    for field in ours.fields:
        twin = theirs.fields_by_name[field.name]
        assert (field.number, field.type, field.is_repeated) == (
            twin.number,
            twin.type,
            twin.is_repeated,
        ), field.full_name
        if field.message_type is not None:
            assert field.message_type.full_name == twin.message_type.full_name
    for nested in ours.nested_types:
        _same_as_tritons(nested)


@pytest.mark.unit
def test_the_extension_messages_are_tritons_field_for_field() -> None:
    file = extensions_pb2.DESCRIPTOR
    assert file.package == "inference"
    for message in [*file.message_types_by_name.values(), *file.enum_types_by_name.values()]:
        _same_as_tritons(message)
    ours = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    theirs = triton_service.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    for method in ours.methods:
        twin = theirs.methods_by_name[method.name]
        assert (method.input_type.full_name, method.output_type.full_name) == (
            twin.input_type.full_name,
            twin.output_type.full_name,
        )


def _rest(served: Served, method: str, path: str) -> Any:
    response = httpx.request(method, f"{served.process.url}{path}", headers=API_AUTH, timeout=10)
    assert response.status_code == 200, response.text
    return response.json()


def test_model_config_is_what_the_rest_door_answers(
    served: Served, client: triton.InferenceServerClient
) -> None:
    for name in ("digits", "linear"):
        rest = _rest(served, "GET", f"/v2/models/{name}/config")
        config = client.get_model_config(name, headers=API_AUTH).config
        as_json = client.get_model_config(name, headers=API_AUTH, as_json=True)["config"]

        assert config.max_batch_size == rest["max_batch_size"] > 1
        for ours, theirs in ((config.input, rest["input"]), (config.output, rest["output"])):
            assert [t.name for t in ours] == [t["name"] for t in theirs]
            assert [list(t.dims) for t in ours] == [t["dims"] for t in theirs]
            types = [triton_config.DataType.Name(t.data_type) for t in ours]
            assert types == [t["data_type"] for t in theirs]
        batching, queue = rest["dynamic_batching"], rest["dynamic_batching"]["default_queue_policy"]
        delay = config.dynamic_batching.max_queue_delay_microseconds
        assert delay == batching["max_queue_delay_microseconds"] > 0
        policy = config.dynamic_batching.default_queue_policy
        assert policy.max_queue_size == queue["max_queue_size"] > 0
        assert policy.default_timeout_microseconds == queue["default_timeout_microseconds"] > 0
        # and nothing else differs: REST's JSON is the message's JSON mapping
        assert config == json_format.ParseDict(rest, triton_config.ModelConfig())
        assert as_json == json_format.MessageToDict(config, preserving_proto_field_name=True)
        assert as_json["input"][0]["data_type"] == rest["input"][0]["data_type"]
    pinned = client.get_model_config("linear", BUNDLED.version, headers=API_AUTH).config
    assert pinned == client.get_model_config("linear", headers=API_AUTH).config


def test_repository_index_is_what_the_rest_door_answers(
    served: Served, client: triton.InferenceServerClient, stub: pb_grpc.GRPCInferenceServiceStub
) -> None:
    rest = _rest(served, "POST", "/v2/repository/index")
    index = client.get_model_repository_index(headers=API_AUTH)
    ready = stub.RepositoryIndex(
        extensions_pb2.RepositoryIndexRequest(ready=True), metadata=METADATA
    )

    assert [(m.name, m.version, m.state, m.reason) for m in index.models] == [
        (m["name"], m["version"], m["state"], m["reason"]) for m in rest
    ]
    assert {m.state for m in index.models} == {"READY"}
    assert [m.name for m in ready.models] == [m.name for m in index.models]


def test_statistics_count_the_inferences_as_the_rest_door_does(
    served: Served, client: triton.InferenceServerClient
) -> None:
    digits = np.zeros((2, 8, 8), np.float32)
    for _ in range(3):
        client.infer("digits", [triton_input(digits, "FP32")], headers=API_AUTH)
    with pytest.raises(InferenceServerException):  # reaches the model's checks: a failure
        client.infer("digits", [triton_input(np.zeros((1, 8, 7)), "FP32")], headers=API_AUTH)

    rest = _rest(served, "GET", "/v2/models/digits/stats")
    [stats] = client.get_inference_statistics("digits", headers=API_AUTH).model_stats
    version = stats.version
    everyone = client.get_inference_statistics(headers=API_AUTH)
    rest_everyone = _rest(served, "GET", "/v2/models/stats")
    pinned = client.get_inference_statistics("digits", version, headers=API_AUTH, as_json=True)
    rest_pinned = _rest(served, "GET", f"/v2/models/digits/versions/{version}/stats")

    [expected] = rest["model_stats"]
    requests = stats.inference_stats
    assert (stats.name, stats.version) == (expected["name"], expected["version"])
    assert requests.success.count == expected["inference_stats"]["success"]["count"] >= 3
    assert requests.fail.count == expected["inference_stats"]["fail"]["count"] >= 1
    assert requests.queue.ns == expected["inference_stats"]["queue"]["ns"] > 0
    assert requests.compute_infer.ns == expected["inference_stats"]["compute_infer"]["ns"] > 0
    assert stats.inference_count == expected["inference_count"] >= 6
    assert [b.batch_size for b in stats.batch_stats] == [
        b["batch_size"] for b in expected["batch_stats"]
    ]
    # and nothing else differs
    assert stats == json_format.ParseDict(expected, triton_service.ModelStatistics())
    assert everyone == json_format.ParseDict(
        rest_everyone, triton_service.ModelStatisticsResponse()
    )
    assert {m.name for m in everyone.model_stats} == {"digits", "linear"}
    assert pinned == json_format.MessageToDict(
        json_format.ParseDict(rest_pinned, triton_service.ModelStatisticsResponse()),
        preserving_proto_field_name=True,
    )


UNKNOWN = "no model named 'nope'"
UNKNOWN_VERSION = "has no version '0123456789ab'"


@pytest.mark.parametrize(
    ("rpc", "request_", "message"),
    [
        ("ModelConfig", extensions_pb2.ModelConfigRequest(name="nope"), UNKNOWN),
        (
            "ModelConfig",
            extensions_pb2.ModelConfigRequest(name="linear", version="0123456789ab"),
            UNKNOWN_VERSION,
        ),
        ("ModelStatistics", extensions_pb2.ModelStatisticsRequest(name="nope"), UNKNOWN),
        (
            "ModelStatistics",
            extensions_pb2.ModelStatisticsRequest(name="linear", version="0123456789ab"),
            UNKNOWN_VERSION,
        ),
    ],
)
def test_an_unknown_model_or_version_is_not_found_on_the_extensions(
    stub: pb_grpc.GRPCInferenceServiceStub, rpc: str, request_: Any, message: str
) -> None:
    error = refused(lambda: getattr(stub, rpc)(request_, metadata=METADATA))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert message in str(error.details())


def test_the_extensions_need_the_api_token(
    client: triton.InferenceServerClient, stub: pb_grpc.GRPCInferenceServiceStub
) -> None:
    calls = [
        lambda: stub.ModelConfig(extensions_pb2.ModelConfigRequest(name="linear")),
        lambda: stub.ModelStatistics(extensions_pb2.ModelStatisticsRequest()),
        lambda: stub.RepositoryIndex(extensions_pb2.RepositoryIndexRequest()),
    ]
    for call in calls:
        assert refused(call).code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(InferenceServerException) as missing:
        client.get_model_config("linear")
    assert missing.value.status() == "StatusCode.UNAUTHENTICATED"


def test_model_load_answers_whether_a_model_serves_and_unload_is_refused_on_both_doors(
    served: Served, client: triton.InferenceServerClient
) -> None:
    rest = triton_http.InferenceServerClient(url=served.process.url.removeprefix("http://"))
    for door in (client, rest):
        door.load_model("linear", headers=API_AUTH)  # served from the configuration: no error
        with pytest.raises(InferenceServerException, match="cannot be unloaded"):
            door.unload_model("linear", headers=API_AUTH)
        with pytest.raises(InferenceServerException, match="no model named 'nope'"):
            door.load_model("nope", headers=API_AUTH)
        assert door.is_model_ready("linear", headers=API_AUTH)
    rest.close()
    unauthenticated = httpx.post(f"{served.process.url}/v2/repository/models/linear/load")
    assert unauthenticated.status_code == 401
    refused = httpx.post(
        f"{served.process.url}/v2/repository/models/linear/unload", headers=API_AUTH
    )
    assert refused.status_code == 400
    assert set(refused.json()) == {"error"}
