"""The inference service on its own: every front door's request forms give the same answer,
and its checks, version selection and errors hold without any HTTP in front."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from app.codecs.arrays import to_batch
from app.errors import InvalidInput, ModelNotFound, ModelUnavailable, VersionNotFound
from app.serving.catalog import INPUT_NAME, OUTPUT_NAME
from app.serving.inference import InferenceRequest, InferenceService
from app.serving.registry import ModelRegistry
from tests.helpers import DIGITS, LINEAR, registry_for

pytestmark = pytest.mark.unit

SAMPLES = np.random.default_rng(7).normal(size=(3, 10)).astype(np.float32)


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[ModelRegistry]:
    """The bundled models loaded, their inference threads running."""
    registry = registry_for(tmp_path, LINEAR, DIGITS, max_samples_per_request=4)
    registry.load_all()
    registry.start()
    yield registry
    registry.close()


@pytest.fixture
def service(registry: ModelRegistry) -> InferenceService:
    return InferenceService(registry, max_samples=4)


async def test_lists_arrays_and_named_inputs_give_the_same_outputs_as_the_model(
    service: InferenceService, registry: ModelRegistry
) -> None:
    target = await service.target("linear")
    forms = [SAMPLES.tolist(), SAMPLES, {INPUT_NAME: SAMPLES}, {INPUT_NAME: SAMPLES.tolist()}]
    results = [await service.infer(target, InferenceRequest(form)) for form in forms]
    runtime = registry.get("linear").active()
    with torch.inference_mode():
        expected = runtime.module(torch.from_numpy(SAMPLES))
    for result in results:
        assert (result.model, result.version) == ("linear", runtime.version)
        assert result.samples is None
        torch.testing.assert_close(result.outputs[OUTPUT_NAME], expected)


ROW = [0.5, -1.0, 2.0, 0.0, 1.5, -0.5, 0.25, 3.0, -2.0, 1.0]
NUMBERS_ONLY = {
    "floats": [ROW, ROW[::-1]],
    "integers": [list(range(10))],
    "integers and floats": [[1, 2.5] * 5],
    "a null": [[None, *ROW[1:]]],
    "an integer out of every range": [[10**40, *ROW[1:]]],
    "a float too large for float32": [[1e39, *ROW[1:]]],
    "float32's largest": [[3.4028234663852886e38, *ROW[1:]]],
    "a float over float32's largest that rounds to it": [[3.4028235e38, *ROW[1:]]],
    "a NaN": [[math.nan, *ROW[1:]]],
    "an infinity": [[*ROW[1:], -math.inf]],
    "ragged samples": [ROW, ROW[:9]],
    "a sample of the wrong shape": [ROW[:9]],
    "a sample nested deeper": [[ROW]],
    "one sample unnested": ROW,
    "too many samples": [ROW] * 5,
    "no samples": [],
    "a number": 3.0,
}


@pytest.mark.parametrize("inputs", NUMBERS_ONLY.values(), ids=NUMBERS_ONLY.keys())
def test_lists_proven_to_hold_numbers_only_give_the_batch_typed_lists_give(inputs: object) -> None:
    """Read straight into float32 (known numeric) or typed first: the same batch, or both
    refused."""

    def checked(known_numeric: bool) -> np.ndarray | None:
        try:
            return to_batch(
                inputs, (10,), torch.float32, max_samples=4, known_numeric=known_numeric
            )
        except InvalidInput:
            return None

    direct, typed = checked(True), checked(False)
    if typed is None:
        assert direct is None
    else:
        assert direct is not None
        assert direct.dtype == typed.dtype == np.float32
        assert direct.flags.c_contiguous
        assert direct.flags.writeable
        np.testing.assert_array_equal(direct, typed)


async def test_postprocessed_requests_answer_one_json_value_per_sample(
    service: InferenceService,
) -> None:
    target = await service.target("linear")
    raw = await service.infer(target, InferenceRequest(SAMPLES))
    answered = await service.infer(target, InferenceRequest(SAMPLES, postprocess=True))
    assert answered.outputs == {}
    assert answered.samples == raw.outputs[OUTPUT_NAME].tolist()


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ({"x": SAMPLES}, "takes one input named 'input'"),
        ({INPUT_NAME: SAMPLES, "mask": SAMPLES}, "takes one input named 'input'"),
        (SAMPLES[:, :9], "wrong sample shape"),
        (np.zeros((5, 10), np.float32), "too many samples"),
        (np.array(1.0, np.float32), "scalar"),
        ([["a"] * 10], "must hold numbers"),
        ({"not": "a list"}, "takes one input"),
        ("text", "must be a list of samples"),
    ],
)
async def test_inputs_that_do_not_fit_the_model_are_refused_whatever_their_form(
    service: InferenceService, inputs: object, message: str
) -> None:
    target = await service.target("linear")
    with pytest.raises(InvalidInput, match=message):
        await service.infer(target, InferenceRequest(inputs))  # type: ignore[arg-type]


async def test_the_target_is_the_named_model_else_an_error_naming_the_served_ones(
    service: InferenceService,
) -> None:
    assert (await service.target("digits")).model.name == "digits"
    with pytest.raises(ModelNotFound, match="digits, linear"):
        await service.target("nope")
    with pytest.raises(InvalidInput, match="several models are served"):
        await service.target(None)


@pytest.mark.parametrize("version", ["0123456789ab", "../../etc", "ACTIVE", ""])
async def test_a_version_that_is_not_stored_is_not_found(
    service: InferenceService, version: str
) -> None:
    with pytest.raises(VersionNotFound):
        await service.target("linear", version)


async def test_the_active_version_by_id_is_the_runtime_already_serving(
    service: InferenceService, registry: ModelRegistry
) -> None:
    active = registry.get("linear").active()
    target = await service.target("linear", active.version)
    assert target.pinned is active
    result = await service.infer(target, InferenceRequest(SAMPLES))
    assert result.version == active.version


async def test_a_model_that_cannot_serve_is_refused_before_its_inputs_are_read(
    service: InferenceService, registry: ModelRegistry
) -> None:
    model = registry.get("linear")
    model.runtime, model.error = None, "its weights failed to load"
    with pytest.raises(ModelUnavailable, match="its weights failed to load"):
        await service.target("linear")
