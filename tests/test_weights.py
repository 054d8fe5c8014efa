"""Reading weights files safely: formats, checkpoints, prefixes, refusals, fit and smoke tests."""

from __future__ import annotations

import hashlib
import pickle
import random
import struct
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from app.codecs.arrays import to_batch
from app.errors import (
    NonFiniteWeights,
    NotAStateDict,
    PickledObjectRefused,
    SmokeTestFailed,
    WeightsIncompatible,
    WeightsUnreadable,
)
from app.serving.catalog import ModelSpec, get_spec, register
from app.serving.runtime import ModelRuntime, build_runtime
from app.serving.weights import (
    check_finite,
    inspect_file,
    match_state_dict,
    read_state_dict,
    strip_wrapper_prefixes,
)
from tests.helpers import CPU, WEIGHTS, RunsCodeWhenUnpickled, spec_named

pytestmark = pytest.mark.unit


@pytest.fixture
def linear_spec() -> ModelSpec:
    return spec_named("linear")


@pytest.fixture
def digits_spec() -> ModelSpec:
    return spec_named("digits")


def fresh_model(spec: ModelSpec, seed: int = 0) -> nn.Module:
    """The registered class with its default kwargs and seeded random weights."""
    torch.manual_seed(seed)
    return spec.cls(**spec.constructor_kwargs({})).eval()


def build(spec: ModelSpec, path: Path, **options: Any) -> ModelRuntime:
    return build_runtime(spec, spec.constructor_kwargs({}), path, CPU, **options)


def load(path: Path, checkpoint_key: str | None = None) -> dict[str, torch.Tensor]:
    return read_state_dict(inspect_file(path), CPU, checkpoint_key)


def sample_batch(spec: ModelSpec, n: int = 4) -> np.ndarray:
    """The registered example plus a few seeded random samples, as a checked batch."""
    rng = np.random.default_rng(7)
    shape = spec.signature(spec.constructor_kwargs({}))[0].shape
    samples = [spec.example(spec.constructor_kwargs({}))]
    samples += [rng.uniform(0, 16, size=shape).tolist() for _ in range(n - 1)]
    return to_batch(samples, shape, spec.input_dtype)


def assert_serves_like(runtime: ModelRuntime, model: nn.Module) -> None:
    """The runtime's forward gives the same outputs as ``model`` on the same batch."""
    spec = runtime.spec
    batch = sample_batch(spec)
    with torch.inference_mode():
        x = torch.from_numpy(batch).to(spec.input_dtype)
        if spec.preprocess is not None:
            x = spec.preprocess(x)
        expected = model(x)
    torch.testing.assert_close(runtime.forward(batch), expected)


def save_state_dict(state_dict: dict[str, torch.Tensor], path: Path) -> Path:
    torch.save(state_dict, path)
    return path


def digits_state_dict(digits_spec: ModelSpec) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in fresh_model(digits_spec, seed=1).state_dict().items()}


# --- formats and checkpoints -------------------------------------------------------------------


@pytest.mark.parametrize("name", ["linear", "digits"])
def test_plain_state_dict_loads_and_serves_the_same_outputs_as_the_original_model(
    tmp_path: Path, name: str
) -> None:
    spec = spec_named(name)
    model = fresh_model(spec)
    path = tmp_path / f"{name}.pth"
    torch.save(model.state_dict(), path)

    runtime = build(spec, path)

    assert runtime.report.complete
    assert runtime.report.loaded_keys == len(model.state_dict())
    assert not runtime.module.training
    assert_serves_like(runtime, model)


def test_inspect_file_reports_size_sha256_and_version_of_the_file(
    tmp_path: Path, linear_spec: ModelSpec
) -> None:
    path = save_state_dict(fresh_model(linear_spec).state_dict(), tmp_path / "w.pth")
    data = path.read_bytes()

    info = inspect_file(path)

    assert info.format == "torch"
    assert info.size == len(data)
    assert info.sha256 == hashlib.sha256(data).hexdigest()
    assert build(linear_spec, path).version == info.sha256[:12]


