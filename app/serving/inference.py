"""The inference service every front door calls: it resolves the model and the version, checks
the inputs against the model's signature once for every protocol, and runs them through the
model's batcher. Front doors only parse their wire format into an :class:`InferenceRequest`
and render the :class:`InferenceResult` (or the error raised) in their own dress."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from app.codecs.arrays import to_batch
from app.errors import InvalidInput, ModelportError
from app.serving.model import ServedModel
from app.serving.registry import ModelRegistry
from app.serving.runtime import ModelRuntime

INPUT_NAME = "input"
"""The name of a model's one input tensor (the Open Inference Protocol names every tensor)."""
OUTPUT_NAME = "output"
"""The name of a model's one output tensor."""

Values = np.ndarray | list[Any]
"""A batch of samples: an array read from bytes, or nested JSON lists (not yet typed)."""


@dataclass(slots=True)
class Target:
    """The model and version a request runs on."""

    model: ServedModel
    pinned: ModelRuntime | None = None
    """The stored version asked for, loaded; None serves the active version."""


@dataclass(slots=True)
class InferenceRequest:
    """One inference as every protocol describes it."""

    inputs: Values | Mapping[str, Values]
    """The model's one input, unnamed or by name."""
    postprocess: bool = False
    """Answer one JSON-ready output per sample (the model's postprocess) instead of tensors."""
    numeric: bool = False
    """The caller has proven that JSON ``inputs`` hold no string (skips one typing pass)."""


@dataclass(slots=True)
class InferenceResult:
    """The answer: the version that computed it and its outputs."""

    model: str
    version: str
    outputs: dict[str, torch.Tensor]
    """The raw output batch by name, on the CPU (empty when postprocessed)."""
    samples: list[Any] | None = None
    """One JSON-ready output per sample, when postprocessed."""


class InferenceService:
    """Resolves, checks and runs inference requests over the registry's models."""

    def __init__(self, registry: ModelRegistry, max_samples: int) -> None:
        self.registry = registry
        self.max_samples = max_samples

    async def target(self, name: str | None, version: str | None = None) -> Target:
        """The model called ``name`` (else the default or only one) and, when ``version`` is
        given, that stored version loaded (VersionNotFound when it does not exist)."""
        model = self.registry.resolve(name)
        if version is None:
            model.active()  # fail fast, before reading or queueing, when no version can serve
            return Target(model)
        return Target(model, await model.runtime_for(version))

    async def infer(self, target: Target, request: InferenceRequest) -> InferenceResult:
        """Check the inputs and run them on the target's batcher."""
        model = target.model
        started = time.perf_counter()
        try:
            batch = self.batch(model, request)
            runtime, output = await model.batcher.submit(
                batch, runtime=target.pinned, postprocess=request.postprocess
            )
        except ModelportError:
            meant = target.pinned or model.runtime
            tally = model.metrics.tally(model.name, meant.version if meant else "")
            tally.requests("fail", time.perf_counter() - started)
            raise
        tally = model.metrics.tally(model.name, runtime.version)
        tally.requests("success", time.perf_counter() - started)
        if request.postprocess:
            return InferenceResult(model.name, runtime.version, {}, output)
        return InferenceResult(model.name, runtime.version, {OUTPUT_NAME: output})

    def batch(self, model: ServedModel, request: InferenceRequest) -> np.ndarray:
        """The request's inputs as the model's checked input batch, or InvalidInput."""
        values = request.inputs
        if not isinstance(values, list | np.ndarray) and isinstance(values, Mapping):
            names = sorted(values)
            if names != [INPUT_NAME]:
                raise InvalidInput(
                    f"model {model.name!r} takes one input named {INPUT_NAME!r}; received {names}"
                )
            values = values[INPUT_NAME]
        return to_batch(
            values,
            model.sample_shape,
            model.spec.input_dtype,
            max_samples=self.max_samples,
            allow_non_finite=model.spec.allow_non_finite_input,
            known_numeric=request.numeric,
        )
