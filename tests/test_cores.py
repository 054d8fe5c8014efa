"""The intra-op threads each forward runs with (app.serving.cores): every worker's share of the
cores for a request that computes alone (on the process's one wide thread, for models whose lone
forward is long enough), its own worker's share while anything else computes; seen from inside
the forward of a real module behind a real batcher."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from app.observability.metrics import Metrics
from app.serving import batching, cores
from app.serving.batching import BatchPolicy, DynamicBatcher
from app.serving.catalog import INPUT_NAME, ModelSpec
from app.serving.runtime import ModelRuntime, build_runtime
from tests.helpers import CPU

pytestmark = pytest.mark.unit

CORES = os.cpu_count() or 1
SHARE = CORES // 2
"""Each worker's share of the cores, with two workers."""
EVERY = 2 * SHARE
"""The threads of a forward that computes alone: both workers' shares."""
WAIT_S = 5.0
"""Upper bound on anything that should happen at once; only reached when a test fails."""


class ThreadCounter(nn.Module):
    """Records the intra-op threads each forward runs with, and the thread it runs on; a
    forward takes ``compute_s`` (long enough to be widened unless a test says otherwise) and
    can be held at a gate."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(2))
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.compute_s = 2 * cores.WIDE_FROM_S
        self.seen: list[int] = []
        self.on: list[str] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.entered.set()
        if not self.gate.wait(WAIT_S):
            raise TimeoutError("the test never opened the gate")
        time.sleep(self.compute_s)
        self.seen.append(torch.get_num_threads())
        self.on.append(threading.current_thread().name)
        if (x < 0).any():
            raise ValueError("negative sample")
        return x * self.weight


SPEC = ModelSpec(name="unit-thread-counter", cls=ThreadCounter, input_shape=(2,))


def sample(value: float = 1.0) -> dict[str, np.ndarray]:
    return {INPUT_NAME: np.full((1, 2), value, dtype=np.float32)}


@pytest.fixture
def busy(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """This process as worker 0 of two, counting in a plain list (the launcher's is shared
    memory); the process's own share, and this thread's intra-op threads, are put back
    afterwards."""
    if CORES < 2:
        pytest.skip("one core: every forward gets it")
    slots = [0, 0]
    threads = torch.get_num_threads()
    monkeypatch.setattr(cores, "_installed", None)
    cores.install(slots, 0)
    try:
        yield slots
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def counter(tmp_path: Path) -> Iterator[tuple[ThreadCounter, Any]]:
    """A runtime over ThreadCounter and a function making batchers over it (stopped after)."""
    path = tmp_path / "counter.pth"
    torch.save({"weight": torch.ones(2)}, path)
    runtime: ModelRuntime = build_runtime(SPEC, {}, path, CPU)
    module = runtime.module
    assert isinstance(module, ThreadCounter)
    module.seen.clear()  # the smoke test's forward
    module.on.clear()
    module.entered.clear()
    batchers: list[DynamicBatcher] = []

    def batcher(torch_threads: int = SHARE, name: str = "counter") -> DynamicBatcher:
        policy = BatchPolicy(max_batch_delay_s=WAIT_S)
        made = DynamicBatcher(name, lambda: runtime, policy, Metrics(list, [name]), torch_threads)
        made.start()
        batchers.append(made)
        return made

    try:
        yield module, batcher
    finally:
        module.gate.set()
        for made in batchers:
            made.stop()


async def test_a_lone_request_computes_on_every_core(
    busy: list[int], counter: tuple[ThreadCounter, Any]
) -> None:
    module, batcher = counter
    await batcher().submit(sample())
    assert module.seen == [EVERY]
    assert busy == [0, 0]


async def test_every_models_widened_forwards_run_on_one_wide_thread(
    busy: list[int], counter: tuple[ThreadCounter, Any]
) -> None:
    """One OpenMP team per process: a second thread running forwards on several intra-op
    threads would make libgomp stop spinning between a forward's parallel regions."""
    module, batcher = counter
    first, second = batcher(name="first"), batcher(name="second")
    await first.submit(sample())
    await second.submit(sample())
    busy[1] = 1
    await second.submit(sample())
    assert module.seen == [EVERY, EVERY, SHARE]
    wide = module.on[0]
    assert wide.startswith("wide")
    assert module.on == [wide, wide, "infer-second"]
    assert torch.get_num_threads() == 1  # the worker's main thread keeps no team either


async def test_a_model_whose_lone_forward_is_short_computes_alone_on_its_share(
    busy: list[int], counter: tuple[ThreadCounter, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Handing a short forward to the wide thread would cost more than a second core saves."""
    module, batcher = counter
    monkeypatch.setattr(batching, "WIDE_FROM_S", 0.05)  # far from a bare forward, on any machine
    module.compute_s = 0.0
    made = batcher()
    for _ in range(3):
        await made.submit(sample())
    # the first is widened (its length unknown); it was short, so the others are not
    assert module.seen == [EVERY, SHARE, SHARE]
    assert module.on[1:] == ["infer-counter", "infer-counter"]
    module.compute_s = 0.1  # a heavier input: measured on the share, then widened
    await made.submit(sample())
    await made.submit(sample())
    assert module.seen[3:] == [SHARE, EVERY]


async def test_a_request_computes_on_its_share_while_another_worker_computes(
    busy: list[int], counter: tuple[ThreadCounter, Any]
) -> None:
    module, batcher = counter
    made = batcher()
    busy[1] = 1  # the other worker's forward in progress
    await made.submit(sample())
    busy[1] = 0
    await made.submit(sample())
    assert module.seen == [SHARE, EVERY]


async def test_requests_queued_behind_a_forward_compute_on_the_share(
    busy: list[int], counter: tuple[ThreadCounter, Any]
) -> None:
    module, batcher = counter
    made = batcher()
    module.gate.clear()
    first = asyncio.ensure_future(made.submit(sample()))
    assert await asyncio.to_thread(module.entered.wait, WAIT_S)
    assert busy == [1, 0]  # counted in while it computes
    rest = [asyncio.ensure_future(made.submit(sample())) for _ in range(3)]
    await asyncio.sleep(0)  # every one queued behind the held forward
    module.gate.set()
    await asyncio.wait_for(asyncio.gather(first, *rest), WAIT_S)
    # the first came alone; the three queued behind it ran as one batch of several requests
    assert module.seen == [EVERY, SHARE]
    assert busy == [0, 0]


async def test_a_failed_forward_is_counted_out(
    busy: list[int], counter: tuple[ThreadCounter, Any]
) -> None:
    module, batcher = counter
    made = batcher()
    with pytest.raises(Exception, match="negative sample"):
        await made.submit(sample(-1.0))
    assert busy == [0, 0]
    await made.submit(sample())
    assert module.seen[-1] == EVERY


async def test_a_share_set_by_the_operator_is_a_forwards_threads_and_alone_every_workers(
    busy: list[int], counter: tuple[ThreadCounter, Any]
) -> None:
    module, batcher = counter
    made = batcher(torch_threads=3)
    await made.submit(sample())
    busy[1] = 1
    await made.submit(sample())
    busy[1] = 0
    assert module.seen == [6, 3]
