"""Decoding predict inputs (nested JSON lists) into checked numpy batches, without per-element
Python work on the happy path."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from app.codecs.dtypes import BY_TORCH, DTYPES, TensorSignature, name_of
from app.errors import InvalidInput

MAX_NESTING = 32
"""Deepest nesting of lists a request's values may have (numpy itself stops at 64)."""
_NUMBER_TYPES = frozenset({float, int, bool})
_FLOATS_HELD = {
    d.torch: (d.held, float(np.finfo(d.held).max)) for d in DTYPES if d.torch.is_floating_point
}
"""Each floating-point dtype's numpy dtype of held values, and the largest finite one."""

_KIND_NAMES = {
    "b": "booleans",
    "i": "integers",
    "u": "integers",
    "f": "floating-point numbers",
    "U": "strings",
    "S": "strings",
    "O": "mixed or non-numeric values (null, strings, objects or out-of-range integers)",
}


def arrays_in(shape: tuple[int, ...]) -> int:
    """How many arrays a rectangular array of ``shape`` is written with in JSON."""
    return sum(math.prod(shape[:depth]) for depth in range(len(shape)))


def json_counts(inputs: Iterable[TensorSignature], samples: int) -> tuple[int, int]:
    """The most arrays and values ``samples`` samples of ``inputs`` are written with in JSON
    (each input's batch one array, each sample nested as its shape says)."""
    arrays = values = 0
    for signature in inputs:
        arrays += arrays_in((samples, *signature.shape))
        values += samples * math.prod(signature.shape)
    return arrays, values


def check_numeric(values: Any, where: str) -> None:
    """Refuse any value that is not a number or a boolean in (nested lists of) ``values``, and
    nesting deeper than MAX_NESTING, before numpy sees them: from strings numpy would build a
    fixed-width array of 4 bytes x the longest string x every element, so that a few hundred
    KB of JSON could ask for gigabytes. One pass, a type lookup per value."""
    level, depth, found = [values], 0, set()
    while level:
        depth += 1
        if depth > MAX_NESTING:
            raise InvalidInput(f"{where} is nested deeper than {MAX_NESTING} levels")
        inner: list[Any] = []
        for node in level:
            if not isinstance(node, list):
                found.add(type(node))
                continue
            kinds = set(map(type, node))
            if list in kinds:
                inner.extend(item for item in node if isinstance(item, list))
                kinds.discard(list)
            found |= kinds
        level = inner
    if not found <= _NUMBER_TYPES:
        received = "strings" if str in found else _KIND_NAMES["O"]
        raise InvalidInput(f"wrong dtype: {where} must hold numbers; received {received}")


def to_batch(
    inputs: Any,
    sample_shape: tuple[int, ...],
    dtype: torch.dtype,
    *,
    max_samples: int | None = None,
    allow_non_finite: bool = False,
    known_numeric: bool = False,
) -> np.ndarray:
    """Check ``inputs`` (a list of samples, or an array read from bytes) against the
    per-sample shape and dtype.

    Returns a C-contiguous array of shape ``(n, *sample_shape)``; raises InvalidInput saying
    what was expected and what was received. Lists are typed first (:func:`check_numeric`)
    unless ``known_numeric`` says the caller has proven they hold numbers only (no strings, no
    booleans): those a floating-point model takes are then read straight into its dtype.
    """
    if not isinstance(inputs, np.ndarray):
        if known_numeric and dtype.is_floating_point and not allow_non_finite:
            batch = _read_floats(inputs, sample_shape, dtype, max_samples)
            if batch is not None:
                return batch
        inputs = _from_lists(inputs, sample_shape, dtype, max_samples, known_numeric)
    return _check_array(
        inputs, sample_shape, dtype, max_samples=max_samples, allow_non_finite=allow_non_finite
    )


def _read_floats(
    inputs: Any, sample_shape: tuple[int, ...], dtype: torch.dtype, max_samples: int | None
) -> np.ndarray | None:
    """Lists of numbers read into a floating-point model's dtype; None unless they are a batch
    the model takes, finite and within its dtype's range, within the limit (the checks then say
    what is wrong). Read as float64 (what a Python float is: nothing overflows) and bounded
    before the narrowing cast, so that no cast can overflow: numpy's error state, which would
    have to be set around it, cost a small model's request more than the read."""
    if not isinstance(inputs, list) or not inputs:
        return None
    if max_samples is not None and len(inputs) > max_samples:
        return None
    try:
        batch = np.array(inputs, dtype=np.float64)
    except (ValueError, TypeError, OverflowError):
        return None
    held, largest = _FLOATS_HELD[dtype]
    # NaN compares false: refused here with infinity
    if batch.shape[1:] != sample_shape or not np.abs(batch).max(initial=0.0) <= largest:
        return None
    return batch if held == batch.dtype else batch.astype(held)


