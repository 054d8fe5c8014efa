"""Dynamic batching against the real app: equal outputs, order, isolation, back-pressure."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any, ClassVar

import httpx
import numpy as np
import pytest
import torch
from torch import nn

from app.serving.catalog import register
from tests.helpers import (
    BROKEN,
    BUNDLED,
    LINEAR,
    label_rows,
    make_settings,
    metric,
    serve_in_process,
    wait_until_async,
)

pytestmark = pytest.mark.app


@register("test-batch-recorder", input_shape=(4,), output_shape=(4,))
class Recorder(nn.Module):
    """Doubles its input; records every forward's batch; a gate can hold the forward; an input
    holding -999 makes the whole forward raise."""

    entered: ClassVar[list[int]] = []
    """The size of every forward that started (and may wait at the gate)."""
    sizes: ClassVar[list[int]] = []
    firsts: ClassVar[list[float]] = []
    """The first value of every sample that went through a forward."""
    gate: ClassVar[threading.Event] = threading.Event()

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.full((4,), 2.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        Recorder.entered.append(len(x))
        Recorder.gate.wait(10)
        Recorder.sizes.append(len(x))
        Recorder.firsts.extend(x[:, 0].tolist())
        if (x == -999).any():
            raise ValueError("poisoned sample")
        return x * self.scale


@register("test-batch-picky", input_shape=(4,), output_shape=(4,), postprocess=label_rows)
class PickyRecorder(Recorder):
    """A Recorder whose registered postprocess refuses rows holding 14."""


@pytest.fixture
def recorder_entry(tmp_path: Path) -> dict[str, Any]:
    Recorder.entered.clear()
    Recorder.sizes.clear()
    Recorder.firsts.clear()
    Recorder.gate.set()
    torch.save(Recorder().state_dict(), tmp_path / "recorder.pth")
    return {"name": "recorder", "class": "test-batch-recorder", "weights": "recorder.pth"}


Inputs = list[list[float]]


async def hold_a_forward(client: httpx.AsyncClient, inputs: Inputs) -> asyncio.Task[httpx.Response]:
    """Close the gate and send ``inputs``; returns once their forward waits at the gate."""
    Recorder.gate.clear()
    entered = len(Recorder.entered)
    task = asyncio.create_task(client.post("/predict", json={"inputs": inputs}))
    await wait_until_async(lambda: len(Recorder.entered) > entered, "a forward at the gate")
    return task


async def queue(client: httpx.AsyncClient, *bodies: Inputs) -> list[asyncio.Task[httpx.Response]]:
    """Send a request for each of ``bodies``; returns once they all wait in the queue."""
    tasks = [asyncio.create_task(client.post("/predict", json={"inputs": b})) for b in bodies]

    async def all_queued() -> bool:
        scrape = (await client.get("/metrics")).text
        return metric(scrape, "modelport_queue_depth", model="recorder") == len(bodies)

    await wait_until_async(all_queued, f"{len(bodies)} requests in the queue")
    return tasks


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
        assert np.allclose(response.json()["outputs"], BUNDLED.outputs(samples), atol=1e-5)


async def test_a_forward_that_raises_fails_only_the_request_that_broke_it(
    tmp_path: Path, recorder_entry: dict[str, Any]
) -> None:
    async with serve_in_process(make_settings(tmp_path, recorder_entry)) as client:
        first = await hold_a_forward(client, [[0, 0, 0, 0]])  # so the rest queue into one batch
        bodies = [[[i, i, i, i]] for i in range(1, 6)] + [[[1, 2, 3, -999]]]
        rest = await queue(client, *bodies)
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
        first = await hold_a_forward(client, [[0, 0, 0, 0]])  # so the rest queue into one batch
        bodies = [[[i, i, i, i]] for i in range(1, 6)] + [[[7, 7, 7, 7]]]
        rest = await queue(client, *bodies)
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
        running = await hold_a_forward(client, [[1, 1, 1, 1]])
        queued = await queue(client, [[1, 1, 1, 1]], [[1, 1, 1, 1]])
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
        held = await hold_a_forward(client, [[1, 1, 1, 1]])
        waiting = await client.post("/predict", json={"inputs": [[5, 5, 5, 5], [6, 6, 6, 6]]})
        timed_out = await held
        Recorder.gate.set()
        after = await client.post("/predict", json={"inputs": [[1, 1, 1, 1]]})
    assert waiting.status_code == 504
    assert waiting.json()["code"] == "timeout"
    assert timed_out.status_code == 504  # its forward started: answered late, still 504
    assert after.status_code == 200
    assert {5.0, 6.0}.isdisjoint(Recorder.firsts), "the timed-out request's forward ran anyway"


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
        first = await hold_a_forward(client, [[0] * 4] * 3)
        rest = await queue(client, *([[i] * 4] * 3 for i in range(1, 9)))
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
        first = await hold_a_forward(client, [[0] * 4])  # the others wait meanwhile
        rest = await queue(client, *([[i] * 4] for i in range(1, 6)))
        Recorder.gate.set()
        responses = [await first, *[await task for task in rest]]
    assert all(r.status_code == 200 for r in responses)
    assert Recorder.sizes[1:] == [1] * 6  # after the startup smoke test


async def test_unavailable_model_is_refused_before_it_is_queued(tmp_path: Path) -> None:
    async with serve_in_process(make_settings(tmp_path, BROKEN)) as client:
        response = await client.post("/predict", json={"inputs": [[0] * 10]})
    assert response.status_code == 503
    assert response.json()["code"] == "model_unavailable"
