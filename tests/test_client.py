"""app.client, sync and async, against a real server process."""

from __future__ import annotations

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
    PermissionDeniedError,
    ServerUnreachable,
)
from app.http.app import create_app
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


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    directory = tmp_path_factory.mktemp("client-server")
    config = write_config(directory, LINEAR, DIGITS, SYNC_COPY, ASYNC_COPY)
    with run_server(directory, config, env={"MODELPORT_ADMIN_TOKEN": TOKEN}) as process:
        yield process


@pytest.fixture
def client(server: ServerProcess) -> Iterator[ModelportClient]:
    with ModelportClient(server.url, TOKEN) as client:
        yield client


def test_predict_takes_lists_numpy_arrays_and_torch_tensors(client: ModelportClient) -> None:
    batch = [SAMPLE, [1.0] * 10]
    answers = [
        client.predict("linear", batch),
        client.predict("linear", np.array(batch, np.float32)),
        client.predict("linear", torch.tensor(batch, requires_grad=True)),
    ]
    for answer in answers:
        assert answer["model"] == "linear"
        assert answer["version"] == answers[0]["version"]
        assert np.allclose(answer["outputs"], BUNDLED.outputs(batch), atol=1e-6)


def test_metadata_and_health(client: ModelportClient) -> None:
    info = client.model("digits")
    names = [model["name"] for model in client.models()]
    health = client.health()
    assert (info["input_shape"], info["status"]) == ([8, 8], "ready")
    assert names == ["linear", "digits", "linear-sync", "linear-async"]
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
        before = await client.predict("linear-async", np.array([SAMPLE], np.float32))
        stored = await client.upload(
            "linear-async", weights, chunk_bytes=512, progress=lambda sent, _: progress.append(sent)
        )
        after = await client.predict("linear-async", torch.tensor([SAMPLE]))
        versions = await client.versions("linear-async")
        rolled_back = await client.rollback("linear-async")
        with pytest.raises(NotFoundError):
            await client.activate("linear-async", "0123456789ab")
        models = await client.models()
    assert health["ready"] is True
    assert info["version"] == before["version"]
    assert np.allclose(before["outputs"], BUNDLED.outputs([SAMPLE]), atol=1e-6)
    assert progress[-1] == weights.stat().st_size
    assert after["version"] == stored["version"] != before["version"]
    assert versions["previous"] == before["version"]
    assert rolled_back["version"] == before["version"]
    assert len(models) == 4


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