def _from_lists(
    inputs: Any,
    sample_shape: tuple[int, ...],
    dtype: torch.dtype,
    max_samples: int | None,
    known_numeric: bool,
) -> np.ndarray:
    if not isinstance(inputs, list):
        raise InvalidInput(f"'inputs' must be a list of samples; received {type(inputs).__name__}")
    _check_count(len(inputs), max_samples)
    if not known_numeric:
        check_numeric(inputs, "'inputs'")
    try:
        return np.asarray(inputs)
    except (ValueError, OverflowError, TypeError):
        expected = _expected(len(inputs), sample_shape, dtype)
        raise InvalidInput(
            f"samples are ragged or malformed; expected {expected}", {"expected": expected}
        ) from None


def _check_array(
    array: np.ndarray,
    sample_shape: tuple[int, ...],
    dtype: torch.dtype,
    *,
    max_samples: int | None = None,
    allow_non_finite: bool = False,
) -> np.ndarray:
    """Check an input array whose first dimension is the batch; returns it C-contiguous in
    the model's dtype, or raises InvalidInput saying what was expected and what was received."""
    if array.ndim == 0:
        shape = ", ".join(map(str, (-1, *sample_shape)))
        raise InvalidInput(f"the input is a scalar; expected [{shape}], batch dimension first")
    _check_count(len(array), max_samples)
    _check_kind(array, dtype)
    if array.shape[1:] != sample_shape:
        expected = _expected(len(array), sample_shape, dtype)
        raise InvalidInput(
            f"wrong sample shape: expected {expected}; received shape {list(array.shape)}",
            {"expected_sample_shape": list(sample_shape), "received_shape": list(array.shape)},
        )
    target = BY_TORCH[dtype].held.type
    _check_range(array, target)
    if array.dtype == target:
        batch = np.ascontiguousarray(array)
    else:  # a narrowing cast may overflow: to infinity, refused below when not allowed
        with np.errstate(over="ignore", invalid="ignore"):
            batch = np.ascontiguousarray(array, dtype=target)
    if not batch.flags.writeable:  # e.g. read from a bytes body: torch wants to own it
        batch = batch.copy()
    if batch.dtype.kind == "f" and not allow_non_finite and not np.isfinite(batch).all():
        bad = int(np.argwhere(~np.isfinite(batch).reshape(len(batch), -1).all(axis=1))[0][0])
        raise InvalidInput(
            f"sample {bad} holds NaN or infinity (or a value too large for {name_of(dtype)}); "
            "this model accepts finite numbers only"
        )
    return batch


def _check_count(count: int, max_samples: int | None) -> None:
    if count == 0:
        raise InvalidInput("'inputs' is empty; send at least one sample")
    if max_samples is not None and count > max_samples:
        raise InvalidInput(f"too many samples: received {count}, the limit is {max_samples}")


def _expected(count: int, sample_shape: tuple[int, ...], dtype: torch.dtype) -> str:
    return f"{count} sample(s) of shape {list(sample_shape)} ({name_of(dtype)})"


def _check_kind(array: np.ndarray, dtype: torch.dtype) -> None:
    kind = array.dtype.kind
    if dtype == torch.bool:
        allowed = "b"
    elif dtype.is_floating_point:
        allowed = "iuf"
    else:
        allowed = "iu"
    if kind not in allowed:
        received = _KIND_NAMES.get(kind, f"values of numpy kind {kind!r}")
        expected = (
            "booleans"
            if dtype == torch.bool
            else ("numbers" if dtype.is_floating_point else "integers")
        )
        raise InvalidInput(
            f"wrong dtype: this model takes {expected} ({name_of(dtype)}); received {received}"
        )


def _check_range(array: np.ndarray, target: type[np.generic]) -> None:
    if array.dtype.kind not in "iu" or not np.issubdtype(target, np.integer):
        return
    info = np.iinfo(target)  # type: ignore[type-var]
    if array.min() < info.min or array.max() > info.max:
        raise InvalidInput(
            f"integer out of range for {np.dtype(target).name}: values must lie in "
            f"[{info.min}, {info.max}]"
        )
