"""Loading weights into a candidate without a second copy: the module is built on the meta
device (never randomly initialised) when it can be, takes the file's values exactly (cast,
tied, whatever the format), falls back to its ordinary construction when it cannot, and the
file's pages are handed back as they are copied. An upload's bytes are hashed once, as they
are received: neither the build nor the blob store reads them again."""

from __future__ import annotations

import asyncio
import os
import re
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from app.errors import NonFiniteWeights, WeightsChanged
from app.serving import runtime as runtime_module
from app.serving.catalog import ModelSpec, register
from app.serving.loading import CHUNK_BYTES, on_meta, owned_copies
from app.serving.manager import VersionManager
from app.serving.registry import ModelRegistry
from app.serving.runtime import ModelRuntime, build_runtime
from app.serving.weights import inspect_file, read_state_dict
from app.state.blobs import FolderBlobStore
from app.state.incoming import IncomingFolder
from tests.helpers import ACTOR, CPU, registry_for, spec_named

pytestmark = pytest.mark.unit

BUILT_ON: list[str] = []
"""The device of each construction of Recorder's parameters."""


@register("test-loading-recorder", input_shape=(4,), output_shape=(2,))
class Recorder(nn.Module):
    """``nn.Linear(4, 2)`` noting where its constructor made (and initialised) its weight."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 2)
        BUILT_ON.append(self.linear.weight.device.type)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


@register("test-loading-reads-values", input_shape=(4,), output_shape=(2,))
class ReadsValues(nn.Module):
    """A constructor that reads a value (``.item()``), which the meta device cannot give."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 2)
        self.scale = float(torch.ones(1).sum().item())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) * self.scale


@register("test-loading-own-buffers", input_shape=(4,), output_shape=(2,))
class OwnBuffers(nn.Module):
    """Values the file never holds: a non-persistent buffer and a plain tensor attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 2)
        self.register_buffer("scale", torch.full((2,), 3.0), persistent=False)
        self.offsets = [torch.tensor([1.0, -1.0])]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) * self.scale + self.offsets[0]


@register("test-loading-tied", input_shape=(4,), output_shape=(4,))
class Tied(nn.Module):
    """An encoder and a decoder sharing one weight (as language models tie embeddings)."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(4, 4, bias=False)
        self.decoder = nn.Linear(4, 4)
        self.decoder.weight = self.encoder.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


def build(spec: ModelSpec, path: Path, **options: object) -> ModelRuntime:
    return build_runtime(spec, {}, path, CPU, **options)  # type: ignore[arg-type]


def saved(module: nn.Module, path: Path) -> dict[str, torch.Tensor]:
    """Save ``module``'s state_dict to ``path``; a copy of it."""
    torch.save(module.state_dict(), path)
    return {key: value.clone() for key, value in module.state_dict().items()}


def assert_holds_exactly(module: nn.Module, expected: dict[str, torch.Tensor]) -> None:
    found = module.state_dict()
    assert list(found) == list(expected)
    for key, value in expected.items():
        assert found[key].dtype == value.dtype, key
        assert torch.equal(found[key], value), key


# --- the candidate module ----------------------------------------------------------------------


