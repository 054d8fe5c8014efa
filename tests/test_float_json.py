"""JSON bodies read straight into arrays (app.codecs.float_json): for the bodies it takes, the
same batch as the general path (orjson, then the checked lists), or the same refusal; every
other body is left to the general path."""

from __future__ import annotations

import numpy as np
import orjson
import pytest
import torch

from app.codecs.arrays import MAX_NESTING, to_batch
from app.codecs.float_json import FROM_BYTES, read_float_inputs
from app.errors import InvalidInput

pytestmark = pytest.mark.unit

FIELDS = frozenset({"inputs", "model"})
ROW = "0.5, -1.0, 2.0, 0.0, 1.5, -0.5, 0.25, 3.0, -2.0, 1.0"

TAKEN = {
    "one sample": f'{{"inputs": [[{ROW}]]}}',
    "two samples, spaced out": f'{{\n  "inputs" : [ [{ROW}] ,\n [{ROW}] ] }}',
    "with the model's name": f'{{"model": "linear", "inputs": [[{ROW}]]}}',
    "exponents": '{"inputs": [[1e-3, -2.5E+2, 4E0, 0.1e1, 2, 3, 4, 5, 6, 7]]}',
    "a float too small for float64": f'{{"inputs": [[1e-400, {ROW[5:]}]]}}',
    "a float too large for float32": f'{{"inputs": [[1e39, {ROW[5:]}]]}}',
    "a large integer after a float": f'{{"inputs": [[0.5, 123456789012345678, {ROW[10:]}]]}}',
    "a sample nested deeper": f'{{"inputs": [[[{ROW}]]]}}',
    "one sample unnested": f'{{"inputs": [{ROW}]}}',
    "samples of the wrong shape": '{"inputs": [[0.5, 1.5], [2.5, 3.5]]}',
    "too many samples": f'{{"inputs": [{", ".join([f"[{ROW}]"] * 5)}]}}',
    "many samples of many numbers": f'{{"inputs": [{", ".join([f"[{ROW}]"] * 100)}]}}',
}

LEFT = {
    "led by an integer": '{"inputs": [[1, 2.5, 3, 4, 5, 6, 7, 8, 9, 10]]}',
    "ragged samples": f'{{"inputs": [[{ROW}], [0.5]]}}',
    "ragged samples of the right count": '{"inputs": [[1.5, 2.5], [3.5], [4.5, 5.5, 6.5]]}',
    "an array among the numbers": '{"inputs": [[1.5, [2.5]]]}',
    "a boolean among the numbers": '{"inputs": [[1.5, true]]}',
    "a null among the numbers": '{"inputs": [[1.5, null]]}',
    "a string among the numbers": '{"inputs": [[1.5, "2.5"]]}',
    "an object among the numbers": '{"inputs": [[1.5, {}]]}',
    "inputs twice": '{"inputs": [[1.5]], "inputs": 2.5}',
    "an unknown field": '{"inputs": [[1.5]], "extra": 1}',
    "no inputs": '{"model": "linear"}',
    "a model name that is not a string": '{"inputs": [[1.5]], "model": 3}',
    "a [ in the model's name": '{"inputs": [[1.5]], "model": "a["}',
    "inputs by name": '{"inputs": {"input": [[1.5]]}}',
    "no samples": '{"inputs": []}',
    "many arrays of few numbers": '{"inputs": [' + ", ".join(["[1.5]"] * 1000) + "]}",
    "an empty sample": '{"inputs": [[]]}',
    "a number": '{"inputs": 1.5}',
    "a float too large for float64": '{"inputs": [[1e400]]}',
    "an integer beyond 64 bits": '{"inputs": [[1.5, 123456789012345678901234567890]]}',
    "nested too deep": '{"inputs": '
    + "[" * (MAX_NESTING + 1)
    + "1.5"
    + "]" * (MAX_NESTING + 1)
    + "}",
    "not an object": "[[1.5]]",
    "trailing bytes": '{"inputs": [[1.5]]} x',
    "not JSON": '{"inputs": [[1.5,]]}',
    "not UTF-8": b'{"inputs": [[1.5]], "model": "\xff"}',
    "empty": "",
}


def padded(body: str | bytes) -> bytes:
    """``body`` made long enough to be read (JSON allows any whitespace after a value)."""
    raw = body if isinstance(body, bytes) else body.encode()
    return raw + b" " * FROM_BYTES


def _batch(inputs: object, dtype: torch.dtype, known_numeric: bool) -> np.ndarray | str:
    """The checked batch, or the refusal's message."""
    try:
        return to_batch(inputs, (10,), dtype, max_samples=4, known_numeric=known_numeric)
    except InvalidInput as exc:
        return exc.message


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.int64])
@pytest.mark.parametrize("body", TAKEN.values(), ids=TAKEN.keys())
def test_a_body_it_takes_gives_the_general_paths_batch_or_refusal(
    body: str, dtype: torch.dtype
) -> None:
    read = read_float_inputs(padded(body), FIELDS)
    assert read is not None
    others, array = read
    parsed = orjson.loads(padded(body))
    assert others == {key: value for key, value in parsed.items() if key != "inputs"}
    fast, general = _batch(array, dtype, True), _batch(parsed["inputs"], dtype, True)
    if isinstance(general, str):
        assert fast == general
    else:
        assert isinstance(fast, np.ndarray)
        assert fast.dtype == general.dtype
        assert fast.flags.c_contiguous
        assert fast.flags.writeable
        np.testing.assert_array_equal(fast, general)


@pytest.mark.parametrize("body", LEFT.values(), ids=LEFT.keys())
def test_any_other_body_is_left_to_the_general_path(body: str | bytes) -> None:
    assert read_float_inputs(padded(body), FIELDS) is None


def test_a_field_outside_those_allowed_is_left_to_the_general_path() -> None:
    body = padded(f'{{"model": "linear", "inputs": [[{ROW}]]}}')
    assert read_float_inputs(body, FIELDS) is not None
    assert read_float_inputs(body, frozenset({"inputs"})) is None


def test_a_small_body_is_left_to_the_general_path() -> None:
    """Below a few hundred numbers, orjson's lists cost less than the checks here."""
    body = padded(f'{{"inputs": [[{ROW}]]}}')
    assert read_float_inputs(body, FIELDS) is not None
    assert read_float_inputs(body.strip(), FIELDS) is None
