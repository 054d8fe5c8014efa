"""app.client, sync and async, against a real server process."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from pathlib import Path

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
    TOKEN,
    WEIGHTS,
    ServerProcess,
    free_port,
    linear_weights,
    make_settings,
    run_server,
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
