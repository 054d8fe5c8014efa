"""The inference service every front door calls: it resolves the model and the version, checks
the inputs against the model's signature once for every protocol, and runs them through the
model's batcher. Front doors only parse their wire format into an :class:`InferenceRequest`
and render the :class:`InferenceResult` (or the error raised) in their own dress."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from app.codecs.arrays import json_counts, to_batch
from app.codecs.dtypes import TensorSignature
from app.errors import InvalidInput, ModelportError
from app.serving.batching import Batch
from app.serving.model import ServedModel
from app.serving.registry import ModelRegistry
from app.serving.runtime import ModelRuntime

JSON_COUNTED_FROM = 64 * 1024
"""JSON bodies of this size or more are counted before they are parsed
(:meth:`InferenceService.check_json_counts`); a smaller one parses in a few ms, whatever it
holds."""
JSON_SPARE = 256
"""The arrays and the commas a JSON body may hold beside its samples' (field names, a V2
request's shapes, parameters and outputs asked for)."""
MAX_NAMES_SHOWN = 8
"""The most received input names an error quotes, each cut at 64 characters (a body may hold
thousands, or one of a megabyte)."""

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
    """The model's one input unnamed, or every input by name."""
    postprocess: bool = False
    """Answer one JSON-ready output per sample (the model's postprocess) instead of tensors."""
    numeric: bool = False
    """The caller has proven that JSON ``inputs`` hold numbers only, no strings and no booleans
    (skips one typing pass; a floating-point model reads them straight into its dtype)."""


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

    def check_json_counts(self, body: bytes, model: ServedModel | None) -> None:
        """InvalidInput, before a JSON ``body`` is parsed, when it holds more arrays (``[``) or
        more commas than ``max_samples`` samples of ``model``'s inputs (of the largest model's,
        when the body names its model) are written with, JSON_SPARE aside. Counting 16 MB takes
        a few ms; parsed into lists, a body of many small arrays held the event loop 1.5 s."""
        if len(body) < JSON_COUNTED_FROM:
            return
        models = list(self.registry) if model is None else [model]
        counts = [json_counts(served.inputs, self.max_samples) for served in models]
        arrays = max(arrays for arrays, _ in counts) + JSON_SPARE
        commas = arrays + max(values for _, values in counts)
        whose = "any model served" if model is None else f"model {model.name!r}"
        for mark, most, what, marks in (
            (b"[", arrays, "samples", "arrays"),
            (b",", commas, "values", "commas"),
        ):
            found = body.count(mark)
            if found > most:
                raise InvalidInput(
                    f"too many {what}: the body holds {found} {marks}; {self.max_samples}"
                    f" samples (the limit) of {whose} are written with at most {most}"
                )

    def outputs(self, target: Target, wanted: Iterable[str]) -> list[str]:
        """The outputs to answer: those ``wanted`` (every one when none is named), checked
        against the model's before anything runs (InvalidInput naming an unknown one)."""
        served = [output.name for output in (target.pinned or target.model.active()).outputs]
        names = list(wanted)
        for name in names:
            if name not in served:
                raise InvalidInput(
                    f"model {target.model.name!r} has no output {name!r}; its outputs: {served}"
                )
        return names or served

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
        return InferenceResult(model.name, runtime.version, output)

    def batch(self, model: ServedModel, request: InferenceRequest) -> Batch:
        """The request's inputs as the model's checked input batch, or InvalidInput."""
        signature = model.inputs
        values = request.inputs
        if isinstance(values, list | np.ndarray):
            if len(signature) > 1:
                raise InvalidInput(
                    f"model {model.name!r} takes {len(signature)} inputs by name"
                    f" ({', '.join(i.name for i in signature)}); received one unnamed input"
                )
            values = {signature[0].name: values}
        elif not isinstance(values, Mapping):
            raise InvalidInput(
                f"'inputs' must be a list of samples, or an object of them by input name;"
                f" received {type(values).__name__}"
            )
        else:
            _check_names(model, values)
        batch = {i.name: self._check(model, request, i, values[i.name]) for i in signature}
        counts = {name: len(array) for name, array in batch.items()}
        if len(set(counts.values())) > 1:
            raise InvalidInput(f"the inputs hold different numbers of samples: {counts}")
        return batch

    def _check(
        self, model: ServedModel, request: InferenceRequest, input: TensorSignature, values: Values
    ) -> np.ndarray:
        try:
            return to_batch(
                values,
                input.shape,
                input.dtype,
                max_samples=self.max_samples,
                allow_non_finite=model.spec.allow_non_finite_input,
                known_numeric=request.numeric,
            )
        except InvalidInput as exc:
            if len(model.inputs) == 1:
                raise
            raise InvalidInput(f"input {input.name!r}: {exc.message}", exc.detail) from None


def _check_names(model: ServedModel, values: Mapping[Any, Any]) -> None:
    """InvalidInput unless the inputs given by name are exactly the model's, quoting at most
    MAX_NAMES_SHOWN of those received."""
    names = [i.name for i in model.inputs]
    if len(values) == len(names) and sorted(values) == sorted(names):
        return
    takes = f"one input named {names[0]!r}" if len(names) == 1 else f"the inputs {names}"
    received = sorted(str(name)[:64] for name in values)
    shown = f"{received[:MAX_NAMES_SHOWN]}" + (
        f" and {len(received) - MAX_NAMES_SHOWN} more" if len(received) > MAX_NAMES_SHOWN else ""
    )
    raise InvalidInput(
        f"model {model.name!r} takes {takes}; received {shown}", {"expected_inputs": names}
    )