@pytest.mark.parametrize("key", ["state_dict", "model_state_dict"])
def test_training_checkpoint_is_unwrapped_from_its_conventional_key(
    tmp_path: Path, linear_spec: ModelSpec, key: str
) -> None:
    model = fresh_model(linear_spec)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    checkpoint = {
        "epoch": 7,
        key: model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "loss": 0.25,
    }
    path = tmp_path / "checkpoint.pt"
    torch.save(checkpoint, path)

    runtime = build(linear_spec, path)

    assert runtime.report.complete
    assert_serves_like(runtime, model)


def test_training_checkpoint_under_a_custom_key_loads_with_checkpoint_key(
    tmp_path: Path, linear_spec: ModelSpec
) -> None:
    model = fresh_model(linear_spec)
    path = tmp_path / "checkpoint.pt"
    torch.save({"epoch": 3, "ema_weights": model.state_dict()}, path)

    runtime = build(linear_spec, path, checkpoint_key="ema_weights")

    assert runtime.report.complete
    assert_serves_like(runtime, model)


def test_absent_checkpoint_key_is_refused_naming_the_keys_the_file_has(
    tmp_path: Path, linear_spec: ModelSpec
) -> None:
    path = tmp_path / "checkpoint.pt"
    torch.save({"epoch": 3, "ema_weights": fresh_model(linear_spec).state_dict()}, path)

    with pytest.raises(NotAStateDict) as info:
        load(path, checkpoint_key="weights")

    message = info.value.message
    assert "'weights'" in message
    assert "not found" in message
    assert "'epoch'" in message
    assert "'ema_weights'" in message


def test_checkpoint_under_an_unconventional_key_without_checkpoint_key_advises_setting_it(
    tmp_path: Path, linear_spec: ModelSpec
) -> None:
    path = tmp_path / "checkpoint.pt"
    torch.save({"epoch": 3, "ema_weights": fresh_model(linear_spec).state_dict()}, path)

    with pytest.raises(NotAStateDict, match="checkpoint_key") as info:
        load(path)

    assert "'ema_weights'" in info.value.message


def test_data_parallel_module_prefix_is_stripped_and_loads(
    tmp_path: Path, linear_spec: ModelSpec
) -> None:
    model = fresh_model(linear_spec)
    wrapped = nn.DataParallel(model)
    assert all(key.startswith("module.") for key in wrapped.state_dict())
    path = save_state_dict(wrapped.state_dict(), tmp_path / "ddp.pth")

    runtime = build(linear_spec, path)

    assert runtime.report.complete
    assert_serves_like(runtime, model)


@pytest.mark.parametrize(
    "prefix",
    ["module.", "_orig_mod.", "module._orig_mod.", "_orig_mod.module."],
    ids=["data-parallel", "torch-compile", "compiled-inside-ddp", "ddp-inside-compiled"],
)
def test_wrapper_prefixes_on_every_key_are_stripped_and_load(
    tmp_path: Path, digits_spec: ModelSpec, prefix: str
) -> None:
    model = fresh_model(digits_spec)
    prefixed = {prefix + key: value for key, value in model.state_dict().items()}
    path = save_state_dict(prefixed, tmp_path / "prefixed.pth")

    assert sorted(load(path)) == sorted(model.state_dict())
    runtime = build(digits_spec, path)
    assert runtime.report.complete
    assert_serves_like(runtime, model)


def test_a_prefix_that_only_some_keys_carry_is_kept() -> None:
    state_dict = {"module.weight": torch.zeros(2), "bias": torch.zeros(2)}

    assert sorted(strip_wrapper_prefixes(state_dict)) == ["bias", "module.weight"]


@pytest.mark.parametrize("filename", ["weights.safetensors", "weights.pth"])
def test_safetensors_file_is_detected_by_content_whatever_its_name(
    tmp_path: Path, digits_spec: ModelSpec, filename: str
) -> None:
    model = fresh_model(digits_spec)
    path = tmp_path / filename
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))

    assert inspect_file(path).format == "safetensors"
    runtime = build(digits_spec, path)
    assert runtime.report.complete
    assert_serves_like(runtime, model)


