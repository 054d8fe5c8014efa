"""Tensors as raw bytes for the binary predict path: little-endian data with its shape and
dtype in headers (``X-Tensor-Shape: 2,10``, ``X-Tensor-Dtype: float32``), or an ``.npy`` body."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import torch

from app.errors import BadRequest

SHAPE_HEADER = "X-Tensor-Shape"
DTYPE_HEADER = "X-Tensor-Dtype"
RAW = "application/octet-stream"
NPY = "application/x-npy"
BFLOAT16 = "bfloat16"

_NUMPY: dict[str, np.dtype[Any]] = {
    name: np.dtype(code)
    for name, code in {
        "float16": "<f2",
        "float32": "<f4",
        "float64": "<f8",
        "uint8": "u1",
        "int8": "i1",
        "int16": "<i2",
        "int32": "<i4",
        "int64": "<i8",
        "bool": "?",
    }.items()
}
DTYPES = [*_NUMPY, BFLOAT16]
"""Every dtype the binary path reads and writes."""


def parse_shape(text: str | None) -> tuple[int, ...]:
    """``"2,10"`` -> ``(2, 10)``; BadRequest when absent or malformed."""
    if not text:
        raise BadRequest(f"a raw tensor body needs the {SHAPE_HEADER} header, e.g. '2,10'")
    try:
        shape = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise BadRequest(
            f"malformed {SHAPE_HEADER} {text!r}: expected integers like '2,10'"
        ) from None
    if not shape or any(dim < 0 for dim in shape):
        raise BadRequest(f"malformed {SHAPE_HEADER} {text!r}: dimensions must be >= 0")
    return shape


def decode_raw(data: bytes, dtype: str | None, shape: tuple[int, ...]) -> np.ndarray:
    """Little-endian bytes -> an array of ``shape`` (bfloat16 arrives as exact float32)."""
    if dtype is None:
        raise BadRequest(f"a raw tensor body needs the {DTYPE_HEADER} header, e.g. 'float32'")
    wire = np.dtype("<u2") if dtype == BFLOAT16 else _NUMPY.get(dtype)
    if wire is None:
        raise BadRequest(f"unknown {DTYPE_HEADER} {dtype!r}; supported: {', '.join(DTYPES)}")
    expected = int(np.prod(shape)) * wire.itemsize
    if len(data) != expected:
        raise BadRequest(
            f"the body has {len(data)} bytes; shape {list(shape)} of {dtype} needs {expected}"
        )
    array = np.frombuffer(data, dtype=wire).reshape(shape)
    return widen_bfloat16(array) if dtype == BFLOAT16 else array


def widen_bfloat16(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> the same values as float32, exactly: a bfloat16 is
    the upper half of a float32."""
    return (bits.astype("<u4") << 16).view("<f4")


def decode_npy(data: bytes) -> np.ndarray:
    """An ``.npy`` body -> its array; object arrays (pickles) are refused."""
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise BadRequest(f"malformed .npy body: {exc}") from None
    if not isinstance(array, np.ndarray):
        raise BadRequest("the .npy body holds no array")
    return array


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    """A CPU tensor's values as little-endian row-major bytes (bfloat16: its bit patterns)."""
    tensor = tensor.contiguous()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.uint16).numpy().astype("<u2", copy=False).tobytes()
    array = tensor.numpy()
    return array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()


def encode_raw(tensor: torch.Tensor) -> tuple[bytes, str]:
    """A CPU tensor -> its little-endian bytes and dtype name."""
    name = str(tensor.dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise BadRequest(f"the output dtype {name} has no binary encoding; ask for JSON")
    return tensor_bytes(tensor), name


def encode_npy(tensor: torch.Tensor) -> bytes:
    """A CPU tensor -> an ``.npy`` file (bfloat16 as float32, which numpy can hold)."""
    array = (tensor.float() if tensor.dtype == torch.bfloat16 else tensor).numpy()
    stream = io.BytesIO()
    np.save(stream, array, allow_pickle=False)
    return stream.getvalue()
