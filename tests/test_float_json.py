"""JSON bodies read straight into arrays (app.codecs.float_json): for the bodies it takes, the
same batch as the general path (orjson, then the checked lists), or the same refusal; every
other body is left to the general path. The same for Open Inference Protocol requests."""

from __future__ import annotations

import numpy as np
import orjson
import pytest
import torch

from app.codecs.arrays import MAX_NESTING, to_batch
from app.codecs.float_json import FROM_BYTES, read_float_inputs, read_v2_request
from app.codecs.v2 import DecodedRequest, decode_request
from app.errors import InvalidInput, ModelportError

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


# --- Open Inference Protocol requests (read_v2_request, through decode_request) ---------------


def v2(*tensors: str, extra: str = "") -> str:
    return f'{{{extra}"inputs": [{", ".join(tensors)}]}}'


def fp(datatype: str = "FP32", data: str = ROW, shape: str = "[1, 10]", more: str = "") -> str:
    return (
        f'{{"name": "input{more}", "datatype": "{datatype}", "shape": {shape}, "data": [{data}]}}'
    )


V2_TAKEN = {
    "one FP32 input": v2(fp()),
    "FP64": v2(fp("FP64")),
    "FP16": v2(fp("FP16")),
    "BF16": v2(fp("BF16")),
    "spaced out": f'{{ "inputs" :\n [ {fp()} ]\n }}',
    "with an id, parameters and outputs": v2(
        fp(),
        extra='"id": "7", "parameters": {"binary_data_output": true}, "outputs": '
        '[{"name": "output", "parameters": {"binary_data": false}}], ',
    ),
    "a float input beside an integer one": v2(fp(), fp("INT64", "1, 2, 3", "[1, 3]", "2")),
    "two float inputs": v2(fp(), fp("FP64", more="2")),
    "a shape that does not hold the data": v2(fp(shape="[1, 5]")),
    "a negative dimension": v2(fp(shape="[-1, 10]")),
    "a large integer after a float": v2(fp(data=f"0.5, 123456789012345678, {ROW[10:]}")),
    "a float too large for float32": v2(fp(data=f"1e39, {ROW[5:]}")),
    "a float too small for float64": v2(fp(data=f"1e-400, {ROW[5:]}")),
    "the same input twice": v2(fp(), fp()),
    "a shape of floats": v2(fp(shape="[1.0, 10]")),
    "an id that is a number": v2(fp(), extra='"id": 7, '),
    "many numbers": v2(fp(data=", ".join([ROW] * 100), shape="[100, 10]")),
}

V2_LEFT = {
    "data led by an integer": v2(fp(data="1, 2.5, 3, 4, 5, 6, 7, 8, 9, 10")),
    "nested data": v2(fp(data=f"[{ROW}]")),
    "an array among the numbers": v2(fp(data="1.5, [2.5], 3.5")),
    "a boolean among the numbers": v2(fp(data="1.5, true")),
    "a null among the numbers": v2(fp(data="1.5, null")),
    "a string among the numbers": v2(fp(data='1.5, "2.5"')),
    "an integer beyond 64 bits": v2(fp(data="1.5, 123456789012345678901234567890")),
    "NaN": v2(fp(data="1.5, NaN")),
    "integer data only": v2(fp("INT64", "1, 2, 3", "[1, 3]")),
    "an unknown datatype": v2(fp("FP8")),
    "a datatype that is not a string": v2(fp().replace('"FP32"', "32")),
    "a [ in the id": v2(fp(), extra='"id": "a[", '),
    "a key twice in a tensor": v2(fp().replace('"name": "input"', '"name": "a", "name": "input"')),
    "a key twice in the parameters": v2(
        fp(), extra='"parameters": {"binary_data_output": true, "binary_data_output": false}, '
    ),
    "inputs twice": v2(fp(), extra=f'"inputs": [{fp()}], '),
    "no inputs": '{"id": "7"}',
    "inputs that are not a list": f'{{"inputs": {fp()}}}',
    "a tensor that is not an object": v2(f"[{ROW}]"),
    "many arrays": v2(*[fp(more=str(index)) for index in range(100)]),
    "not an object": f"[{fp()}]",
    "trailing bytes": v2(fp()) + " x",
}


def _decoded(body: bytes, header_length: str | None) -> DecodedRequest | tuple[str, str]:
    try:
        return decode_request(body, header_length)
    except ModelportError as exc:
        return type(exc).__name__, exc.message


@pytest.mark.parametrize("body", [*V2_TAKEN.values(), *V2_LEFT.values()], ids=[*V2_TAKEN, *V2_LEFT])
def test_a_v2_request_decodes_as_the_general_path_decodes_it(body: str) -> None:
    """The general path reads the body when a header length is given: the whole body then."""
    raw = padded(body)
    fast, general = _decoded(raw, None), _decoded(raw, str(len(raw)))
    if not isinstance(general, DecodedRequest):
        assert fast == general
        return
    assert isinstance(fast, DecodedRequest)
    assert (fast.id, fast.outputs, fast.binary_output) == (
        general.id,
        general.outputs,
        general.binary_output,
    )
    assert fast.inputs.keys() == general.inputs.keys()
    for name, array in general.inputs.items():
        assert fast.inputs[name].dtype == array.dtype
        assert fast.inputs[name].flags.writeable
        np.testing.assert_array_equal(fast.inputs[name], array)


@pytest.mark.parametrize("body", V2_TAKEN.values(), ids=V2_TAKEN.keys())
def test_a_v2_request_of_flat_float_data_is_read_straight_into_arrays(body: str) -> None:
    request = read_v2_request(padded(body))
    assert request is not None
    assert any(isinstance(tensor.get("data"), np.ndarray) for tensor in request["inputs"])


@pytest.mark.parametrize("body", V2_LEFT.values(), ids=V2_LEFT.keys())
def test_any_other_v2_request_is_left_to_the_general_path(body: str) -> None:
    assert read_v2_request(padded(body)) is None


def test_a_small_v2_request_is_left_to_the_general_path() -> None:
    body = padded(v2(fp()))
    assert read_v2_request(body) is not None
    assert read_v2_request(body.strip()) is None