def test_torch_file_named_safetensors_is_still_read_as_torch(
    tmp_path: Path, linear_spec: ModelSpec
) -> None:
    model = fresh_model(linear_spec)
    path = save_state_dict(model.state_dict(), tmp_path / "weights.safetensors")

    assert inspect_file(path).format == "torch"
    assert_serves_like(build(linear_spec, path), model)


def test_safetensors_with_a_corrupt_header_is_unreadable(
    tmp_path: Path, linear_spec: ModelSpec
) -> None:
    good = tmp_path / "good.safetensors"
    save_file(dict(fresh_model(linear_spec).state_dict()), str(good))
    data = good.read_bytes()
    header_len = struct.unpack("<Q", data[:8])[0]
    header = b"{" + b"\x00garbage, not json" + b" " * (header_len - 19)
    assert len(header) == header_len
    path = tmp_path / "corrupt.safetensors"
    path.write_bytes(data[:8] + header + data[8 + header_len :])

    assert inspect_file(path).format == "safetensors"
    with pytest.raises(WeightsUnreadable, match="corrupt safetensors file"):
        load(path)


# --- files that must never run code ------------------------------------------------------------


def test_whole_pickled_model_is_refused_with_state_dict_advice(
    tmp_path: Path, linear_spec: ModelSpec
) -> None:
    path = tmp_path / "whole-model.pth"
    torch.save(fresh_model(linear_spec), path)

    with pytest.raises(PickledObjectRefused) as info:
        build(linear_spec, path)

    message = info.value.message
    assert "torch.save(model.state_dict(), path)" in message
    assert "whole pickled model" in message
    assert info.value.detail is not None
    assert "models.linear.MyModel" in info.value.detail["globals"]


@pytest.mark.parametrize("nested", [False, True], ids=["bare-object", "inside-a-state-dict"])
def test_pickle_crafted_to_run_code_is_refused_and_never_executed(
    tmp_path: Path, linear_spec: ModelSpec, nested: bool
) -> None:
    marker = tmp_path / "pwned"
    payload = RunsCodeWhenUnpickled(marker)
    path = tmp_path / "evil.pth"
    if nested:
        torch.save({"linear.weight": torch.zeros(2, 10), "linear.bias": payload}, path)
    else:
        torch.save(payload, path)

    with pytest.raises(PickledObjectRefused) as info:
        build(linear_spec, path)

    assert not marker.exists()
    message = info.value.message
    assert "system" in message
    assert "nothing in it was executed" in message
    assert "torch.save(model.state_dict(), path)" in message
    # Control: the file really is dangerous when loaded without weights_only.
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_raw_pickle_file_is_unreadable_and_never_executed(
    tmp_path: Path, linear_spec: ModelSpec
) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "raw.pkl"
    with path.open("wb") as stream:
        pickle.dump(RunsCodeWhenUnpickled(marker), stream)

    with pytest.raises(WeightsUnreadable, match=r"not a torch\.save or safetensors file"):
        build(linear_spec, path)

    assert not marker.exists()
    # Control: the file really is dangerous for a plain unpickler.
    pickle.loads(path.read_bytes())
    assert marker.exists()


# --- unreadable files --------------------------------------------------------------------------


def _half_of_a_real_torch_file(path: Path) -> None:
    data = (WEIGHTS / "digits.pth").read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize(
    ("write", "fragment"),
    [
        (lambda path: path.write_bytes(b""), "the weights file is empty"),
        (_half_of_a_real_torch_file, "truncated or corrupt torch file"),
        (
            lambda path: path.write_bytes(random.Random(20240601).randbytes(4096)),
            "not a torch.save or safetensors file",
        ),
        (
            lambda path: path.write_text("linear.weight = [[1, 2]]\n", encoding="utf-8"),
            "not a torch.save or safetensors file",
        ),
    ],
    ids=["empty", "truncated-torch", "random-bytes", "text"],
)
def test_unreadable_file_is_refused_with_a_clear_message(
    tmp_path: Path, linear_spec: ModelSpec, write: Any, fragment: str
) -> None:
    path = tmp_path / "weights.pth"
    write(path)

    with pytest.raises(WeightsUnreadable) as info:
        build(linear_spec, path)

    assert fragment in info.value.message
    assert "\n" not in info.value.message