@pytest.fixture(autouse=True)
def meta_from_any_size(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """The files of these tests are small: build every candidate the way a large one is
    (unless the test is about the size threshold itself)."""
    if "threshold" not in request.node.name:
        monkeypatch.setattr(runtime_module, "META_FROM_BYTES", 0)


def test_the_candidate_is_built_on_meta_never_initialised_and_holds_exactly_the_file(
    tmp_path: Path,
) -> None:
    expected = saved(Recorder(), tmp_path / "recorder.pth")
    BUILT_ON.clear()

    runtime = build(spec_named("test-loading-recorder"), tmp_path / "recorder.pth")

    assert BUILT_ON == ["meta"]
    assert_holds_exactly(runtime.module, expected)
    assert all(p.requires_grad for p in runtime.module.parameters())


def test_a_file_under_the_meta_threshold_is_loaded_into_a_module_built_as_usual(
    tmp_path: Path,
) -> None:
    """A small model's second copy costs less than the meta build, whose first use imports
    torch's reference operators (seconds of every worker's startup)."""
    expected = saved(Recorder(), tmp_path / "recorder.pth")
    assert (tmp_path / "recorder.pth").stat().st_size < runtime_module.META_FROM_BYTES
    BUILT_ON.clear()

    runtime = build(spec_named("test-loading-recorder"), tmp_path / "recorder.pth")

    assert BUILT_ON == ["cpu"]
    assert_holds_exactly(runtime.module, expected)


def test_a_model_whose_constructor_reads_values_is_built_as_usual(tmp_path: Path) -> None:
    assert on_meta(ReadsValues, {}) is None
    expected = saved(ReadsValues(), tmp_path / "reads.pth")

    runtime = build(spec_named("test-loading-reads-values"), tmp_path / "reads.pth")

    assert_holds_exactly(runtime.module, expected)


def test_values_the_file_does_not_hold_keep_what_the_constructor_gave(tmp_path: Path) -> None:
    model = OwnBuffers()
    expected = saved(model, tmp_path / "own.pth")
    x = torch.randn(3, 4)

    runtime = build(spec_named("test-loading-own-buffers"), tmp_path / "own.pth")

    module = runtime.module
    assert isinstance(module, OwnBuffers)
    assert torch.equal(module.scale, torch.full((2,), 3.0))
    assert torch.equal(module.offsets[0], torch.tensor([1.0, -1.0]))
    assert_holds_exactly(module, expected)
    torch.testing.assert_close(runtime.forward(x.numpy()), model(x).detach())


def test_tied_weights_stay_one_tensor(tmp_path: Path) -> None:
    expected = saved(Tied(), tmp_path / "tied.pth")

    runtime = build(spec_named("test-loading-tied"), tmp_path / "tied.pth")

    module = runtime.module
    assert isinstance(module, Tied)
    assert module.decoder.weight is module.encoder.weight
    assert_holds_exactly(module, expected)


@pytest.mark.parametrize("fmt", ["torch", "legacy-torch", "safetensors"])
def test_a_half_precision_file_loads_cast_into_a_float32_model(tmp_path: Path, fmt: str) -> None:
    half = {k: v.half() for k, v in Recorder().state_dict().items()}
    path = tmp_path / "half.bin"
    if fmt == "safetensors":
        save_file(half, path)
    else:
        torch.save(half, path, _use_new_zipfile_serialization=fmt == "torch")

    runtime = build(spec_named("test-loading-recorder"), path)

    assert_holds_exactly(runtime.module, {k: v.float() for k, v in half.items()})


def test_a_legacy_file_of_tied_weights_loads_from_memory_that_is_never_released(
    tmp_path: Path,
) -> None:
    path = tmp_path / "legacy.pth"
    torch.save(Tied().state_dict(), path, _use_new_zipfile_serialization=False)
    expected = torch.load(path, weights_only=True)

    runtime = build(spec_named("test-loading-tied"), path)

    assert_holds_exactly(runtime.module, expected)


# --- the file's pages ----------------------------------------------------------------------------


def mapped_rss_kib(path: Path) -> int:
    """Resident KiB of this process's mappings of ``path`` (``/proc/self/smaps``)."""
    inode = str(os.stat(path).st_ino)
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if re.fullmatch(r"[0-9a-f]+-[0-9a-f]+", fields[0]):
            inside = len(fields) >= 5 and fields[4] == inode
        elif inside and fields[0] == "Rss:":
            total += int(fields[1])
    return total


@pytest.mark.parametrize("fmt", ["torch", "safetensors"])
def test_the_files_pages_are_released_as_they_are_copied_and_the_copies_are_exact(
    tmp_path: Path, fmt: str
) -> None:
    weights = {"weight": torch.randn(1024, 4096), "bias": torch.randn(1024)}  # 16 MiB
    path = tmp_path / "big.bin"
    if fmt == "safetensors":
        save_file(weights, path)
    else:
        torch.save(weights, path)
    module = on_meta(nn.Linear, {"in_features": 4096, "out_features": 1024})
    assert module is not None
    state_dict = read_state_dict(inspect_file(path), CPU)
    assert mapped_rss_kib(path) < 1024, "mapping the file read nothing yet"

    owned = owned_copies(module, state_dict, CPU, path, require_finite=True)

    assert mapped_rss_kib(path) < CHUNK_BYTES // 1024 // 4
    for key, value in weights.items():
        assert owned[key].data_ptr() != state_dict[key].data_ptr()
        assert torch.equal(owned[key], value)
        assert torch.equal(state_dict[key], value), "a released page reads from the file again"


def test_a_nan_deep_inside_a_large_tensor_is_found_chunk_by_chunk(tmp_path: Path) -> None:
    weights = {"weight": torch.randn(1024, 4096), "bias": torch.randn(1024)}
    weights["weight"][-1, -1] = float("nan")
    torch.save(weights, tmp_path / "nan.pth")
    module = on_meta(nn.Linear, {"in_features": 4096, "out_features": 1024})
    assert module is not None
    state_dict = read_state_dict(inspect_file(tmp_path / "nan.pth"), CPU)

    with pytest.raises(NonFiniteWeights) as info:
        owned_copies(module, state_dict, CPU, tmp_path / "nan.pth", require_finite=True)
    assert info.value.detail == {"keys": ["weight"]}


# --- hashing once --------------------------------------------------------------------------------


def test_a_file_the_caller_hashed_is_taken_at_its_word(tmp_path: Path) -> None:
    saved(Recorder(), tmp_path / "w.pth")
    claimed = "ab" * 32
    spec = spec_named("test-loading-recorder")

    with pytest.raises(WeightsChanged):
        build(spec, tmp_path / "w.pth", expected_sha256=claimed)
    runtime = build(spec, tmp_path / "w.pth", expected_sha256=claimed, hashed=True)

    assert runtime.weights.sha256 == claimed
    assert runtime.weights.size == (tmp_path / "w.pth").stat().st_size


def test_a_hashed_put_takes_the_file_itself_read_only(tmp_path: Path) -> None:
    source = tmp_path / "staged.part"
    source.write_bytes(b"weights")
    store = FolderBlobStore(tmp_path / "blobs")
    sha256 = "cd" * 32  # not read, so not checked: the caller hashed the bytes

    store.put(sha256, source, hashed=True)

    blob = store.root / sha256[:2] / sha256
    assert blob.stat().st_ino == source.stat().st_ino
    assert blob.stat().st_mode & 0o222 == 0
    assert blob.read_bytes() == b"weights"


@pytest.mark.process
def test_a_hashed_put_on_another_file_system_is_copied(small_disk: Path, tmp_path: Path) -> None:
    source = tmp_path / "staged.part"
    source.write_bytes(b"weights")
    store = FolderBlobStore(small_disk / "blobs")

    store.put("ef" * 32, source, hashed=True)

    blob = store.root / "ef" / ("ef" * 32)
    assert blob.read_bytes() == b"weights"
    assert blob.stat().st_dev != source.stat().st_dev


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[ModelRegistry]:
    torch.save(nn.Linear(512, 512).state_dict(), tmp_path / "big.pth")
    config = {
        "name": "big",
        "class": "torch.nn:Linear",
        "weights": str(tmp_path / "big.pth"),
        "kwargs": {"in_features": 512, "out_features": 512},
        "register": {"input_shape": [512], "input_dtype": "float32"},
    }
    made = registry_for(tmp_path, config)
    made.load_all()
    try:
        yield made
    finally:
        made.close()


def bytes_read() -> int:
    """Bytes this process has read with read() calls (not through mappings)."""
    found = re.search(r"rchar: (\d+)", Path("/proc/self/io").read_text())
    assert found is not None
    return int(found.group(1))


async def test_an_uploads_bytes_are_hashed_as_received_and_never_read_back(
    registry: ModelRegistry, tmp_path: Path
) -> None:
    model = registry.get("big")
    torch.save(nn.Linear(512, 512).state_dict(), tmp_path / "new.pth")
    data = (tmp_path / "new.pth").read_bytes()

    async def body() -> AsyncIterator[bytes]:
        yield data

    staged = await model.state.incoming.receive(model.name, body(), 4 << 20)
    staged_inode = staged.path.stat().st_ino
    before = bytes_read()
    outcome = await VersionManager(model).upload(staged, "new.pth", [], True, ACTOR)
    read = bytes_read() - before

    assert read < len(data) // 4, f"{read} bytes read back of an upload of {len(data)}"
    blob = model.state.blobs.fetch(outcome.record.sha256)
    assert blob.stat().st_ino == staged_inode
    assert model.serves(outcome.record.id)


async def test_an_upload_is_written_on_a_thread_in_the_idle_scheduling_class(
    tmp_path: Path,
) -> None:
    seen: list[int] = []

    async def body() -> AsyncIterator[bytes]:
        yield b"weights"
        await asyncio.sleep(0)

    folder = IncomingFolder(tmp_path)
    original = os.write

    def noting_write(fd: int, data: bytes | memoryview) -> int:
        seen.append(os.sched_getscheduler(threading.get_native_id()))
        return original(fd, data)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(os, "write", noting_write)
        staged = await folder.receive("model", body(), 1 << 20)
    staged.discard()

    assert seen
    assert set(seen) == {os.SCHED_IDLE}
    assert os.sched_getscheduler(threading.get_native_id()) == os.SCHED_OTHER
