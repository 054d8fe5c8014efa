"""Reading the floating-point inputs of a JSON body straight into an array (simdjson), with no
Python object per number: orjson's lists of floats and numpy's pass over them cost an mlp body
(784 numbers) ~35 us and a 3x64x64 image ~600 us; this ~16 and ~300.

It reads only what it can prove the general path (:func:`app.codecs.text.parse_json`, then
:func:`app.codecs.arrays.to_batch` or :func:`app.codecs.v2.from_json`) would read the same:
objects with unique keys; the numbers it reads as an array written with no array or other value
among them, the first one as a float (so that numpy, too, would make the whole array float64).
Anything else, valid or not, gets None and takes the general path, which says what is wrong.

- :func:`read_float_inputs`: the native body, whose ``inputs`` are a rectangular array.
- :func:`read_v2_request`: an Open Inference Protocol JSON request, whose floating-point inputs
  carry their ``data`` flat.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import simdjson

from app.codecs.arrays import MAX_NESTING, arrays_in

FROM_BYTES = 4096
"""Smaller bodies are left to the general path: below a few hundred numbers, orjson's lists cost
less than this path's ~5 us of checks (tiny at 64 connections: -10% with them)."""
ARRAY_BYTES = 32
"""Bodies with more than FEW_ARRAYS arrays, holding fewer bytes than this each on average, are
left to the general path: their numbers are few, and checking every array's length costs more
than reading them saves (a hostile 16 MB body of one-number arrays: 2 s, then the general path's
1-2 s again if one array is ragged)."""
FEW_ARRAYS = 64


def read_float_inputs(
    body: bytes, fields: frozenset[str]
) -> tuple[dict[str, Any], np.ndarray] | None:
    """The body's other fields and its ``inputs`` as a float64 array, or None when the body is
    small or not one this reads (see the module)."""
    if len(body) < FROM_BYTES:
        return None
    arrays = body.count(b"[")
    if arrays > max(FEW_ARRAYS, len(body) // ARRAY_BYTES):
        return None
    found = _unique_fields(_parse(body))
    if found is None or "inputs" not in found or not fields.issuperset(found):
        return None
    inputs = found.pop("inputs")
    if not all(isinstance(value, str) for value in found.values()):
        return None  # (the model's name) the general path says what is wrong
    if not isinstance(inputs, simdjson.Array):
        return None
    shape = _shape(inputs)
    if shape is None or arrays != arrays_in(shape):
        return None  # an array in place of a number, or a "[" in a string: the general path
    try:
        flat = np.frombuffer(inputs.as_buffer(of_type="d"), dtype=np.float64)
    except Exception:  # TypeError: a boolean, null, string or object among the numbers
        return None
    return found, flat.reshape(shape)


def read_v2_request(body: bytes) -> dict[str, Any] | None:
    """An Open Inference Protocol JSON request as plain values, with the flat ``data`` of each
    floating-point input (V2_FLOAT_DATATYPES) led by a float as a float64 array; None when the
    body is small, holds no such input, or is not one this reads (see the module)."""
    if len(body) < FROM_BYTES:
        return None
    arrays = body.count(b"[")
    if arrays > FEW_ARRAYS:
        return None
    reader = _V2Reader()
    try:
        request = reader.request(_parse(body))
    except _Unread:
        return None
    if reader.arrays_read == 0 or arrays != reader.arrays:
        return None  # an array among the numbers read, or a "[" in a string: the general path
    return request


V2_FLOAT_DATATYPES = frozenset({"FP16", "BF16", "FP32", "FP64"})
"""The Open Inference Protocol datatypes whose ``data`` :func:`read_v2_request` reads."""


class _Unread(Exception):
    """What the reader met is the general path's to read."""


class _V2Reader:
    """Converts a parsed V2 request to plain values, counting the arrays it met."""

    def __init__(self) -> None:
        self.arrays = 0
        self.arrays_read = 0
        """The ``data`` arrays read straight into arrays."""

    def request(self, document: Any) -> dict[str, Any]:
        fields = self.fields(document)
        tensors = fields.pop("inputs", None)
        if not isinstance(tensors, simdjson.Array):
            raise _Unread
        request = {key: self.plain(value) for key, value in fields.items()}
        self.arrays += 1
        request["inputs"] = [self.tensor(tensor) for tensor in tensors]
        return request

    def tensor(self, node: Any) -> dict[str, Any]:
        fields = self.fields(node)
        tensor = {key: self.plain(value) for key, value in fields.items() if key != "data"}
        if "data" in fields:
            datatype = tensor.get("datatype")
            floats = isinstance(datatype, str) and datatype in V2_FLOAT_DATATYPES
            data = fields["data"]
            tensor["data"] = self.floats(data) if floats else self.plain(data)
        return tensor

    def floats(self, node: Any) -> Any:
        """Flat numbers led by a float as a float64 array; anything else as plain values."""
        if not (isinstance(node, simdjson.Array) and len(node) and isinstance(node[0], float)):
            return self.plain(node)
        try:
            values = np.frombuffer(node.as_buffer(of_type="d"), dtype=np.float64)
        except Exception:  # TypeError: a boolean, null, string or object among the numbers
            raise _Unread from None
        self.arrays += 1
        self.arrays_read += 1
        return values

    def fields(self, node: Any) -> dict[str, Any]:
        """An object's fields, parsed values still; _Unread unless it is one with unique keys."""
        found = _unique_fields(node)
        if found is None:
            raise _Unread
        return found

    def plain(self, node: Any) -> Any:
        if isinstance(node, simdjson.Object):
            return {key: self.plain(value) for key, value in self.fields(node).items()}
        if isinstance(node, simdjson.Array):
            self.arrays += 1
            return [self.plain(item) for item in node]
        return node


def _unique_fields(node: Any) -> dict[str, Any] | None:
    """An object's fields, parsed values still; None unless it is one with unique keys
    (orjson keeps the last of a key given twice)."""
    if not isinstance(node, simdjson.Object):
        return None
    keys = list(node.keys())
    if len(set(keys)) != len(keys):
        return None
    return {key: node[key] for key in keys}


def _parse(body: bytes) -> Any:
    """The parsed document, or None where simdjson refuses it."""
    try:  # a parser per body: a reused one refuses to parse while proxies of the last live
        return simdjson.Parser().parse(body)
    except Exception:  # ValueError, RuntimeError (an integer beyond 64 bits), ...
        return None  # the general path says what is wrong, or reads it


def _shape(inputs: simdjson.Array) -> tuple[int, ...] | None:
    """The shape of ``inputs`` when it is a rectangular array (every array at each depth as long
    as the first) led by a float, at most MAX_NESTING deep; else None."""
    shape: list[int] = []
    node: Any = inputs
    while isinstance(node, simdjson.Array):
        if len(node) == 0 or len(shape) == MAX_NESTING:
            return None
        shape.append(len(node))
        node = node[0]
    if not isinstance(node, float):
        return None
    level: list[Any] = [inputs]
    for length in shape[1:]:
        inner = [item for array in level for item in array]
        if not all(isinstance(item, simdjson.Array) and len(item) == length for item in inner):
            return None
        level = inner
    return tuple(shape)