def test_missing_weights_file_is_unreadable(tmp_path: Path) -> None:
    with pytest.raises(WeightsUnreadable, match=r"cannot read weights file absent\.pth"):
        inspect_file(tmp_path / "absent.pth")


def test_zip_with_compressed_entries_is_refused_as_a_possible_zip_bomb(
    tmp_path: Path, linear_spec: ModelSpec
) -> None:
    original = save_state_dict(fresh_model(linear_spec).state_dict(), tmp_path / "stored.pth")
    path = tmp_path / "deflated.pth"
    with zipfile.ZipFile(original) as source, zipfile.ZipFile(path, "w") as target:
        for entry in source.infolist():
            target.writestr(entry.filename, source.read(entry), zipfile.ZIP_DEFLATED)

    assert inspect_file(path).format == "torch"
    with pytest.raises(WeightsUnreadable, match="zip bomb"):
        build(linear_spec, path)


# --- fit to the registered class ---------------------------------------------------------------


def test_weights_of_another_model_are_incompatible_naming_missing_and_unexpected_keys(
    tmp_path: Path, linear_spec: ModelSpec, digits_spec: ModelSpec
) -> None:
    path = save_state_dict(digits_state_dict(digits_spec), tmp_path / "digits.pth")

    with pytest.raises(WeightsIncompatible) as info:
        build(linear_spec, path)

    message, detail = info.value.message, info.value.detail
    assert detail is not None
    assert "missing keys: linear.weight, linear.bias" in message
    assert "unexpected keys: features.0.weight" in message
    assert "no key of the file fits the model" in message
    assert detail["missing_keys"] == ["linear.weight", "linear.bias"]
    assert "classifier.3.weight" in detail["unexpected_keys"]
    assert detail["mismatched"] == []


def test_shape_mismatch_names_the_expected_and_found_shapes(
    tmp_path: Path, linear_spec: ModelSpec
) -> None:
    wrong = nn.Linear(10, 3)
    state_dict = {"linear.weight": wrong.weight.detach(), "linear.bias": wrong.bias.detach()}
    path = save_state_dict(state_dict, tmp_path / "three-outputs.pth")

    with pytest.raises(WeightsIncompatible) as info:
        build(linear_spec, path)

    message, detail = info.value.message, info.value.detail
    assert "linear.weight: expected float32[2, 10], found float32[3, 10]" in message
    assert "linear.bias: expected float32[2], found float32[3]" in message
    assert detail is not None
    assert detail["mismatched"][0] == {
        "key": "linear.weight",
        "expected_shape": [2, 10],
        "found_shape": [3, 10],
        "expected_dtype": "float32",
        "found_dtype": "float32",
    }


@pytest.mark.parametrize("dtype", [torch.complex64, torch.bool, torch.int64])
def test_dtype_that_cannot_be_cast_to_the_parameter_is_incompatible(
    tmp_path: Path, linear_spec: ModelSpec, dtype: torch.dtype
) -> None:
    state_dict = dict(fresh_model(linear_spec).state_dict())
    state_dict["linear.weight"] = torch.ones(2, 10, dtype=dtype)
    path = save_state_dict(state_dict, tmp_path / "odd-dtype.pth")

    with pytest.raises(WeightsIncompatible) as info:
        build(linear_spec, path)

    found = str(dtype).removeprefix("torch.")
    assert f"linear.weight: expected float32[2, 10], found {found}[2, 10]" in info.value.message


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_other_floating_dtypes_are_cast_to_the_parameter_dtype(
    tmp_path: Path, linear_spec: ModelSpec, dtype: torch.dtype
) -> None:
    model = fresh_model(linear_spec)
    state_dict = {k: v.to(dtype) for k, v in model.state_dict().items()}
    path = save_state_dict(state_dict, tmp_path / "cast.pth")

    runtime = build(linear_spec, path)

    assert runtime.report.complete
    weight = runtime.module.state_dict()["linear.weight"]
    assert weight.dtype == torch.float32
    assert torch.equal(weight, state_dict["linear.weight"].float())


