"""app.client, sync and async, against a real server process."""

from __future__ import annotations

import contextlib
import io
import json
import socket
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from asgi_lifespan import LifespanManager

from app.client import (
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
    UnsendableInputError,
)
from app.http.app import create_app
from models.digits import HELDOUT, DigitsCNN, to_network_input
from tests.helpers import (
    BROKEN,
    BUNDLED,
    DIGITS,
    LINEAR,
    SAMPLE,
    SENTIMENT,
    TOKEN,
    TOKENS,
    WEIGHTS,
    ServerProcess,
    first,
    free_port,
    linear_weights,
    make_settings,
    run_server,
    sentiment_outputs,
    write_config,
)

pytestmark = pytest.mark.process

# Each management test changes its own copy of the linear model, so tests stay independent.
SYNC_COPY = {**LINEAR, "name": "linear-sync"}
ASYNC_COPY = {**LINEAR, "name": "linear-async"}
VERSIONS_COPY = {**LINEAR, "name": "linear-versions"}
MAX_BODY_BYTES = 4096
"""The server's predict body cap: BATCH fits as float32 bytes (2560) and not as JSON (~13 kB)."""
BATCH = np.random.default_rng(0).standard_normal((64, 10), dtype=np.float32)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    directory = tmp_path_factory.mktemp("client-server")
    config = write_config(directory, LINEAR, DIGITS, SYNC_COPY, ASYNC_COPY, VERSIONS_COPY)
    env = {"MODELPORT_ADMIN_TOKEN": TOKEN, "MODELPORT_MAX_BODY_BYTES": str(MAX_BODY_BYTES)}
    with run_server(directory, config, env=env) as process:
        yield process


@pytest.fixture
def client(server: ServerProcess) -> Iterator[ModelportClient]:
    with ModelportClient(server.url, TOKEN) as client:
        yield client


@contextlib.contextmanager
def silent_server() -> Iterator[str]:
    """The URL of a port that takes connections (the kernel completes them) and never answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


def digits_logits(images: np.ndarray) -> np.ndarray:
    """The bundled digits model's raw output (its logits) on ``images``, outside any server."""
    model = DigitsCNN().eval()
    model.load_state_dict(torch.load(WEIGHTS / "digits.pth", weights_only=True))
    with torch.inference_mode():
        logits: np.ndarray = model(to_network_input(torch.from_numpy(images))).numpy()
    return logits


def test_arrays_and_tensors_travel_as_binary_tensors_and_come_back_as_the_raw_output(
    client: ModelportClient,
) -> None:
    bfloat16 = torch.from_numpy(BATCH).to(torch.bfloat16)
    # big-endian float64 in Fortran order, half the batch (5 kB of float64 would pass no cap)
    wide = np.asfortranarray(BATCH[:32].astype(">f8"))
    sent = {
        "numpy raw": (client.predict("linear", BATCH), BATCH),
        "numpy .npy": (client.predict("linear", BATCH, binary="npy"), BATCH),
        "torch": (client.predict("linear", torch.from_numpy(BATCH).requires_grad_()), BATCH),
        "bfloat16": (client.predict("linear", bfloat16), bfloat16.float().numpy()),
        "float64": (client.predict("linear", wide), wide),
    }
    postprocessed = client.predict("linear", BATCH, postprocess=True)

    for form, (outputs, values) in sent.items():
        assert isinstance(outputs, np.ndarray), form
        assert (outputs.shape, outputs.dtype) == ((len(values), 2), np.float32), form
        np.testing.assert_allclose(outputs, BUNDLED.outputs(values), rtol=0, atol=1e-6)
    assert postprocessed["model"] == "linear"
    np.testing.assert_allclose(postprocessed["outputs"], BUNDLED.outputs(BATCH), atol=1e-6)
    # The same values as JSON lists are over the server's body cap that the arrays passed.
    with pytest.raises(PayloadTooLargeError):
        client.predict("linear", BATCH.tolist())


