"""Tensors as raw bytes for the binary predict path: little-endian data with its shape and
dtype in headers (``X-Tensor-Shape: 2,10``, ``X-Tensor-Dtype: float32``), an ``.npy`` body, or
an ``.npz`` body of several named tensors."""

from __future__ import annotations

import io
import math
import zipfile
import zlib
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from app.codecs.dtypes import BY_NAME, BY_TORCH, from_wire, name_of, to_wire
from app.codecs.text import decimal
from app.errors import BadRequest, PayloadTooLarge

SHAPE_HEADER = "X-Tensor-Shape"
DTYPE_HEADER = "X-Tensor-Dtype"
RAW = "application/octet-stream"
NPY = "application/x-npy"
NPZ = "application/x-npz"
MAX_NPZ_MEMBERS = 64
"""Most tensors one ``.npz`` body may hold."""
MAX_DIMS = 32
"""Most dimensions a binary tensor may declare (numpy itself stops at 64)."""
_NPY_HEADER_READERS: dict[
    tuple[int, int], Callable[[io.BytesIO], tuple[tuple[int, ...], bool, np.dtype[Any]]]
] = {
    (1, 0): np.lib.format.read_array_header_1_0,
    (2, 0): np.lib.format.read_array_header_2_0,
}


def parse_shape(text: str | None) -> tuple[int, ...]:
    """``"2,10"`` -> ``(2, 10)``: at most MAX_DIMS counts in ASCII digits; BadRequest else."""
    if text is None:
        raise BadRequest(f"a raw tensor body needs the {SHAPE_HEADER} header, e.g. '2,10'")
    if not text.strip():
        raise BadRequest(
            f"{SHAPE_HEADER} is empty (a scalar); send the batch dimension first, e.g. '1,10'"
        )
    parts = text.split(",", MAX_DIMS)
    if len(parts) > MAX_DIMS:
        raise BadRequest(f"{SHAPE_HEADER} has more than {MAX_DIMS} dimensions")
    dims = [decimal(part) for part in parts]
    if None in dims:
        raise BadRequest(
            f"malformed {SHAPE_HEADER} {text[:100]!r}: expected counts in digits like '2,10'"
        )
    return tuple(dim for dim in dims if dim is not None)


def decode_raw(data: bytes, dtype: str | None, shape: tuple[int, ...]) -> np.ndarray:
    """Little-endian bytes -> an array of ``shape`` (bfloat16 arrives as exact float32), read
    in place: the shape must account for the body's bytes exactly."""
    if dtype is None:
        raise BadRequest(f"a raw tensor body needs the {DTYPE_HEADER} header, e.g. 'float32'")
    entry = BY_NAME.get(dtype)
    if entry is None:
        supported = ", ".join(BY_NAME)
        raise BadRequest(f"unknown {DTYPE_HEADER} {dtype[:40]!r}; supported: {supported}")
    expected = math.prod(shape) * entry.wire.itemsize
    if len(data) != expected:
        raise BadRequest(
            f"the body has {len(data)} bytes; shape {list(shape)} of {dtype} needs {expected}"
        )
    return from_wire(data, entry, shape)


def decode_npy(data: bytes) -> np.ndarray:
    """An ``.npy`` body -> its array, read in place. The header is checked before anything is
    allocated: a plain numeric dtype (no objects, so no pickles), at most MAX_DIMS dimensions,
    and a shape that accounts for the bytes after the header exactly."""
    stream = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(stream)
        read_header = _NPY_HEADER_READERS.get(version)
        if read_header is None:
            raise ValueError(f"format version {version} is not supported (send 1.0 or 2.0)")
        shape, fortran_order, dtype = read_header(stream)
    except (ValueError, OSError, EOFError, SyntaxError, TypeError) as exc:
        raise BadRequest(f"malformed .npy body: {exc}") from None
    if dtype.kind not in "biuf" or dtype.fields is not None or dtype.subdtype is not None:
        raise BadRequest(f"the .npy body holds {dtype}; send numbers or booleans")
    if len(shape) > MAX_DIMS:
        raise BadRequest(f"the .npy array has more than {MAX_DIMS} dimensions")
    needed = math.prod(shape) * dtype.itemsize
    if len(data) - stream.tell() != needed:
        raise BadRequest(
            f"the .npy header declares shape {list(shape)} of {dtype} ({needed} bytes); "
            f"{len(data) - stream.tell()} bytes follow it"
        )
    array = np.frombuffer(data, dtype, math.prod(shape), stream.tell())
    return array.reshape(shape, order="F" if fortran_order else "C")


def encode_raw(tensor: torch.Tensor) -> tuple[bytes, str]:
    """A CPU tensor -> its little-endian bytes and dtype name."""
    if tensor.dtype not in BY_TORCH:
        raise BadRequest(f"the output dtype {name_of(tensor.dtype)} has no binary encoding")
    return to_wire(tensor), name_of(tensor.dtype)


def encode_npy(tensor: torch.Tensor) -> bytes:
    """A CPU tensor -> an ``.npy`` file (bfloat16 as float32, which numpy can hold)."""
    stream = io.BytesIO()
    np.save(stream, _numpy(tensor), allow_pickle=False)
    return stream.getvalue()


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    return (tensor.float() if tensor.dtype == torch.bfloat16 else tensor).numpy()


def decode_npz(data: bytes, limit: int) -> dict[str, np.ndarray]:
    """An ``.npz`` body (numpy's ``savez`` or ``savez_compressed``) -> its arrays by name, each
    member checked as :func:`decode_npy` checks one. At most MAX_NPZ_MEMBERS members; all of
    them together inflate to at most ``limit`` bytes (a zip bomb stops there, 413)."""
    arrays: dict[str, np.ndarray] = {}
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        members = archive.infolist()
        if len(members) > MAX_NPZ_MEMBERS:
            raise BadRequest(f"the .npz body holds {len(members)} files; at most {MAX_NPZ_MEMBERS}")
        for info in members:
            name = info.filename.removesuffix(".npy")
            if not info.filename.endswith(".npy") or not name or name in arrays:
                raise BadRequest(f"the .npz body holds {info.filename[:100]!r}: not a named .npy")
            with archive.open(info) as member:
                raw = member.read(limit + 1)
            limit -= len(raw)
            if limit < 0:
                raise PayloadTooLarge("the .npz body inflates past MODELPORT_MAX_BODY_BYTES")
            arrays[name] = decode_npy(raw)
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, RuntimeError) as exc:
        # (RuntimeError: an encrypted member; NotImplementedError: an unknown compression)
        raise BadRequest(f"malformed .npz body: {exc}") from None
    except NotImplementedError as exc:
        raise BadRequest(f"the .npz body uses an unsupported compression: {exc}") from None
    if not arrays:
        raise BadRequest("the .npz body holds no tensor")
    return arrays


def encode_npz(tensors: dict[str, torch.Tensor]) -> bytes:
    """CPU tensors by name -> an ``.npz`` file (uncompressed; bfloat16 as float32)."""
    stream = io.BytesIO()
    with zipfile.ZipFile(stream, "w") as archive:
        for name, tensor in tensors.items():
            with archive.open(f"{name}.npy", "w") as member:
                np.lib.format.write_array(member, _numpy(tensor), allow_pickle=False)
    return stream.getvalue()