def test_non_strict_load_keeps_what_fits_and_reports_missing_unexpected_and_mismatched(
    tmp_path: Path, digits_spec: ModelSpec
) -> None:
    state_dict = digits_state_dict(digits_spec)
    del state_dict["classifier.3.bias"]
    state_dict["classifier.1.weight"] = torch.ones(5, 5)
    state_dict["head.extra"] = torch.ones(3)
    path = save_state_dict(state_dict, tmp_path / "partial.pth")

    with pytest.raises(WeightsIncompatible):
        build(digits_spec, path)
    runtime = build(digits_spec, path, strict=False)

    report = runtime.report
    assert not report.strict
    assert not report.complete
    assert report.missing_keys == ["classifier.3.bias"]
    assert report.unexpected_keys == ["head.extra"]
    assert [(m.key, m.expected_shape, m.found_shape) for m in report.mismatched] == [
        ("classifier.1.weight", [64, 512], [5, 5])
    ]
    loaded = runtime.module.state_dict()
    assert report.loaded_keys == len(loaded) - 2
    for key in ("features.0.weight", "features.2.bias", "classifier.3.weight"):
        assert torch.equal(loaded[key], state_dict[key])


def test_match_state_dict_without_strict_returns_only_the_fitting_entries(
    linear_spec: ModelSpec,
) -> None:
    model = fresh_model(linear_spec)
    state_dict = {"linear.weight": torch.ones(2, 10), "other": torch.ones(1)}

    fitting, report = match_state_dict(model, state_dict, strict=False)

    assert list(fitting) == ["linear.weight"]
    assert report.loaded_keys == 1
    assert report.missing_keys == ["linear.bias"]
    assert report.unexpected_keys == ["other"]


def test_non_strict_load_where_nothing_fits_is_still_refused(
    tmp_path: Path, linear_spec: ModelSpec, digits_spec: ModelSpec
) -> None:
    path = save_state_dict(digits_state_dict(digits_spec), tmp_path / "digits.pth")

    with pytest.raises(WeightsIncompatible, match="no key of the file fits the model"):
        build(linear_spec, path, strict=False)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weight_is_refused_naming_the_key(
    tmp_path: Path, digits_spec: ModelSpec, bad: float
) -> None:
    state_dict = digits_state_dict(digits_spec)
    state_dict["classifier.1.bias"][3] = bad
    path = save_state_dict(state_dict, tmp_path / "non-finite.pth")

    with pytest.raises(NonFiniteWeights) as info:
        build(digits_spec, path)

    assert "classifier.1.bias" in info.value.message
    assert info.value.detail == {"keys": ["classifier.1.bias"]}


def test_check_finite_accepts_finite_floats_integers_and_booleans() -> None:
    check_finite(
        {
            "weight": torch.randn(3, 3),
            "steps": torch.tensor(5),
            "mask": torch.tensor([True, False]),
            "phase": torch.tensor([1 + 2j]),
        }
    )
    with pytest.raises(NonFiniteWeights, match="phase"):
        check_finite({"phase": torch.tensor([complex(float("nan"), 0)])})


def test_sparse_tensor_is_not_a_state_dict(tmp_path: Path, linear_spec: ModelSpec) -> None:
    state_dict = dict(fresh_model(linear_spec).state_dict())
    state_dict["linear.weight"] = state_dict["linear.weight"].to_sparse()
    path = save_state_dict(state_dict, tmp_path / "sparse.pth")

    with pytest.raises(NotAStateDict, match=r"'linear\.weight' is a torch\.sparse_coo tensor"):
        build(linear_spec, path)


