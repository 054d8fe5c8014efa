"""Reading the floating-point ``inputs`` of a JSON body straight into an array (simdjson), with
no Python object per number: orjson's lists of floats and numpy's pass over them cost an mlp
body (784 numbers) ~35 us and a 3x64x64 image ~600 us; this ~16 and ~300.

It reads only what it can prove the general path (:func:`app.codecs.text.parse_json`, then
:func:`app.codecs.arrays.to_batch`) would read the same: an object with unique keys among
those allowed, whose ``inputs`` are a rectangular array of numbers, its first one written as a
float (so that numpy, too, would make the whole array float64). Anything else, valid or not,
gets None and takes the general path, which says what is wrong.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import simdjson

from app.codecs.arrays import MAX_NESTING

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
    try:  # a parser per body: a reused one refuses to parse while proxies of the last live
        document = simdjson.Parser().parse(body)
    except Exception:  # ValueError, RuntimeError (an integer beyond 64 bits), ...
        return None  # the general path says what is wrong, or reads it
    if not isinstance(document, simdjson.Object):
        return None
    keys = list(document.keys())
    if "inputs" not in keys or len(set(keys)) != len(keys) or not fields.issuperset(keys):
        return None
    others = {key: document[key] for key in keys if key != "inputs"}
    if not all(isinstance(value, str) for value in others.values()):
        return None  # (the model's name) the general path says what is wrong
    inputs = document["inputs"]
    if not isinstance(inputs, simdjson.Array):
        return None
    shape = _shape(inputs)
    if shape is None or arrays != _arrays_in(shape):
        return None  # an array in place of a number, or a "[" in a string: the general path
    try:
        flat = np.frombuffer(inputs.as_buffer(of_type="d"), dtype=np.float64)
    except Exception:  # TypeError: a boolean, null, string or object among the numbers
        return None
    return others, flat.reshape(shape)


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


def _arrays_in(shape: tuple[int, ...]) -> int:
    """How many arrays a rectangular array of ``shape`` is written with."""
    return sum(math.prod(shape[:depth]) for depth in range(len(shape)))
