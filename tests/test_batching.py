"""Dynamic batching against the real app: equal outputs, order, isolation, back-pressure."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
from torch import nn

from app.serving.catalog import register
from models.linear import MyModel
from tests.helpers import LINEAR, WEIGHTS, make_settings, serve_in_process


@register("test-batch-recorder", input_shape=(4,), output_shape=(4,))
class Recorder(nn.Module):
    """Doubles its input; records every forward's batch; a gate can hold the forward; an input
    holding -999 makes the whole forward raise."""

    sizes: ClassVar[list[int]] = []
    gate: ClassVar[threading.Event] = threading.Event()

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.full((4,), 2.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        Recorder.gate.wait(10)
        Recorder.sizes.append(len(x))
        if (x == -999).any():
            raise ValueError("poisoned sample")
        return x * self.scale


def label_rows(output: torch.Tensor) -> list[dict[str, float]]:
    """One label per row; a row holding 14 (twice 7) has none."""
    if (output == 14).any():
        raise ValueError("no label for 14")
    return [{"sum": float(row.sum())} for row in output]


@register("test-batch-picky", input_shape=(4,), output_shape=(4,), postprocess=label_rows)
class PickyRecorder(Recorder):
    """A Recorder whose registered postprocess refuses rows holding 14."""


@pytest.fixture
def recorder_entry(tmp_path: Path) -> dict[str, Any]:
    Recorder.sizes.clear()
    Recorder.gate.set()
    torch.save(Recorder().state_dict(), tmp_path / "recorder.pth")
    return {"name": "recorder", "class": "test-batch-recorder", "weights": "recorder.pth"}


def linear_reference(samples: np.ndarray) -> np.ndarray:
    model = MyModel().eval()
    model.load_state_dict(torch.load(WEIGHTS / "linear.pth", weights_only=True))
    with torch.inference_mode():
        return model(torch.from_numpy(samples)).numpy()


async def test_concurrent_mixed_size_requests_get_their_own_outputs_in_order(
    tmp_path: Path,
) -> None:
    rng = np.random.default_rng(0)
    requests = [
        rng.normal(size=(int(rng.integers(1, 6)), 10)).astype(np.float32) for _ in range(60)
    ]
    async with serve_in_process(make_settings(tmp_path, LINEAR)) as client:
        responses = await asyncio.gather(
            *(client.post("/predict", json={"inputs": r.tolist()}) for r in requests)
        )
    for samples, response in zip(requests, responses, strict=True):
        assert response.status_code == 200
        assert np.allclose(response.json()["outputs"], linear_reference(samples), atol=1e-5)


async def test_a_forward_that_raises_fails_only_the_request_that_broke_it(
    tmp_path: Path, recorder_entry: dict[str, Any]
) -> None:
    async with serve_in_process(make_settings(tmp_path, recorder_entry)) as client:
        Recorder.gate.clear()  # hold the first forward so that the rest queue into one batch
        first = asyncio.create_task(client.post("/predict", json={"inputs": [[0, 0, 0, 0]]}))
        await asyncio.sleep(0.2)
        bodies = [[[i, i, i, i]] for i in range(1, 6)] + [[[1, 2, 3, -999]]]
        rest = [asyncio.create_task(client.post("/predict", json={"inputs": b})) for b in bodies]
        await asyncio.sleep(0.2)
        Recorder.gate.set()
        responses = [await first, *[await task for task in rest]]
        after = await client.post("/predict", json={"inputs": [[1, 1, 1, 1]]})
    assert max(Recorder.sizes) == 6, f"the queued requests were not one batch: {Recorder.sizes}"
    poisoned = responses[-1]
    assert poisoned.status_code == 422
    assert poisoned.json()["code"] == "inference_failed"
    assert "ValueError: poisoned sample" in poisoned.json()["error"]
    for i, response in enumerate(responses[:-1]):
        assert response.status_code == 200
        assert response.json()["outputs"] == [[2.0 * i] * 4]
    assert after.status_code == 200


async def test_a_postprocess_that_raises_fails_only_the_request_whose_rows_broke_it(
    tmp_path: Path, recorder_entry: dict[str, Any]
) -> None:
    entry = {**recorder_entry, "class": "test-batch-picky"}
    async with serve_in_process(make_settings(tmp_path, entry)) as client:
        Recorder.gate.clear()  # hold the first forward so that the rest queue into one batch
        first = asyncio.create_task(client.post("/predict", json={"inputs": [[0, 0, 0, 0]]}))
        await asyncio.sleep(0.2)
        bodies = [[[i, i, i, i]] for i in range(1, 6)] + [[[7, 7, 7, 7]]]
        rest = [asyncio.create_task(client.post("/predict", json={"inputs": b})) for b in bodies]
        await asyncio.sleep(0.2)
        Recorder.gate.set()
        responses = [await first, *[await task for task in rest]]
    assert max(Recorder.sizes) == 6, f"the queued requests were not one batch: {Recorder.sizes}"
    refused = responses[-1]
    assert refused.status_code == 422
    assert refused.json()["code"] == "inference_failed"
    assert "postprocess failed" in refused.json()["error"]
    assert "no label for 14" in refused.json()["error"]
    for i, response in enumerate(responses[:-1]):
        assert response.status_code == 200
        assert response.json()["outputs"] == [{"sum": 8.0 * i}]


async def test_a_full_queue_answers_503_with_retry_after(
    tmp_path: Path, recorder_entry: dict[str, Any]
) -> None:
    settings = make_settings(tmp_path, recorder_entry, max_queue=2)
    async with serve_in_process(settings) as client:
        Recorder.gate.clear()
        running = asyncio.create_task(client.post("/predict", json={"inputs": [[1, 1, 1, 1]]}))
        await asyncio.sleep(0.2)  # its forward is now held at the gate
        queued = [
            asyncio.create_task(client.post("/predict", json={"inputs": [[1, 1, 1, 1]]}))
            for _ in range(2)
        ]
        await asyncio.sleep(0.2)
        refused = await client.post("/predict", json={"inputs": [[1, 1, 1, 1]]})
        Recorder.gate.set()
        others = [await running, *[await task for task in queued]]
    assert refused.status_code == 503
    assert refused.headers["Retry-After"] == "1"
    assert refused.json()["code"] == "queue_full"
    assert [r.status_code for r in others] == [200, 200, 200]


async def test_a_request_past_its_timeout_gets_504_and_is_dropped_unrun(
    tmp_path: Path, recorder_entry: dict[str, Any]
) -> None:
    settings = make_settings(tmp_path, recorder_entry, request_timeout_s=0.3)
    async with serve_in_process(settings) as client:
        Recorder.gate.clear()
        held = asyncio.create_task(client.post("/predict", json={"inputs": [[1, 1, 1, 1]]}))
        await asyncio.sleep(0.05)
        waiting = await client.post("/predict", json={"inputs": [[5, 5, 5, 5], [6, 6, 6, 6]]})
        timed_out = await held
        Recorder.gate.set()
        after = await client.post("/predict", json={"inputs": [[1, 1, 1, 1]]})
    assert waiting.status_code == 504
    assert waiting.json()["code"] == "timeout"
    assert timed_out.status_code == 504  # its forward started: answered late, still 504
    assert after.status_code == 200
    assert 2 not in Recorder.sizes, "the timed-out request's forward ran anyway"


async def test_a_lone_client_does_not_wait_for_the_batch_delay(
    tmp_path: Path, recorder_entry: dict[str, Any]
) -> None:
    entry = {**recorder_entry, "max_batch_delay_ms": 1000.0}
    async with serve_in_process(make_settings(tmp_path, entry)) as client:
        for _ in range(3):
            # closing at the delay would take a second per request
            response = await asyncio.wait_for(
                client.post("/predict", json={"inputs": [[1, 2, 3, 4]]}), timeout=0.9
            )
            assert response.status_code == 200


async def test_a_request_is_never_split_and_batches_respect_the_max_size(
    tmp_path: Path, recorder_entry: dict[str, Any]
) -> None:
    entry = {**recorder_entry, "max_batch_size": 7}
    async with serve_in_process(make_settings(tmp_path, entry)) as client:
        Recorder.gate.clear()
        first = asyncio.create_task(client.post("/predict", json={"inputs": [[0] * 4] * 3}))
        await asyncio.sleep(0.2)
        rest = [
            asyncio.create_task(client.post("/predict", json={"inputs": [[i] * 4] * 3}))
            for i in range(1, 9)
        ]
        await asyncio.sleep(0.2)
        Recorder.gate.set()
        responses = [await first, *[await task for task in rest]]
    assert all(r.status_code == 200 for r in responses)
    batches = Recorder.sizes[1:]  # after the startup smoke test
    assert all(size % 3 == 0 and size <= 7 for size in batches), batches
    assert 6 in batches, "queued requests were never batched"
    for i, response in enumerate(responses):
        assert response.json()["outputs"] == [[2.0 * i] * 4] * 3


async def test_batching_turned_off_runs_every_request_alone(
    tmp_path: Path, recorder_entry: dict[str, Any]
) -> None:
    entry = {**recorder_entry, "batching": False}
    async with serve_in_process(make_settings(tmp_path, entry)) as client:
        Recorder.gate.clear()
        tasks = [
            asyncio.create_task(client.post("/predict", json={"inputs": [[i] * 4]}))
            for i in range(6)
        ]
        await asyncio.sleep(0.2)
        Recorder.gate.set()
        responses = [await task for task in tasks]
    assert all(r.status_code == 200 for r in responses)
    assert Recorder.sizes[1:] == [1] * 6  # after the startup smoke test


async def test_unavailable_model_is_refused_before_it_is_queued(tmp_path: Path) -> None:
    broken = {"name": "broken", "class": "linear", "weights": str(WEIGHTS / "digits.pth")}
    async with serve_in_process(make_settings(tmp_path, broken)) as client:
        response = await client.post("/predict", json={"inputs": [[0] * 10]})
    assert response.status_code == 503
    assert response.json()["code"] == "model_unavailable"
