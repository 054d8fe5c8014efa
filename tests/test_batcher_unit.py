"""DynamicBatcher on its own: a real module behind a real ModelRuntime, no app and no sockets.

Each forward of the module can be held at a gate; while it is held, the requests submitted
after it wait in the queue, so that which of them share a batch is decided, not raced.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from app.errors import InferenceFailed, InferenceTimeout, ModelUnavailable, QueueFull
from app.observability.metrics import Metrics
from app.serving.batching import BatchPolicy, DynamicBatcher
from app.serving.catalog import INPUT_NAME, OUTPUT_NAME, ModelSpec
from app.serving.runtime import ModelRuntime, build_runtime
from tests.helpers import CPU, label_rows

pytestmark = pytest.mark.unit

WAIT_S = 5.0
"""Upper bound on anything that should happen at once; only reached when a test fails."""
POISON = -999.0
"""An input value that makes the whole forward raise."""


class GatedScaler(nn.Module):
    """Multiplies each sample by a learned scale. Every forward records the first column of its
    batch (the ids of its samples), can be held at a gate, and raises on POISON."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.full((3,), 2.0))
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.batches: list[list[float]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.entered.set()
        if not self.gate.wait(WAIT_S):
            raise TimeoutError("the test never opened the gate")
        self.batches.append(x[:, 0].tolist())
        if (x == POISON).any():
            raise ValueError("poisoned sample")
        return x * self.scale


SPEC = ModelSpec(name="unit-gated-scaler", cls=GatedScaler, input_shape=(3,), output_shape=(3,))
LABELLED = ModelSpec(
    name="unit-labelled-scaler",
    cls=GatedScaler,
    input_shape=(3,),
    output_shape=(3,),
    postprocess=label_rows,
)


def samples(*ids: float) -> dict[str, np.ndarray]:
    """One sample per id: ``[id, 1, -1]``, so that each sample's output names its request."""
    return {INPUT_NAME: np.array([[i, 1.0, -1.0] for i in ids], dtype=np.float32)}


def doubled(inputs: dict[str, np.ndarray]) -> list[list[float]]:
    result: list[list[float]] = (inputs[INPUT_NAME] * 2).tolist()
    return result


class Harness:
    """Builds runtimes and batchers, and stops every batcher afterwards (gates opened first)."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.modules: list[GatedScaler] = []
        self.batchers: list[DynamicBatcher] = []

    def runtime(self, scale: float = 2.0, spec: ModelSpec = SPEC) -> ModelRuntime:
        path = self.tmp_path / f"{spec.name}-{scale}.pth"
        torch.save({"scale": torch.full((3,), scale)}, path)
        runtime = build_runtime(spec, {}, path, CPU)
        module = gated(runtime)
        module.batches.clear()  # the smoke test's forward
        module.entered.clear()
        self.modules.append(module)
        return runtime

    def batcher(
        self, active: Callable[[], ModelRuntime], **policy: Any
    ) -> tuple[DynamicBatcher, Metrics]:
        policy.setdefault("max_batch_delay_s", WAIT_S)  # only an empty queue closes a batch early
        metrics = Metrics(list, ["scaler"])
        batcher = DynamicBatcher("scaler", active, BatchPolicy(**policy), metrics, torch_threads=1)
        batcher.start()
        self.batchers.append(batcher)
        return batcher, metrics

    async def held(
        self, spec: ModelSpec = SPEC, **policy: Any
    ) -> tuple[DynamicBatcher, GatedScaler, asyncio.Task[Any]]:
        """A batcher over one runtime, with a first request (``samples(0)``) whose forward is
        held at the gate: what is submitted next queues behind it."""
        runtime = self.runtime(spec=spec)
        batcher, _ = self.batcher(lambda: runtime, **policy)
        module = gated(runtime)
        return batcher, module, await hold(module, batcher.submit(samples(0)))

    def close(self) -> None:
        for module in self.modules:
            module.gate.set()
        for batcher in self.batchers:
            batcher.stop()


def gated(runtime: ModelRuntime) -> GatedScaler:
    module = runtime.module
    assert isinstance(module, GatedScaler)
    return module


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Harness]:
    built = Harness(tmp_path)
    try:
        yield built
    finally:
        built.close()


async def hold(module: GatedScaler, task: Any) -> asyncio.Task[Any]:
    """Close the gate, submit ``task`` and return once its forward is held at the gate."""
    module.gate.clear()
    module.entered.clear()
    running = asyncio.ensure_future(task)
    entered = await asyncio.to_thread(module.entered.wait, WAIT_S)
    assert entered, "the first request's forward never started"
    return running


async def enqueued(*submits: Any) -> list[asyncio.Task[Any]]:
    """Start the submissions and return once every one of them is in the queue: ``submit``
    queues its request before its first await, and a task created earlier takes its first
    step before this one resumes from ``sleep(0)``."""
    tasks = [asyncio.ensure_future(submit) for submit in submits]
    await asyncio.sleep(0)
    return tasks


async def answered(*tasks: asyncio.Task[Any]) -> list[Any]:
    """Every task's result or error, failing the test (not hanging it) if one is never answered."""
    return await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), WAIT_S)