def test_lists_stay_json_and_either_answer_form_is_had_on_request(
    client: ModelportClient,
) -> None:
    with np.load(HELDOUT) as data:
        images = data["images"][:8].astype(np.float32)
    batch = [SAMPLE, [1.0] * 10]

    listed = client.predict("linear", batch)
    raw_from_lists = client.predict("linear", batch, postprocess=False)
    raw_from_torch = client.predict("linear", torch.tensor(batch), binary="npy")
    prediction = client.prediction("linear", np.array(batch))
    logits = client.predict("digits", images)
    labelled = client.predict("digits", images, postprocess=True)

    assert listed["model"] == "linear"
    assert listed["version"] == client.model("linear")["version"]
    np.testing.assert_allclose(listed["outputs"], BUNDLED.outputs(batch), atol=1e-6)
    assert isinstance(raw_from_lists, np.ndarray)
    np.testing.assert_allclose(raw_from_lists, BUNDLED.outputs(batch), atol=1e-6)
    np.testing.assert_allclose(raw_from_torch, BUNDLED.outputs(batch), atol=1e-6)
    assert isinstance(prediction, Prediction)
    assert (prediction.model, prediction.version) == ("linear", listed["version"])
    np.testing.assert_allclose(prediction.outputs, BUNDLED.outputs(batch), atol=1e-6)
    assert logits.shape == (8, 10)
    np.testing.assert_allclose(logits, digits_logits(images), atol=1e-5)
    assert [out["label"] for out in labelled["outputs"]] == logits.argmax(axis=1).tolist()
    assert labelled["version"] == client.model("digits")["version"]


def test_inputs_the_model_refuses_or_no_wire_carries_raise_typed_errors(
    client: ModelportClient,
) -> None:
    nan = np.array([SAMPLE, SAMPLE], np.float32)
    nan[1, 3] = np.nan
    refused_by_the_server = {
        "NaN array": nan,
        "NaN in lists": nan.tolist(),
        "infinity in torch": torch.full((1, 10), float("inf")),
        "wrong shape": np.ones((2, 3), np.float32),
    }
    never_sent = {
        "object array": np.array([[1.0, None]], dtype=object),
        "complex array": np.ones((1, 10), np.complex64),
        "complex tensor": torch.ones((1, 10), dtype=torch.complex64),
        "complex in lists": [[1j] * 10],
        "strings array": np.array([["1"] * 10]),
        "a set in lists": [{1.0}],
        "one value": np.array(1.0, np.float32),
    }

    refused = {}
    for what, inputs in refused_by_the_server.items():
        with pytest.raises(InvalidInputError) as error:
            client.predict("linear", inputs)
        refused[what] = error.value
    unsendable = {}
    for what, inputs in never_sent.items():
        with pytest.raises(UnsendableInputError) as local:
            client.predict("linear", inputs)
        unsendable[what] = local.value.message

    assert {error.code for error in refused.values()} == {"invalid_input"}
    assert "sample 1 holds NaN" in refused["NaN array"].message
    assert "sample 1 holds NaN" in refused["NaN in lists"].message
    assert "holds NaN or infinity" in refused["infinity in torch"].message
    assert "wrong sample shape" in refused["wrong shape"].message
    assert "object array" in unsendable["object array"]
    assert "complex numbers (complex64)" in unsendable["complex array"]
    assert "complex numbers (torch.complex64)" in unsendable["complex tensor"]
    assert "complex numbers" in unsendable["complex in lists"]
    assert "strings" in unsendable["strings array"]
    assert "holds a set" in unsendable["a set in lists"]
    assert "0-d array" in unsendable["one value"]


def test_a_server_that_never_answers_times_out_and_a_closed_port_is_unreachable() -> None:
    with (
        silent_server() as url,
        ModelportClient(url, timeout=0.5) as slow,
        pytest.raises(ServerTimeout) as timed_out,
    ):
        slow.predict("linear", BATCH)
    with (
        ModelportClient(f"http://127.0.0.1:{free_port()}", timeout=0.5) as down,
        pytest.raises(ServerUnreachable) as refused,
    ):
        down.health()

    assert not isinstance(timed_out.value, ServerUnreachable)
    assert "did not answer POST /v1/models/linear/predict" in timed_out.value.message
    assert "within the client's timeout of 0.5 s (ReadTimeout" in timed_out.value.message
    assert "cannot reach the server" in refused.value.message
    assert "ConnectError" in refused.value.message


