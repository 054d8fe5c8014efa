"""ModelRuntime: one registered module with its weights loaded, in eval() on its device."""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from app.codecs.arrays import to_batch
from app.codecs.dtypes import TensorSignature
from app.errors import AcceptanceFailed, SmokeTestFailed, WeightsChanged
from app.serving.catalog import INPUT_NAME, OUTPUT_NAME, Acceptance, ModelSpec
from app.serving.loading import meta_attributes, on_meta, owned_copies, takes_everything_from
from app.serving.weights import (
    LoadReport,
    WeightsFile,
    check_finite,
    check_tensors,
    inspect_file,
    match_state_dict,
    read_state_dict,
)

_CPU = torch.device("cpu")
META_FROM_BYTES = 64 << 20
"""Weights files from this size on are loaded into a module built on the meta device. Below,
a second copy costs less than the meta build, whose first use in a process imports torch's
reference operators (~2 s and tens of MiB: every worker's startup paid it)."""


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
    outputs: tuple[TensorSignature, ...] = ()
    """The raw forward outputs (name, per-sample shape, dtype), as the smoke test saw them."""

    @property
    def version(self) -> str:
        """The version id: the first 12 hex digits of the weights' sha256."""
        return self.weights.sha256[:12]

    @property
    def parameter_count(self) -> int:
        """Number of scalar parameters of the module."""
        return sum(p.numel() for p in self.module.parameters())

    @cached_property
    def inputs(self) -> tuple[TensorSignature, ...]:
        """The inputs this module takes, in ``forward``'s order (resolved once, not per
        forward)."""
        return self.spec.signature(self.kwargs)

    def run(self, batch: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
        """Run one checked batch (an array per input name) through preprocess and the
        module; the outputs by name, on the CPU."""
        inputs = self.inputs
        with torch.inference_mode():
            tensors = {
                i.name: torch.from_numpy(batch[i.name]).to(self.device, i.dtype) for i in inputs
            }
            x: Any = tensors if self.spec.inputs is not None else tensors[inputs[0].name]
            if self.spec.preprocess is not None:
                x = self.spec.preprocess(x)
            output = self.module(**x) if isinstance(x, dict) else self.module(x)
        outputs = {name: tensor.cpu() for name, tensor in self._named(output).items()}
        size = len(batch[inputs[0].name])
        for name, tensor in outputs.items():
            if tensor.shape[:1] != (size,):
                raise ValueError(
                    f"output {name!r} has shape {list(tensor.shape)}: not one row per sample of"
                    f" the batch of {size}"
                )
        return outputs

    def _named(self, output: Any) -> dict[str, torch.Tensor]:
        """The forward's tensor, tuple or dict of tensors, by output name."""
        declared = list(self.spec.outputs or {})
        if isinstance(output, torch.Tensor):
            if len(declared) > 1:
                raise SmokeTestFailed(
                    f"forward returned one tensor; the registration names {declared}"
                )
            named = {(declared or [OUTPUT_NAME])[0]: output}
        elif isinstance(output, tuple | list):
            names = declared or [f"{OUTPUT_NAME}_{i}" for i in range(len(output))]
            if len(names) != len(output):
                raise SmokeTestFailed(
                    f"forward returned {len(output)} outputs; the registration names {names}"
                )
            named = dict(zip(names, output, strict=True))
        elif isinstance(output, Mapping):
            named = dict(output)
            if declared and sorted(named) != sorted(declared):
                raise SmokeTestFailed(
                    f"forward returned outputs {sorted(named)}; the registration names {declared}"
                )
            if declared:
                named = {name: named[name] for name in declared}
        else:
            raise SmokeTestFailed(
                f"forward returned a {type(output).__name__}, not a tensor, tuple or dict of them"
            )
        for name, tensor in named.items():
            if not isinstance(tensor, torch.Tensor):
                raise SmokeTestFailed(f"output {name!r} is a {type(tensor).__name__}, not a tensor")
        return named

    def forward(self, batch: np.ndarray | Mapping[str, np.ndarray]) -> Any:
        """:meth:`run` as a model's own code sees it (what an acceptance check calls): an
        array in for a model of one input, a tensor out for one of one output."""
        return _as_given(self.spec, self.run(self._by_name(batch)))

    def predict(self, batch: np.ndarray | Mapping[str, np.ndarray]) -> list[Any]:
        """Forward, then one JSON-ready output per sample."""
        return self.postprocess(self.run(self._by_name(batch)))

    def _by_name(self, batch: np.ndarray | Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray]:
        return {self.inputs[0].name: batch} if isinstance(batch, np.ndarray) else batch

    def postprocess(self, outputs: Mapping[str, torch.Tensor]) -> list[Any]:
        """One JSON-ready value per sample: the registered postprocess, or nested lists (a
        dict of them by output name, for a model of several outputs)."""
        if self.spec.postprocess is not None:
            return self.spec.postprocess(_as_given(self.spec, outputs))
        if len(outputs) == 1:
            [only] = outputs.values()
            result: list[Any] = only.tolist()
            return result
        columns = {name: tensor.tolist() for name, tensor in outputs.items()}
        return [
            dict(zip(columns, sample, strict=True))
            for sample in zip(*columns.values(), strict=True)
        ]


def _as_given(spec: ModelSpec, outputs: Mapping[str, torch.Tensor]) -> Any:
    """The outputs as a model's own code sees them: one tensor, or a dict by name."""
    if len(outputs) == 1 and spec.outputs is None:
        [only] = outputs.values()
        return only
    return dict(outputs)


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
    hashed: bool = False,
) -> ModelRuntime:
    """Build the module, load the file into it, switch to eval() and smoke-test it.

    The file is read onto ``load_device`` (default: the CPU, memory-mapped where it can be);
    given ``expected_sha256`` (the version's record), bytes that differ are refused, unless
    ``hashed`` says the caller hashed these very bytes itself (they are not hashed again).
    Keys, shapes and dtypes are matched first; only the tensors the model takes are then
    checked (dense, on a real device, finite). From META_FROM_BYTES on, the module is built on
    the meta device when its constructor allows and every tensor of it comes from the file: it
    is then never randomly initialised, and takes copies of the file's tensors made chunk by
    chunk (see :mod:`app.serving.loading`). Raises a WeightsError subclass when the file
    cannot serve; nothing half-built escapes.
    """
    weights = inspect_file(weights_path, sha256=expected_sha256 if hashed else None)
    if expected_sha256 is not None and weights.sha256 != expected_sha256:
        raise WeightsChanged(
            f"{weights_path.name} has sha256 {weights.sha256}, but its version was recorded "
            f"with {expected_sha256}: the file was changed on disk"
        )
    module = on_meta(spec.cls, kwargs) if weights.size >= META_FROM_BYTES else None
    if module is None:
        module = _construct(spec, kwargs, device)
    load_device = load_device or _CPU
    state_dict = read_state_dict(weights, load_device, checkpoint_key, module.state_dict().keys())
    fitting, report = match_state_dict(module, state_dict, strict)
    del state_dict  # the file's mapping goes with the last of its tensors
    check_tensors(fitting, load_device)
    if _is_meta(module) and takes_everything_from(module, fitting):
        owned = owned_copies(module, fitting, device, weights_path, require_finite)
        fitting.clear()
        module = _assign(module, owned, lambda: _construct(spec, kwargs, device))
    else:
        # built as usual: what the file does not hold keeps the value its constructor gives
        module = _construct(spec, kwargs, device) if _is_meta(module) else module
        if require_finite:
            check_finite(fitting)
        module.load_state_dict(fitting, strict=False)
    module.eval()
    runtime = ModelRuntime(spec, kwargs, module, device, weights, report, datetime.now(UTC))
    outputs = smoke_test(runtime)
    signatures = tuple(
        TensorSignature(name, tuple(tensor.shape[1:]), tensor.dtype)
        for name, tensor in outputs.items()
    )
    return replace(runtime, outputs=signatures)