async def test_requests_queued_behind_a_forward_run_as_one_batch_and_each_gets_its_own_rows(
    harness: Harness,
) -> None:
    runtime = harness.runtime()
    batcher, _ = harness.batcher(lambda: runtime)
    module = gated(runtime)
    first = await hold(module, batcher.submit(samples(0)))
    requests = [samples(10), samples(20, 21), samples(30, 31, 32), samples(40)]
    rest = await enqueued(*(batcher.submit(r) for r in requests))
    module.gate.set()
    results = await answered(first, *rest)
    assert module.batches == [[0.0], [10.0, 20.0, 21.0, 30.0, 31.0, 32.0, 40.0]]
    for inputs, (served_by, outputs) in zip([samples(0), *requests], results, strict=True):
        assert served_by is runtime
        assert outputs == doubled(inputs)


async def test_raw_outputs_are_split_back_per_request_without_postprocess(
    harness: Harness,
) -> None:
    batcher, module, first = await harness.held(spec=LABELLED)
    raw, labelled = await enqueued(
        batcher.submit(samples(1, 2), postprocess=False), batcher.submit(samples(3))
    )
    module.gate.set()
    _, (_, raw_rows), (_, labels) = await answered(first, raw, labelled)
    assert module.batches[-1] == [1.0, 2.0, 3.0]
    assert list(raw_rows) == [OUTPUT_NAME]
    assert raw_rows[OUTPUT_NAME].tolist() == doubled(samples(1, 2))
    assert labels == [{"sum": 6.0}]


async def test_a_batch_closes_before_it_would_exceed_the_max_size_and_never_splits_a_request(
    harness: Harness,
) -> None:
    batcher, module, first = await harness.held(max_batch_size=6)
    pairs = [samples(i, i + 0.5) for i in range(1, 8)]
    rest = await enqueued(*(batcher.submit(pair) for pair in pairs))
    module.gate.set()
    results = await answered(first, *rest)
    assert [len(batch) for batch in module.batches] == [1, 6, 6, 2]
    for inputs, (_, outputs) in zip(pairs, results[1:], strict=True):
        assert outputs == doubled(inputs)


async def test_a_batch_stops_collecting_at_its_deadline_even_while_others_wait(
    harness: Harness,
) -> None:
    batcher, module, first = await harness.held(max_batch_delay_s=0.0)
    rest = await enqueued(*(batcher.submit(samples(i)) for i in range(1, 4)))
    module.gate.set()
    results = await answered(first, *rest)
    assert module.batches == [[0.0], [1.0], [2.0], [3.0]]
    assert [outputs for _, outputs in results] == [doubled(samples(i)) for i in range(4)]


async def test_a_lone_request_does_not_wait_for_the_batch_delay(harness: Harness) -> None:
    runtime = harness.runtime()
    batcher, _ = harness.batcher(lambda: runtime, max_batch_delay_s=60.0)
    for i in range(3):
        # closing at the delay would take a minute per request
        _, outputs = await asyncio.wait_for(batcher.submit(samples(i)), WAIT_S)
        assert outputs == doubled(samples(i))


