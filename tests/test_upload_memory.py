"""Deploying large weights beside serving models: a torch file is read memory-mapped (its bytes
are not copied beside the model being built), the finite check allocates nothing of the
tensor's size and still finds every NaN and infinity, and a runtime is built on a thread of its
own with one torch thread at a lower OS priority than the serving threads."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from app.errors import NonFiniteWeights
from app.serving.model import BUILD_TORCH_THREADS, in_background
from app.serving.registry import ModelRegistry
from app.serving.weights import all_finite, check_finite, inspect_file, read_state_dict
from tests.helpers import CPU, registry_for, store_version

pytestmark = pytest.mark.unit

SEEN: list[tuple[str, int, int]] = []
"""(thread name, torch threads, OS scheduling policy) of each forward of ThreadRecorder."""


class ThreadRecorder(nn.Module):
    """``nn.Linear(4, 2)`` whose forward notes the thread it runs on (the smoke test runs it
    where the runtime is built)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        thread = threading.get_native_id()
        policy = os.sched_getscheduler(thread)
        SEEN.append((threading.current_thread().name, torch.get_num_threads(), policy))
        return self.linear(x)


RECORDER = {
    "name": "recorder",
    "class": f"{__name__}:ThreadRecorder",
    "weights": "recorder.pth",
    "register": {"input_shape": [4], "input_dtype": "float32"},
}


def mappings_of(path: Path) -> list[tuple[int, int]]:
    """The address ranges where this process maps ``path``."""
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] == str(path):
            start, end = (int(address, 16) for address in fields[0].split("-"))
            ranges.append((start, end))
    return ranges


def inside(tensor: torch.Tensor, ranges: list[tuple[int, int]]) -> bool:
    address = tensor.data_ptr()
    return any(start <= address < end for start, end in ranges)


def test_a_torch_zip_file_is_read_memory_mapped_not_copied(tmp_path: Path) -> None:
    path = tmp_path / "big.part"
    torch.save({"weight": torch.randn(512, 512), "bias": torch.randn(512)}, path)

    state_dict = read_state_dict(inspect_file(path), CPU)

    ranges = mappings_of(path)
    assert ranges, "the file is not mapped"
    assert all(inside(tensor, ranges) for tensor in state_dict.values())
    assert torch.equal(state_dict["weight"], torch.load(path, weights_only=True)["weight"])


def test_a_torch_file_named_safetensors_is_read_by_its_content(tmp_path: Path) -> None:
    path = tmp_path / "weights.safetensors"
    torch.save({"weight": torch.ones(3, 3)}, path)

    state_dict = read_state_dict(inspect_file(path), CPU)

    assert torch.equal(state_dict["weight"], torch.ones(3, 3))


def test_a_legacy_torch_file_still_loads(tmp_path: Path) -> None:
    path = tmp_path / "legacy.pth"
    torch.save({"weight": torch.ones(3, 3)}, path, _use_new_zipfile_serialization=False)

    state_dict = read_state_dict(inspect_file(path), CPU)

    assert torch.equal(state_dict["weight"], torch.ones(3, 3))
    assert not mappings_of(path)


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.complex64]
)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("where", [0, 4_097, -1])
def test_every_nan_or_infinity_is_found_wherever_it_lies(
    dtype: torch.dtype, bad: float, where: int
) -> None:
    values = torch.randn(64, 129).to(dtype)
    values.view(-1)[where] = bad

    assert all_finite(torch.randn(64, 129).to(dtype))
    assert not all_finite(values)
    assert not all_finite(values.t()), "a transposed view"
    with pytest.raises(NonFiniteWeights, match=r"1 tensor\(s\) hold NaN or infinity: w$"):
        check_finite({"ok": torch.zeros(3), "w": values, "n": torch.arange(3)})


def test_an_empty_or_scalar_tensor_is_finite_unless_its_value_is_not() -> None:
    assert all_finite(torch.empty(0, 4))
    assert all_finite(torch.tensor(1.5))
    assert not all_finite(torch.tensor(float("nan")))


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[ModelRegistry]:
    torch.save(ThreadRecorder().state_dict(), tmp_path / "recorder.pth")
    config = dict(RECORDER, weights=str(tmp_path / "recorder.pth"))
    made = registry_for(tmp_path, config, torch_threads=2)
    made.load_all()
    try:
        yield made
    finally:
        made.close()


async def test_an_upload_is_validated_on_a_thread_with_one_torch_thread_in_the_idle_class(
    registry: ModelRegistry, tmp_path: Path
) -> None:
    model = registry.get("recorder")
    new = tmp_path / "new.pth"
    torch.save(ThreadRecorder().state_dict(), new)
    SEEN.clear()

    await store_version(model, new, activate=True)

    assert SEEN, "the smoke test did not run"
    name, threads, policy = SEEN[-1]
    assert name.startswith("build")
    assert threads == BUILD_TORCH_THREADS
    assert policy == os.SCHED_IDLE


async def test_a_build_thread_leaves_the_callers_threads_and_priority_as_they_were() -> None:
    threads = torch.get_num_threads()
    caller = threading.get_native_id()
    niceness = os.getpriority(os.PRIO_PROCESS, caller)
    policy = os.sched_getscheduler(caller)

    seen = await in_background(lambda: (torch.get_num_threads(), threading.get_native_id()))

    assert seen[0] == BUILD_TORCH_THREADS
    assert seen[1] != caller
    assert torch.get_num_threads() == threads
    assert os.getpriority(os.PRIO_PROCESS, caller) == niceness
    assert os.sched_getscheduler(caller) == policy == os.SCHED_OTHER