def _construct(spec: ModelSpec, kwargs: Mapping[str, Any], device: torch.device) -> nn.Module:
    with device:
        return spec.cls(**kwargs)


def _is_meta(module: nn.Module) -> bool:
    return any(t.is_meta for t in itertools.chain(module.parameters(), module.buffers()))


def _assign(
    module: nn.Module, owned: Mapping[str, torch.Tensor], construct: Callable[[], nn.Module]
) -> nn.Module:
    """The meta-built ``module`` holding ``owned`` (no copy); a module built as usual with
    them copied in, should a custom load hook leave anything on meta."""
    module.load_state_dict(owned, strict=False, assign=True)
    if not meta_attributes(module):
        return module
    module = construct()
    module.load_state_dict(owned, strict=False)
    return module


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


def smoke_test(runtime: ModelRuntime) -> dict[str, torch.Tensor]:
    """Run the example input; each output must be finite and of the expected shape."""
    spec, kwargs = runtime.spec, runtime.kwargs
    example = spec.example(kwargs)
    by_name = example if spec.inputs is not None else {INPUT_NAME: example}
    batch = {i.name: to_batch([by_name[i.name]], i.shape, i.dtype) for i in runtime.inputs}
    try:
        outputs = runtime.run(batch)
    except SmokeTestFailed:
        raise
    except Exception as exc:  # any failure of user model code on its own example
        raise SmokeTestFailed(f"the example input failed: {type(exc).__name__}: {exc}") from None
    declared = spec.output_shapes(kwargs)
    for name, output in outputs.items():
        expected = declared.get(name)
        found = tuple(output.shape)
        if found[:1] != (1,) or (expected is not None and found[1:] != expected):
            want = f"[1, {', '.join(map(str, expected))}]" if expected is not None else "[1, ...]"
            what = "an output" if len(outputs) == 1 else f"output {name!r}"
            raise SmokeTestFailed(
                f"the example input gave {what} of shape {list(found)}; expected {want}"
            )
        if output.is_floating_point() and not torch.isfinite(output).all():
            raise SmokeTestFailed("the example input gave a non-finite output (NaN or infinity)")
    return outputs
