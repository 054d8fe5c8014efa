"""The one dtype table: each tensor dtype the service reads or writes, with its name in every
wire format (``X-Tensor-Dtype``, the Open Inference Protocol's datatypes, numpy)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


def name_of(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``float32``."""
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class TensorSignature:
    """One input or output tensor of a model as served: its name, per-sample shape (no batch
    dimension) and dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass(frozen=True)
class DType:
    """One dtype under its names."""

    torch: torch.dtype
    v2: str
    """The Open Inference Protocol's datatype (``FP32``)."""
    wire: np.dtype[Any]
    """Its little-endian layout on the wire (bfloat16: its bit patterns, as uint16)."""
    held: np.dtype[Any]
    """The numpy dtype values are held in (numpy has no bfloat16: float32, exactly)."""

    @property
    def name(self) -> str:
        """``float32``, as ``X-Tensor-Dtype`` and the model descriptions write it."""
        return name_of(self.torch)


def _dtype(dtype: torch.dtype, v2: str, wire: str, held: str | None = None) -> DType:
    return DType(dtype, v2, np.dtype(wire), np.dtype(held or wire))


DTYPES = (
    _dtype(torch.bool, "BOOL", "u1", "?"),  # a byte each on the wire: any non-zero is true
    _dtype(torch.uint8, "UINT8", "u1"),
    _dtype(torch.uint16, "UINT16", "<u2"),
    _dtype(torch.uint32, "UINT32", "<u4"),
    _dtype(torch.uint64, "UINT64", "<u8"),
    _dtype(torch.int8, "INT8", "i1"),
    _dtype(torch.int16, "INT16", "<i2"),
    _dtype(torch.int32, "INT32", "<i4"),
    _dtype(torch.int64, "INT64", "<i8"),
    _dtype(torch.float16, "FP16", "<f2"),
    _dtype(torch.bfloat16, "BF16", "<u2", "<f4"),
    _dtype(torch.float32, "FP32", "<f4"),
    _dtype(torch.float64, "FP64", "<f8"),
)
BY_TORCH = {dtype.torch: dtype for dtype in DTYPES}
BY_NAME = {dtype.name: dtype for dtype in DTYPES}
BY_V2 = {dtype.v2: dtype for dtype in DTYPES}


def of_torch(dtype: torch.dtype) -> DType:
    """The entry of a model's dtype; TypeError for one no wire format carries."""
    try:
        return BY_TORCH[dtype]
    except KeyError:
        raise TypeError(f"{dtype} has no wire encoding") from None


def from_wire(raw: bytes | memoryview, dtype: DType, shape: tuple[int, ...]) -> np.ndarray:
    """Little-endian row-major bytes (their length already checked) -> an array of ``shape``,
    read in place where the layout allows (booleans and bfloat16 are widened)."""
    array = np.frombuffer(raw, dtype.wire)
    if dtype.torch == torch.bool:
        array = array != 0
    elif dtype.torch == torch.bfloat16:
        array = (array.astype("<u4") << 16).view("<f4")  # a bfloat16 is a float32's upper half
    return array.reshape(shape)


def to_wire(tensor: torch.Tensor) -> bytes:
    """A CPU tensor's values as little-endian row-major bytes (bfloat16: its bit patterns)."""
    tensor = tensor.contiguous()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.uint16).numpy().astype("<u2", copy=False).tobytes()
    array = tensor.numpy()
    return array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