def test_non_tensor_value_is_not_a_state_dict(tmp_path: Path, linear_spec: ModelSpec) -> None:
    state_dict: dict[str, Any] = dict(fresh_model(linear_spec).state_dict())
    state_dict["linear.bias"] = [0.5, -0.5]
    path = tmp_path / "list-value.pth"
    torch.save(state_dict, path)

    with pytest.raises(NotAStateDict, match=r"'linear\.bias' holds a list, not a tensor"):
        build(linear_spec, path)


def test_file_holding_a_bare_tensor_is_not_a_state_dict(
    tmp_path: Path, linear_spec: ModelSpec
) -> None:
    path = tmp_path / "tensor.pth"
    torch.save(torch.ones(2, 10), path)

    with pytest.raises(NotAStateDict, match="found a Tensor"):
        build(linear_spec, path)


def test_empty_state_dict_is_not_a_state_dict(tmp_path: Path, linear_spec: ModelSpec) -> None:
    path = save_state_dict({}, tmp_path / "empty-dict.pth")

    with pytest.raises(NotAStateDict, match="empty"):
        build(linear_spec, path)


# --- smoke test --------------------------------------------------------------------------------


class NanOutputNet(nn.Module):
    """Finite weights, NaN outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) * float("nan")


class WrongShapeNet(nn.Module):
    """Registered with two outputs, gives three."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


class ListOutputNet(nn.Module):
    """Returns its scores as nested lists, not as a tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> dict[str, list[list[float]]]:
        return {"scores": self.linear(x).tolist()}


class CrashingNet(nn.Module):
    """Its forward fails on any input."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)  # the registered input has 4 features, the layer takes 5


@pytest.mark.parametrize(
    ("name", "cls", "fragment"),
    [
        ("test-weights-nan-output", NanOutputNet, "non-finite output (NaN or infinity)"),
        ("test-weights-wrong-shape", WrongShapeNet, "output of shape [1, 3]; expected [1, 2]"),
        ("test-weights-list-output", ListOutputNet, "output 'scores' is a list, not a tensor"),
        ("test-weights-crashing", CrashingNet, "the example input failed: RuntimeError"),
    ],
)
def test_model_failing_its_smoke_test_is_refused(
    tmp_path: Path, name: str, cls: type[nn.Module], fragment: str
) -> None:
    register(name, input_shape=(4,), output_shape=(2,))(cls)
    spec = spec_named(name)
    path = save_state_dict(cls().state_dict(), tmp_path / f"{name}.pth")

    with pytest.raises(SmokeTestFailed) as info:
        build(spec, path)

    assert fragment in info.value.message


# --- bundled weights ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["linear", "digits"])
def test_bundled_weights_load_strictly(name: str) -> None:
    spec = spec_named(name)

    runtime = build(spec, WEIGHTS / f"{name}.pth", strict=True)

    assert runtime.report.strict
    assert runtime.report.complete
    assert runtime.report.loaded_keys == len(runtime.module.state_dict())


@register("test-weights-own-module", input_shape=(3,), output_shape=(2,))
class OwnModuleNamedModule(nn.Module):
    """A model whose only submodule is called ``module``, like a DataParallel wrapper."""

    def __init__(self) -> None:
        super().__init__()
        self.module = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)


@pytest.mark.parametrize("wrapped", [False, True], ids=["own-keys", "wrapped-in-ddp"])
def test_a_model_whose_submodule_is_called_module_keeps_its_own_keys(
    tmp_path: Path, wrapped: bool
) -> None:
    spec = get_spec("test-weights-own-module")
    assert spec is not None
    model = fresh_model(spec)
    state_dict = nn.DataParallel(model).state_dict() if wrapped else model.state_dict()
    path = save_state_dict(state_dict, tmp_path / "own.pth")

    runtime = build(spec, path)

    assert runtime.report.complete
    assert_serves_like(runtime, model)