async def test_a_forward_that_raises_fails_only_the_request_that_broke_it(
    harness: Harness,
) -> None:
    batcher, module, first = await harness.held()
    bodies = [samples(1), samples(2, 3), samples(4, POISON), samples(5)]
    rest = await enqueued(*(batcher.submit(body) for body in bodies))
    module.gate.set()
    ok1, ok2, poisoned, ok3 = (await answered(first, *rest))[1:]
    assert module.batches[1] == [1.0, 2.0, 3.0, 4.0, POISON, 5.0]  # one batch, which raised
    assert isinstance(poisoned, InferenceFailed)
    assert "ValueError: poisoned sample" in poisoned.message
    for inputs, (_, outputs) in zip(
        [bodies[0], bodies[1], bodies[3]], [ok1, ok2, ok3], strict=True
    ):
        assert outputs == doubled(inputs)
    _, after = await asyncio.wait_for(batcher.submit(samples(6)), WAIT_S)
    assert after == doubled(samples(6))


async def test_a_postprocess_that_raises_fails_only_the_request_whose_rows_broke_it(
    harness: Harness,
) -> None:
    batcher, module, first = await harness.held(spec=LABELLED)
    rest = await enqueued(batcher.submit(samples(1)), batcher.submit(samples(7)))
    module.gate.set()
    _, (_, labels), refused = await answered(first, *rest)
    assert module.batches[1] == [1.0, 7.0]
    assert labels == [{"sum": 2.0}]
    assert isinstance(refused, InferenceFailed)
    assert "postprocess failed" in refused.message
    assert "no label for 14" in refused.message


async def test_a_pinned_request_runs_on_its_version_in_a_batch_of_its_own(
    harness: Harness,
) -> None:
    active, pinned = harness.runtime(scale=2.0), harness.runtime(scale=3.0)
    batcher, _ = harness.batcher(lambda: active)
    first = await hold(gated(active), batcher.submit(samples(0)))
    rest = await enqueued(
        batcher.submit(samples(1)),
        batcher.submit(samples(2), runtime=pinned),
        batcher.submit(samples(3), runtime=pinned),
    )
    gated(active).gate.set()
    (_, one), (two_by, two), (three_by, three) = (await answered(first, *rest))[1:]
    assert gated(active).batches == [[0.0], [1.0]]
    assert gated(pinned).batches == [[2.0, 3.0]]
    assert one == doubled(samples(1))
    assert two_by is pinned
    assert three_by is pinned
    assert two == (samples(2)[INPUT_NAME] * 3).tolist()
    assert three == (samples(3)[INPUT_NAME] * 3).tolist()


async def test_an_unpinned_request_queued_behind_a_pinned_one_runs_on_the_active_version(
    harness: Harness,
) -> None:
    active, pinned = harness.runtime(scale=2.0), harness.runtime(scale=3.0)
    batcher, _ = harness.batcher(lambda: active)
    first = await hold(gated(active), batcher.submit(samples(0)))
    rest = await enqueued(
        batcher.submit(samples(1), runtime=pinned),
        batcher.submit(samples(2)),
    )
    gated(active).gate.set()
    (_, one), (two_by, two) = (await answered(first, *rest))[1:]
    assert gated(pinned).batches == [[1.0]]
    assert one == (samples(1)[INPUT_NAME] * 3).tolist()
    assert two_by is active
    assert two == doubled(samples(2))


async def test_a_request_runs_on_the_version_active_when_its_batch_opens(
    harness: Harness,
) -> None:
    old, new = harness.runtime(scale=2.0), harness.runtime(scale=3.0)
    serving = [old]
    batcher, _ = harness.batcher(lambda: serving[0])
    first = await hold(gated(old), batcher.submit(samples(0)))
    (queued,) = await enqueued(batcher.submit(samples(1)))
    serving[0] = new  # the swap: one reference, while a forward of the old one is in flight
    gated(old).gate.set()
    (held_by, held_out), (queued_by, queued_out) = await answered(first, queued)
    assert held_by is old
    assert held_out == doubled(samples(0))
    assert queued_by is new
    assert queued_out == (samples(1)[INPUT_NAME] * 3).tolist()