async def test_the_async_client_times_out_too() -> None:
    with silent_server() as url:
        async with AsyncModelportClient(url, timeout=0.5) as slow:
            with pytest.raises(ServerTimeout) as timed_out:
                await slow.health()
    assert "did not answer GET /health/ready" in timed_out.value.message


def test_delete_and_history_of_versions(client: ModelportClient, tmp_path: Path) -> None:
    model = VERSIONS_COPY["name"]
    bundled = client.versions(model)["active"]
    stored = client.upload(model, linear_weights(3).write(tmp_path / "seed3.pth"), activate=False)
    serving = client.upload(model, linear_weights(4).write(tmp_path / "seed4.pth"))

    deleted = client.delete(model, stored["version"])
    listed = [v["version"] for v in client.versions(model)["versions"]]
    history = client.history(model)
    first_page = client.history(model, limit=2)
    second_page = client.history(model, limit=2, before=first_page["next_before"])
    with pytest.raises(ConflictError) as active:
        client.delete(model, serving["version"])
    with pytest.raises(NotFoundError) as unknown:
        client.delete(model, "0123456789ab")

    assert deleted is None
    assert listed == [bundled, serving["version"]]
    entries = history["entries"]
    assert [(e["action"], e["from_version"], e["to_version"]) for e in entries] == [
        ("delete", stored["version"], None),
        ("activate", bundled, serving["version"]),
        ("upload", None, serving["version"]),
        ("upload", None, stored["version"]),
    ]
    assert history["next_before"] is None
    assert first_page["entries"] + second_page["entries"] == entries
    assert active.value.code == "version_conflict"
    assert unknown.value.status == 404


def test_metadata_and_health(client: ModelportClient) -> None:
    info = client.model("digits")
    names = [model["name"] for model in client.models()]
    health = client.health()
    assert (info["input_shape"], info["status"]) == ([8, 8], "ready")
    assert names == ["linear", "digits", "linear-sync", "linear-async", "linear-versions"]
    assert health["ready"] is True
    assert health["models"]["digits"] == "ready"


