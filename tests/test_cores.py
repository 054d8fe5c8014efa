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
from tests.helpers import CPU, wait_until_async

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
        # long enough to stay off the event loop's thread too (batching.ON_LOOP_S)
        self.compute_s = 2 * max(cores.WIDE_FROM_S, batching.ON_LOOP_S)
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


async def submitted(made: DynamicBatcher, count: int = 1) -> None:
    """``count`` requests submitted together and answered, and the forward that answered them
    let go of: an answer comes before its forward is done with, and a request arriving in
    between waits for the inference thread, wherever it could have run."""
    await asyncio.gather(*(made.submit(sample()) for _ in range(count)))
    await wait_until_async(lambda: not made._running, "the forward's end", WAIT_S)


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
    monkeypatch.setattr(batching, "ON_LOOP_S", 0.0)  # on the inference thread, as with a share of 2
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


async def test_a_short_forward_on_one_intra_op_thread_runs_on_the_event_loops_own_thread(
    busy: list[int], counter: tuple[ThreadCounter, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Handing it to the inference thread and its answer back would cost more than the
    forward; the loop's thread keeps one intra-op thread, so no second OpenMP team."""
    module, batcher = counter
    monkeypatch.setattr(batching, "WIDE_FROM_S", 0.05)  # far from a bare forward, on any machine
    monkeypatch.setattr(batching, "ON_LOOP_S", 10.0)  # (a first forward's warm-up may be long)
    module.compute_s = 0.0
    loop_thread = threading.current_thread().name
    one, two = batcher(torch_threads=1, name="one"), batcher(torch_threads=2, name="two")
    for _ in range(3):
        await submitted(one)
    # the first is widened (its length unknown); it was short, so the others run here
    wide = module.on[0]
    assert wide.startswith("wide")
    assert module.on == [wide, loop_thread, loop_thread]
    assert module.seen == [EVERY, 1, 1]
    assert torch.get_num_threads() == 1
    busy[1] = 1  # not widened: a share of two computes on the inference thread
    for _ in range(2):
        await two.submit(sample())
    assert module.on[3:] == ["infer-two", "infer-two"]
    assert module.seen[3:] == [2, 2]


async def test_a_batch_expected_to_take_over_on_loop_s_runs_on_the_inference_thread(
    busy: list[int], counter: tuple[ThreadCounter, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Expected to take as long as the model's last forward, and the least a sample has cost
    lately for each sample more: a forward here takes ``compute_s`` whatever its size (a cost
    per forward, as a small model's), so a batch of two costs a sample half of what one alone
    does."""
    module, batcher = counter
    monkeypatch.setattr(batching, "ON_LOOP_S", 0.34)
    module.compute_s = 0.2
    busy[1] = 1  # another worker computes: nothing is widened
    made = batcher(torch_threads=1)
    await submitted(made)  # unknown: on the thread
    await submitted(made)  # 0.2 s expected: here
    await submitted(made, 2)  # 0.2 + 0.2 s: on the thread
    await submitted(made, 2)  # 0.2 s: here
    await submitted(made)  # 0.2 s: here
    await submitted(made, 2)  # 0.2 + 0.125 s (a sample of the last two at 0.1 s, grown by 1/4)
    loop_thread = threading.current_thread().name
    on_thread = "infer-counter"
    assert module.on == [on_thread, loop_thread, on_thread, loop_thread, loop_thread, loop_thread]


async def test_requests_arriving_while_the_thread_computes_wait_for_it_not_the_loop(
    busy: list[int], counter: tuple[ThreadCounter, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """One forward of a model at a time: a request that could run on the loop waits for the
    thread's forward in progress, and the thread takes it next."""
    module, batcher = counter
    monkeypatch.setattr(batching, "ON_LOOP_S", 0.15)
    module.compute_s = 0.1
    busy[1] = 1
    made = batcher(torch_threads=1)
    await made.submit(sample())  # measured: one alone would run on the loop from now
    module.entered.clear()
    module.gate.clear()
    held = asyncio.gather(made.submit(sample()), made.submit(sample()))  # two: on the thread
    assert await asyncio.to_thread(module.entered.wait, WAIT_S)
    behind = asyncio.ensure_future(made.submit(sample()))
    await asyncio.sleep(0.05)  # (run on the loop, it would hold the loop at the gate)
    module.gate.set()
    await asyncio.wait_for(asyncio.gather(held, behind), WAIT_S)
    assert module.on == ["infer-counter"] * 3


async def test_forwards_on_the_loop_give_their_memory_back_once_idle(
    busy: list[int], counter: tuple[ThreadCounter, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The inference thread trims the heap once nothing has come for IDLE_TRIM_S, after the
    forwards the loop ran too (it had nothing of its own to wake it for)."""
    module, batcher = counter
    monkeypatch.setattr(batching, "ON_LOOP_S", 10.0)  # (a first forward's warm-up may be long)
    module.compute_s = 0.0
    busy[1] = 1
    made = batcher(torch_threads=1)

    async def trimmed() -> None:
        seconds = batching.IDLE_TRIM_S + WAIT_S
        await wait_until_async(lambda: not made._forwarded, "the idle trim", seconds)

    await made.submit(sample())  # the first, on the thread
    await trimmed()
    for _ in range(3):
        await made.submit(sample())
    assert module.on[1:] == [threading.current_thread().name] * 3
    await trimmed()


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