async def test_a_request_when_no_version_can_serve_fails_with_the_reason(
    harness: Harness,
) -> None:
    def unavailable() -> ModelRuntime:
        raise ModelUnavailable("model 'scaler' cannot serve: no weights")

    batcher, _ = harness.batcher(unavailable)
    with pytest.raises(ModelUnavailable, match="no weights"):
        await asyncio.wait_for(batcher.submit(samples(1)), WAIT_S)


async def test_a_full_queue_refuses_at_once_and_what_waits_still_runs(harness: Harness) -> None:
    batcher, module, first = await harness.held(max_queue=2)  # running, no longer queued
    queued = await enqueued(batcher.submit(samples(1)), batcher.submit(samples(2)))
    with pytest.raises(QueueFull, match="2 requests waiting"):
        await asyncio.wait_for(batcher.submit(samples(3)), WAIT_S)
    module.gate.set()
    results = await answered(first, *queued)
    assert [outputs for _, outputs in results] == [doubled(samples(i)) for i in range(3)]
    assert 3.0 not in [i for batch in module.batches for i in batch]


async def test_a_request_past_its_timeout_fails_and_is_dropped_unrun(harness: Harness) -> None:
    batcher, module, first = await harness.held(timeout_s=0.3)
    (waiting,) = await enqueued(batcher.submit(samples(1)))
    late, expired = await answered(first, waiting)
    assert isinstance(expired, InferenceTimeout)
    assert isinstance(late, InferenceTimeout)  # its forward had started: answered late, still 504
    module.gate.set()
    _, after = await asyncio.wait_for(batcher.submit(samples(2)), WAIT_S)
    assert after == doubled(samples(2))
    assert module.batches == [[0.0], [2.0]], "the timed-out request's forward ran anyway"


async def test_each_waiting_request_times_out_at_its_own_deadline(harness: Harness) -> None:
    batcher, module, first = await harness.held(timeout_s=0.4)
    (earlier,) = await enqueued(batcher.submit(samples(1)))
    await asyncio.sleep(0.2)
    (later,) = await enqueued(batcher.submit(samples(2)))
    with pytest.raises(InferenceTimeout):
        await asyncio.wait_for(earlier, WAIT_S)
    assert not later.done(), "timed out with the request before it, not at its own deadline"
    with pytest.raises(InferenceTimeout):
        await asyncio.wait_for(later, WAIT_S)
    module.gate.set()
    await answered(first)
    _, after = await asyncio.wait_for(batcher.submit(samples(3)), WAIT_S)
    assert after == doubled(samples(3))


async def test_a_request_whose_caller_left_is_dropped_before_its_forward(
    harness: Harness,
) -> None:
    batcher, module, first = await harness.held()
    (left,) = await enqueued(batcher.submit(samples(1)))
    left.cancel()
    with pytest.raises(asyncio.CancelledError):
        await left
    module.gate.set()
    await answered(first)
    _, after = await asyncio.wait_for(batcher.submit(samples(2)), WAIT_S)
    assert after == doubled(samples(2))
    assert module.batches == [[0.0], [2.0]]


async def test_stop_finishes_the_running_batch_fails_what_waits_and_refuses_new_requests(
    harness: Harness,
) -> None:
    batcher, module, first = await harness.held()
    waiting = await enqueued(batcher.submit(samples(1)), batcher.submit(samples(2)))
    stopping = asyncio.ensure_future(asyncio.to_thread(batcher.stop))
    refused = await answered(*waiting)  # answered while the running forward is still held
    assert all(isinstance(error, QueueFull) for error in refused), refused
    assert all("shutting down" in error.message for error in refused)
    assert not stopping.done()  # stop waits for the batch in progress
    module.gate.set()
    await asyncio.wait_for(stopping, WAIT_S)
    ((_, outputs),) = await answered(first)
    assert outputs == doubled(samples(0))
    assert module.batches == [[0.0]]
    with pytest.raises(QueueFull, match="shutting down"):
        await asyncio.wait_for(batcher.submit(samples(3)), WAIT_S)