def test_upload_streams_in_chunks_with_progress_then_versions_activate_and_rollback(
    client: ModelportClient, tmp_path: Path
) -> None:
    weights = linear_weights(1).write(tmp_path / "seed1.pth")
    bundled = client.versions("linear-sync")["active"]
    progress: list[tuple[int, int]] = []

    stored = client.upload(
        "linear-sync",
        weights,
        activate=False,
        chunk_bytes=256,
        progress=lambda sent, total: progress.append((sent, total)),
    )
    listed = client.versions("linear-sync")
    activated = client.activate("linear-sync", stored["version"])
    serving = client.predict("linear-sync", [SAMPLE])["version"]
    rolled_back = client.rollback("linear-sync")

    size = weights.stat().st_size
    assert len(progress) == -(-size // 256)
    assert [sent for sent, _ in progress] == sorted(sent for sent, _ in progress)
    assert progress[-1] == (size, size)
    assert (stored["created"], stored["active"], stored["filename"]) == (True, False, "seed1.pth")
    assert stored["report"]["smoke_test"] == "passed"
    assert [v["version"] for v in listed["versions"]] == [bundled, stored["version"]]
    assert activated["active"] is True
    assert serving == stored["version"]
    assert rolled_back["version"] == bundled


async def test_async_client_predicts_uploads_and_rolls_back(
    server: ServerProcess, tmp_path: Path
) -> None:
    weights = linear_weights(2).write(tmp_path / "seed2.pth")
    progress: list[int] = []
    async with AsyncModelportClient(server.url, TOKEN) as client:
        health = await client.health()
        info = await client.model("linear-async")
        before = await client.predict("linear-async", [SAMPLE])
        raw = await client.predict("linear-async", BATCH)
        stored = await client.upload(
            "linear-async", weights, chunk_bytes=512, progress=lambda sent, _: progress.append(sent)
        )
        after = await client.prediction("linear-async", torch.tensor([SAMPLE]))
        versions = await client.versions("linear-async")
        rolled_back = await client.rollback("linear-async")
        with pytest.raises(NotFoundError):
            await client.activate("linear-async", "0123456789ab")
        with pytest.raises(ConflictError):  # the previous version stays
            await client.delete("linear-async", stored["version"])
        spare = await client.upload(
            "linear-async", linear_weights(5).write(tmp_path / "seed5.pth"), activate=False
        )
        await client.delete("linear-async", spare["version"])
        history = await client.history("linear-async", limit=3)
        with pytest.raises(PayloadTooLargeError):
            await client.predict("linear-async", BATCH.tolist())
        models = await client.models()
    assert health["ready"] is True
    assert info["version"] == before["version"]
    np.testing.assert_allclose(before["outputs"], BUNDLED.outputs([SAMPLE]), atol=1e-6)
    assert isinstance(raw, np.ndarray)
    np.testing.assert_allclose(raw, BUNDLED.outputs(BATCH), rtol=0, atol=1e-6)
    assert progress[-1] == weights.stat().st_size
    assert after.version == stored["version"] != before["version"]
    np.testing.assert_allclose(after.outputs, linear_weights(2).outputs([SAMPLE]), atol=1e-6)
    assert versions["previous"] == before["version"]
    assert rolled_back["version"] == before["version"]
    assert [e["action"] for e in history["entries"]] == ["delete", "upload", "rollback"]
    assert history["entries"][0]["from_version"] == spare["version"]
    assert len(models) == 5


def test_errors_are_typed_and_carry_the_server_message_and_code(
    client: ModelportClient, server: ServerProcess, tmp_path: Path
) -> None:
    with pytest.raises(NotFoundError) as unknown:
        client.predict("nope", [SAMPLE])
    with pytest.raises(InvalidInputError) as wrong_shape:
        client.predict("linear", [[1.0, 2.0]])
    with pytest.raises(InvalidInputError) as refused:
        client.upload("digits", WEIGHTS / "linear.pth")
    with pytest.raises(ConflictError) as nothing_to_roll_back:
        client.rollback("digits")
    with ModelportClient(server.url) as anonymous, pytest.raises(AuthenticationError):
        anonymous.rollback("linear")
    with ModelportClient(server.url, "x" * 40) as wrong, pytest.raises(PermissionDeniedError):
        wrong.rollback("linear")
    with (
        ModelportClient(f"http://127.0.0.1:{free_port()}") as down,
        pytest.raises(ServerUnreachable) as unreachable,
    ):
        down.health()

    assert (unknown.value.status, unknown.value.code) == (404, "model_not_found")
    assert "no model named 'nope'" in unknown.value.message
    assert wrong_shape.value.code == "invalid_input"
    assert "wrong sample shape" in str(wrong_shape.value)
    assert refused.value.code == "weights_incompatible"
    assert refused.value.status == 422
    assert "missing keys" in refused.value.message
    assert nothing_to_roll_back.value.code == "version_conflict"
    assert "cannot reach the server" in unreachable.value.message


@pytest.mark.app
async def test_health_of_a_server_with_a_model_that_cannot_serve_says_why(
    tmp_path: Path,
) -> None:
    app = create_app(make_settings(tmp_path, LINEAR, BROKEN))
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with AsyncModelportClient("http://modelport", transport=transport) as client:
            health = await client.health()
    assert health["ready"] is False
    assert "missing keys" in health["unavailable"]["broken"]


# --- inputs and outputs by name ------------------------------------------------------------------


@pytest.fixture(scope="module")
def named_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """Serves sentiment and linear, with the same body cap as ``server``."""
    directory = tmp_path_factory.mktemp("named-server")
    config = write_config(directory, SENTIMENT, LINEAR)
    env = {"MODELPORT_MAX_BODY_BYTES": str(MAX_BODY_BYTES)}
    with run_server(directory, config, env=env) as process:
        yield process


@pytest.fixture
def named_client(named_server: ServerProcess) -> Iterator[ModelportClient]:
    with ModelportClient(named_server.url) as client:
        yield client


def test_inputs_by_name_as_arrays_go_as_one_npz_and_the_outputs_come_back_by_name(
    named_client: ModelportClient,
) -> None:
    expected = sentiment_outputs(TOKENS)
    small = first(3)
    as_torch = {name: torch.from_numpy(value.astype(np.int64)) for name, value in small.items()}

    outputs = named_client.predict("sentiment", TOKENS)
    from_torch = named_client.predict("sentiment", as_torch)
    linear = named_client.predict("linear", {"input": BATCH})
    postprocessed = named_client.predict("sentiment", TOKENS, postprocess=True)
    prediction = named_client.prediction("sentiment", small)
    # The same values as JSON lists are over the server's body cap that the .npz passed.
    as_lists = {name: value.tolist() for name, value in TOKENS.items()}
    with pytest.raises(PayloadTooLargeError):
        named_client.predict("sentiment", as_lists)

    assert list(outputs) == ["logits", "embedding"]
    assert {name: (a.shape, a.dtype) for name, a in outputs.items()} == {
        "logits": ((200, 3), np.float32),
        "embedding": ((200, 4), np.float32),
    }
    for name, values in expected.items():
        np.testing.assert_allclose(outputs[name], values, rtol=0, atol=1e-6)
        np.testing.assert_allclose(from_torch[name], values[:3], rtol=0, atol=1e-6)
        np.testing.assert_allclose(prediction.outputs[name], values[:3], rtol=0, atol=1e-6)
        per_sample = [sample[name] for sample in postprocessed["outputs"]]
        np.testing.assert_allclose(per_sample, values, rtol=0, atol=1e-6)
    # a model of one output answers inputs by name by name too
    assert list(linear) == ["output"]
    np.testing.assert_allclose(linear["output"], BUNDLED.outputs(BATCH), rtol=0, atol=1e-6)
    version = named_client.model("sentiment")["version"]
    assert (prediction.model, prediction.version) == ("sentiment", version)
    assert postprocessed["version"] == version


def test_inputs_by_name_as_lists_go_as_json_and_either_answer_form_is_had_on_request(
    named_client: ModelportClient,
) -> None:
    small = {name: value.tolist() for name, value in first(4).items()}
    expected = sentiment_outputs(small)

    answer = named_client.predict("sentiment", small)
    raw = named_client.predict("sentiment", small, postprocess=False)
    linear = named_client.predict("linear", {"input": [SAMPLE]})

    assert answer["model"] == "sentiment"
    assert [list(sample) for sample in answer["outputs"]] == [["logits", "embedding"]] * 4
    assert list(raw) == ["logits", "embedding"]
    for name, values in expected.items():
        np.testing.assert_allclose([s[name] for s in answer["outputs"]], values, atol=1e-6)
        np.testing.assert_allclose(raw[name], values, rtol=0, atol=1e-6)
    np.testing.assert_allclose(linear["outputs"], BUNDLED.outputs([SAMPLE]), atol=1e-6)


def test_inputs_the_server_refuses_by_name_raise_typed_errors_with_its_words(
    named_client: ModelportClient,
) -> None:
    ids, mask = TOKENS["input_ids"][:2], TOKENS["attention_mask"][:2]
    refused = {
        "missing array": {"input_ids": ids},
        "missing list": {"input_ids": ids.tolist()},
        "sample counts": {"input_ids": ids, "attention_mask": mask[:1]},
        "float ids": {"input_ids": ids.astype(np.float32), "attention_mask": mask},
    }

    errors = {}
    for what, inputs in refused.items():
        with pytest.raises(InvalidInputError) as error:
            named_client.predict("sentiment", inputs)
        errors[what] = error.value
    with pytest.raises(NotAcceptableError) as one_raw_tensor:
        named_client.predict("sentiment", ids)  # one unnamed array: the raw output asked for
    with pytest.raises(InvalidInputError) as unnamed:
        named_client.predict("sentiment", ids, postprocess=True)

    assert {(e.status, e.code) for e in errors.values()} == {(422, "invalid_input")}
    for what in ("missing array", "missing list"):
        assert "takes the inputs ['input_ids', 'attention_mask']; received ['input_ids']" in (
            errors[what].message
        ), what
        assert errors[what].detail == {"expected_inputs": ["input_ids", "attention_mask"]}
    assert "different numbers of samples" in errors["sample counts"].message
    assert "input 'input_ids': wrong dtype" in errors["float ids"].message
    assert (one_raw_tensor.value.status, one_raw_tensor.value.code) == (406, "not_acceptable")
    assert "has 2 outputs (logits, embedding)" in one_raw_tensor.value.message
    assert "takes 2 inputs by name (input_ids, attention_mask)" in unnamed.value.message


async def test_the_async_client_sends_inputs_by_name_as_the_sync_one_does(
    named_server: ServerProcess,
) -> None:
    small = first(3)
    expected = sentiment_outputs(small)
    async with AsyncModelportClient(named_server.url) as client:
        outputs = await client.predict("sentiment", small)
        answer = await client.predict("sentiment", {k: v.tolist() for k, v in small.items()})
        with pytest.raises(PayloadTooLargeError):
            await client.predict("sentiment", {k: v.tolist() for k, v in TOKENS.items()})
        with pytest.raises(InvalidInputError) as missing:
            await client.predict("sentiment", {"attention_mask": small["attention_mask"]})

    for name, values in expected.items():
        np.testing.assert_allclose(outputs[name], values, rtol=0, atol=1e-6)
        np.testing.assert_allclose([s[name] for s in answer["outputs"]], values, atol=1e-6)
    assert "received ['attention_mask']" in missing.value.message


class Recorder:
    """A transport's handler that keeps each request and answers as a server of sentiment
    would: an .npz of both outputs, or their JSON (or ``npz_answer``, when given)."""

    def __init__(self, npz_answer: bytes | None = None) -> None:
        self.requests: list[httpx.Request] = []
        self.npz_answer = npz_answer

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        headers = {"X-Model-Version": "v1"}
        if request.headers["Accept"] != "application/x-npz":
            body = {"model": "sentiment", "version": "v1", "outputs": [{"logits": [0.0]}]}
            return httpx.Response(200, json=body, headers=headers)
        stream = io.BytesIO()
        np.savez(stream, logits=np.ones((2, 3), np.float32), embedding=np.zeros((2, 4)))
        content = stream.getvalue() if self.npz_answer is None else self.npz_answer
        return httpx.Response(
            200, content=content, headers=headers | {"Content-Type": "application/x-npz"}
        )


def sent_npz(request: httpx.Request) -> dict[str, np.ndarray]:
    """The arrays of a request's .npz body by name."""
    with np.load(io.BytesIO(request.content), allow_pickle=False) as archive:
        return {name: archive[name] for name in archive.files}


@pytest.mark.unit
async def test_both_clients_send_arrays_by_name_as_one_npz_and_lists_as_json() -> None:
    ids = np.arange(16, dtype=">i8").reshape(2, 8)  # big-endian: sent little-endian
    mask = torch.ones((2, 8), dtype=torch.bfloat16)  # sent as the float32 values it holds
    recorder = Recorder()
    transport, async_transport = httpx.MockTransport(recorder), httpx.MockTransport(recorder)
    with ModelportClient("http://modelport", transport=transport) as client:
        sync_answer = client.predict("sentiment", {"input_ids": ids, "attention_mask": mask})
        client.predict("sentiment", {"input_ids": [[1] * 8]})
        client.predict("sentiment", {"input_ids": ids}, postprocess=True)
        client.predict("sentiment", {"input_ids": [[1] * 8]}, postprocess=False)
    async with AsyncModelportClient("http://modelport", transport=async_transport) as aclient:
        async_answer = await aclient.prediction(
            "sentiment", {"input_ids": ids, "attention_mask": mask}
        )

    arrays, lists, postprocessed, raw_of_lists, async_arrays = recorder.requests
    for request in (arrays, async_arrays):
        assert request.headers["Content-Type"] == request.headers["Accept"] == "application/x-npz"
        members = zipfile.ZipFile(io.BytesIO(request.content)).namelist()
        assert members == ["input_ids.npy", "attention_mask.npy"]
        sent = sent_npz(request)
        assert (sent["input_ids"].dtype.str, sent["attention_mask"].dtype.str) == ("<i8", "<f4")
        np.testing.assert_array_equal(sent["input_ids"], ids)
        np.testing.assert_array_equal(sent["attention_mask"], np.ones((2, 8)))
    assert arrays.content == async_arrays.content
    assert lists.headers["Content-Type"] == lists.headers["Accept"] == "application/json"
    assert json.loads(lists.content) == {"inputs": {"input_ids": [[1] * 8]}}
    assert postprocessed.headers["Content-Type"] == "application/x-npz"
    assert postprocessed.headers["Accept"] == "application/json"
    assert raw_of_lists.headers["Content-Type"] == "application/json"
    assert raw_of_lists.headers["Accept"] == "application/x-npz"
    for outputs in (sync_answer, async_answer.outputs):
        assert {name: a.shape for name, a in outputs.items()} == {
            "logits": (2, 3),
            "embedding": (2, 4),
        }
    assert async_answer.version == "v1"


@pytest.mark.unit
async def test_inputs_by_name_no_wire_carries_are_refused_before_anything_is_sent() -> None:
    ids = np.ones((1, 8), np.int64)
    never_sent: dict[str, dict[Any, Any]] = {
        "object array": {"input_ids": ids, "attention_mask": np.array([[1, None]], dtype=object)},
        "complex tensor": {"input_ids": torch.ones((1, 8), dtype=torch.complex64)},
        "a string": {"input_ids": "the film was great"},
        "a number": {"input_ids": 5},
        "a name not a string": {1: ids},
        "arrays and lists": {"input_ids": ids, "attention_mask": [[1] * 8]},
    }
    recorder = Recorder()
    transport, async_transport = httpx.MockTransport(recorder), httpx.MockTransport(recorder)

    unsendable: dict[str, list[str]] = {}
    with ModelportClient("http://modelport", transport=transport) as client:
        async with AsyncModelportClient("http://modelport", transport=async_transport) as aclient:
            for what, inputs in never_sent.items():
                with pytest.raises(UnsendableInputError) as local:
                    client.predict("sentiment", inputs)
                with pytest.raises(UnsendableInputError) as async_local:
                    await aclient.predict("sentiment", inputs)
                unsendable[what] = [local.value.message, async_local.value.message]

    assert recorder.requests == []
    assert all(sync == async_ for sync, async_ in unsendable.values())
    messages = {what: pair[0] for what, pair in unsendable.items()}
    assert messages["object array"].startswith("input 'attention_mask': an object array")
    assert messages["complex tensor"].startswith("input 'input_ids': complex numbers")
    assert messages["a string"].startswith("input 'input_ids' cannot be sent: str is not")
    assert messages["a number"].startswith("input 'input_ids' cannot be sent: int is not")
    assert messages["a name not a string"] == "input names are strings; received 1"
    assert messages["arrays and lists"].startswith(
        "inputs ['input_ids'] are arrays but ['attention_mask'] are lists"
    )


@pytest.mark.unit
def test_a_malformed_npz_answer_is_a_client_error() -> None:
    transport = httpx.MockTransport(Recorder(npz_answer=b"not a zip"))
    with (
        ModelportClient("http://modelport", transport=transport) as client,
        pytest.raises(ModelportClientError) as malformed,
    ):
        client.predict("sentiment", {"input_ids": np.ones((1, 8), np.int64)})
    assert (
        malformed.value.message == "malformed .npz answer: not an .npz file: File is not a zip file"
    )
