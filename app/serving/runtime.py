"""ModelRuntime: one registered module with its weights loaded, in eval() on its device."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from app.codecs.arrays import to_batch
from app.errors import AcceptanceFailed, SmokeTestFailed, WeightsChanged
from app.serving.catalog import Acceptance, ModelSpec
from app.serving.weights import (
    LoadReport,
    WeightsFile,
    check_finite,
    check_tensors,
    inspect_file,
    match_state_dict,
    read_state_dict,
)


@dataclass(frozen=True)
class ModelRuntime:
    """A module ready to serve, and the identity of the weights it serves."""

    spec: ModelSpec
    kwargs: Mapping[str, Any]
    module: nn.Module
    device: torch.device
    weights: WeightsFile
    report: LoadReport
    loaded_at: datetime
    output_dtype: torch.dtype = torch.float32
    """The dtype of the raw forward output, as the smoke test saw it."""
    output_sample_shape: tuple[int, ...] = ()
    """The per-sample shape of the raw forward output, as the smoke test saw it."""

    @property
    def version(self) -> str:
        """The version id: the first 12 hex digits of the weights' sha256."""
        return self.weights.sha256[:12]

    @property
    def parameter_count(self) -> int:
        """Number of scalar parameters of the module."""
        return sum(p.numel() for p in self.module.parameters())

    def forward(self, batch: np.ndarray) -> torch.Tensor:
        """Run one checked batch through preprocess and the module; the output on the CPU."""
        with torch.inference_mode():
            x = torch.from_numpy(batch).to(self.device, self.spec.input_dtype)
            if self.spec.preprocess is not None:
                x = self.spec.preprocess(x)
            output = self.module(x)
        if not isinstance(output, torch.Tensor):
            raise SmokeTestFailed(f"forward returned a {type(output).__name__}, not a tensor")
        return output.cpu()

    def predict(self, batch: np.ndarray) -> list[Any]:
        """Forward, then one JSON-ready output per sample."""
        return self.postprocess(self.forward(batch))

    def postprocess(self, output: torch.Tensor) -> list[Any]:
        """One JSON-ready value per sample: the registered postprocess, or nested lists."""
        if self.spec.postprocess is not None:
            return self.spec.postprocess(output)
        result: list[Any] = output.tolist()
        return result


def check_constructor_kwargs(spec: ModelSpec, kwargs: Mapping[str, Any]) -> str | None:
    """Why ``spec.cls(**kwargs)`` would fail to bind, or None when it binds."""
    try:
        inspect.signature(spec.cls).bind(**kwargs)
    except TypeError as exc:
        return f"{spec.cls.__name__}({', '.join(kwargs)}): {exc}"
    return None


def build_runtime(
    spec: ModelSpec,
    kwargs: Mapping[str, Any],
    weights_path: Path,
    device: torch.device,
    *,
    strict: bool = True,
    checkpoint_key: str | None = None,
    require_finite: bool = True,
    load_device: torch.device | None = None,
    expected_sha256: str | None = None,
) -> ModelRuntime:
    """Build the module, load the file into it, switch to eval() and smoke-test it.

    The file is read onto ``load_device`` (default: ``device``; uploads read onto the CPU);
    given ``expected_sha256`` (the version's record), bytes that differ are refused. Keys,
    shapes and dtypes are matched first; only the tensors the model takes are then checked
    (dense, on a real device, finite). Raises a WeightsError subclass when the file cannot
    serve; nothing half-built escapes.
    """
    weights = inspect_file(weights_path)
    if expected_sha256 is not None and weights.sha256 != expected_sha256:
        raise WeightsChanged(
            f"{weights_path.name} has sha256 {weights.sha256}, but its version was recorded "
            f"with {expected_sha256}: the file was changed on disk"
        )
    with device:
        module = spec.cls(**kwargs)
    load_device = load_device or device
    state_dict = read_state_dict(weights, load_device, checkpoint_key, module.state_dict().keys())
    fitting, report = match_state_dict(module, state_dict, strict)
    check_tensors(fitting, load_device)
    if require_finite:
        check_finite(fitting)
    module.load_state_dict(fitting, strict=False)
    module.eval()
    runtime = ModelRuntime(spec, kwargs, module, device, weights, report, datetime.now(UTC))
    output = smoke_test(runtime)
    return replace(runtime, output_dtype=output.dtype, output_sample_shape=tuple(output.shape[1:]))


def check_acceptance(runtime: ModelRuntime) -> Acceptance | None:
    """Run the model's registered acceptance check, if any; AcceptanceFailed below the bar."""
    check = runtime.spec.acceptance
    if check is None:
        return None
    try:
        result = check(runtime.forward)
    except Exception as exc:  # user check code failing on these weights refuses them
        raise AcceptanceFailed(
            f"the acceptance check failed: {type(exc).__name__}: {exc}"
        ) from None
    if not result.passed:
        raise AcceptanceFailed(
            f"{result.metric} {result.score:.4f} is below the required {result.threshold:.4f}",
            {"acceptance": asdict(result)},
        )
    return result


def validation_report(runtime: ModelRuntime, acceptance: Acceptance | None) -> dict[str, Any]:
    """What was checked before these weights could serve, as stored with the version."""
    return {
        **asdict(runtime.report),
        "smoke_test": "passed",
        "acceptance": None if acceptance is None else asdict(acceptance),
    }


def smoke_test(runtime: ModelRuntime) -> torch.Tensor:
    """Run the example input; the output must be finite and of the expected shape."""
    spec, kwargs = runtime.spec, runtime.kwargs
    batch = to_batch([spec.example(kwargs)], spec.sample_shape(kwargs), spec.input_dtype)
    try:
        output = runtime.forward(batch)
    except SmokeTestFailed:
        raise
    except Exception as exc:  # any failure of user model code on its own example
        raise SmokeTestFailed(f"the example input failed: {type(exc).__name__}: {exc}") from None
    expected = spec.output_sample_shape(kwargs)
    found = tuple(output.shape)
    if found[:1] != (1,) or (expected is not None and found[1:] != expected):
        want = f"[1, {', '.join(map(str, expected))}]" if expected is not None else "[1, ...]"
        raise SmokeTestFailed(
            f"the example input gave an output of shape {list(found)}; expected {want}"
        )
    if output.is_floating_point() and not torch.isfinite(output).all():
        raise SmokeTestFailed("the example input gave a non-finite output (NaN or infinity)")
    return output
