"""Decoding predict inputs (nested JSON lists) into checked numpy batches, without per-element
Python work on the happy path."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterable
from typing import Any

import numpy as np
import orjson
import torch

from app.errors import BadRequest, InvalidInput, PayloadTooLarge

MAX_NESTING = 32
"""Deepest nesting of lists a request's values may have (numpy itself stops at 64)."""
_DECIMAL = re.compile(r"[0-9]{1,19}")
_NUMBER_TYPES = frozenset({float, int, bool})

_NUMPY_DTYPES: dict[torch.dtype, type[np.generic]] = {
    torch.float16: np.float16,
    torch.float32: np.float32,
    torch.float64: np.float64,
    # numpy has no bfloat16: carry float32 and let torch cast on the device.
    torch.bfloat16: np.float32,
    torch.uint8: np.uint8,
    torch.int8: np.int8,
    torch.int16: np.int16,
    torch.int32: np.int32,
    torch.int64: np.int64,
    torch.bool: np.bool_,
}
_KIND_NAMES = {
    "b": "booleans",
    "i": "integers",
    "u": "integers",
    "f": "floating-point numbers",
    "U": "strings",
    "S": "strings",
    "O": "mixed or non-numeric values (null, strings, objects or out-of-range integers)",
}


def decimal(text: str | None) -> int | None:
    """The value of a count written in ASCII digits (surrounding spaces allowed), else None.
    ``str.isdigit`` and ``int`` also take other scripts' digits, superscripts and ``1_000``."""
    if text is None:
        return None
    text = text.strip()
    return int(text) if _DECIMAL.fullmatch(text) else None


def parse_json(data: bytes, what: str) -> Any:
    """A JSON document; NaN and Infinity (as Python's ``json.dumps`` writes them) are read too,
    so that such values reach the finite check and get a precise answer. BadRequest naming
    ``what`` when it is malformed or nested too deep to read."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as error:
        if b"NaN" not in data and b"Infinity" not in data:
            raise BadRequest(f"malformed JSON in {what}: {error}") from None
        try:
            return json.loads(data)
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise BadRequest(f"malformed JSON in {what}: {error}") from None


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


async def read_capped(chunks: AsyncIterable[bytes], declared: str | None, limit: int) -> bytes:
    """A request body of at most ``limit`` bytes: refused up front by its Content-Length
    (``declared``) and again while streaming, since a body need not declare its length."""
    size = decimal(declared)
    if size is not None and size > limit:
        raise PayloadTooLarge(f"body of {size} bytes exceeds the limit of {limit} bytes")
    parts: list[bytes] = []
    size = 0
    async for chunk in chunks:
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"body exceeds the limit of {limit} bytes")
        parts.append(chunk)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``float32``."""
    return str(dtype).removeprefix("torch.")


def to_batch(
    inputs: Any,
    sample_shape: tuple[int, ...],
    dtype: torch.dtype,
    *,
    max_samples: int | None = None,
    allow_non_finite: bool = False,
    known_numeric: bool = False,
) -> np.ndarray:
    """Check ``inputs`` (a list of samples) against the per-sample shape and dtype.

    Returns a C-contiguous array of shape ``(n, *sample_shape)``; raises InvalidInput saying
    what was expected and what was received. The values are typed first (:func:`check_numeric`)
    unless ``known_numeric`` says the caller has proven they hold no string.
    """
    if not isinstance(inputs, list):
        raise InvalidInput(f"'inputs' must be a list of samples; received {type(inputs).__name__}")
    _check_count(len(inputs), max_samples)
    if not known_numeric:
        check_numeric(inputs, "'inputs'")
    try:
        array = np.asarray(inputs)
    except (ValueError, OverflowError, TypeError):
        expected = _expected(len(inputs), sample_shape, dtype)
        raise InvalidInput(
            f"samples are ragged or malformed; expected {expected}", {"expected": expected}
        ) from None
    return check_array(array, sample_shape, dtype, allow_non_finite=allow_non_finite)


def check_array(
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
        raise InvalidInput("the inputs are a scalar; send a batch of samples")
    _check_count(len(array), max_samples)
    _check_kind(array, dtype)
    if array.shape[1:] != sample_shape:
        expected = _expected(len(array), sample_shape, dtype)
        raise InvalidInput(
            f"wrong sample shape: expected {expected}; received shape {list(array.shape)}",
            {"expected_sample_shape": list(sample_shape), "received_shape": list(array.shape)},
        )
    target = _NUMPY_DTYPES[dtype]
    _check_range(array, target)
    with np.errstate(over="ignore", invalid="ignore"):
        batch = np.ascontiguousarray(array, dtype=target)
    if not batch.flags.writeable:  # e.g. read from a bytes body: torch wants to own it
        batch = batch.copy()
    if batch.dtype.kind == "f" and not allow_non_finite and not np.isfinite(batch).all():
        bad = int(np.argwhere(~np.isfinite(batch).reshape(len(batch), -1).all(axis=1))[0][0])
        raise InvalidInput(
            f"sample {bad} holds NaN or infinity (or a value too large for {dtype_name(dtype)}); "
            "this model accepts finite numbers only"
        )
    return batch


def _check_count(count: int, max_samples: int | None) -> None:
    if count == 0:
        raise InvalidInput("'inputs' is empty; send at least one sample")
    if max_samples is not None and count > max_samples:
        raise InvalidInput(f"too many samples: received {count}, the limit is {max_samples}")


def _expected(count: int, sample_shape: tuple[int, ...], dtype: torch.dtype) -> str:
    return f"{count} sample(s) of shape {list(sample_shape)} ({dtype_name(dtype)})"


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
            f"wrong dtype: this model takes {expected} ({dtype_name(dtype)}); received {received}"
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
