"""Predict bodies and answers on the client side: numpy arrays and torch tensors go as binary
tensors (raw little-endian bytes with ``X-Tensor-Shape`` / ``X-Tensor-Dtype``, or ``.npy``;
inputs by name as one ``.npz``; over gRPC, :mod:`app.client.grpc_transport`), lists as JSON;
the server's raw output tensor comes back as a numpy array (outputs by name as a dict of them).
Torch is never imported here: a tensor is recognised only when the caller's torch is already
loaded."""

from __future__ import annotations

import io
import json
import math
import sys
import zipfile
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal, TypeAlias

import httpx
import numpy as np

from app.client.errors import ModelportClientError, UnsendableInputError

SHAPE_HEADER = "X-Tensor-Shape"
DTYPE_HEADER = "X-Tensor-Dtype"
VERSION_HEADER = "X-Model-Version"
JSON = "application/json"
RAW = "application/octet-stream"
NPY = "application/x-npy"
NPZ = "application/x-npz"

Binary: TypeAlias = Literal["raw", "npy"]
"""How arrays travel: raw bytes with the shape and dtype in headers, or an ``.npy`` file."""
WireTensor: TypeAlias = tuple[np.ndarray, str]
"""An array ready for the wire: little-endian (bfloat16 as its bits) and its dtype's name."""
WireTensors: TypeAlias = WireTensor | dict[str, WireTensor]
"""One unnamed array, or arrays by input name."""


@dataclass(frozen=True)
class WireDtype:
    """How one dtype travels: its little-endian layout and its Open Inference Protocol name."""

    layout: np.dtype[Any]
    datatype: str


WIRE_DTYPES: dict[str, WireDtype] = {
    "bool": WireDtype(np.dtype("u1"), "BOOL"),  # a byte each: any non-zero is true
    "uint8": WireDtype(np.dtype("u1"), "UINT8"),
    "uint16": WireDtype(np.dtype("<u2"), "UINT16"),
    "uint32": WireDtype(np.dtype("<u4"), "UINT32"),
    "uint64": WireDtype(np.dtype("<u8"), "UINT64"),
    "int8": WireDtype(np.dtype("i1"), "INT8"),
    "int16": WireDtype(np.dtype("<i2"), "INT16"),
    "int32": WireDtype(np.dtype("<i4"), "INT32"),
    "int64": WireDtype(np.dtype("<i8"), "INT64"),
    "float16": WireDtype(np.dtype("<f2"), "FP16"),
    "bfloat16": WireDtype(np.dtype("<u2"), "BF16"),  # its bit patterns: numpy has no bfloat16
    "float32": WireDtype(np.dtype("<f4"), "FP32"),
    "float64": WireDtype(np.dtype("<f8"), "FP64"),
}
"""Every dtype the server reads and writes, by its ``X-Tensor-Dtype`` name: the client's one
dtype table, for both transports."""
BY_DATATYPE = {wire.datatype: name for name, wire in WIRE_DTYPES.items()}
"""``FP32`` -> ``float32``."""
_SUPPORTED = "bool, (u)int8-64, float16, float32, float64 (and torch's bfloat16)"
_UNSENDABLE_KINDS = {
    "O": "an object array (dtype object) cannot be sent: its items could be anything; "
    "convert it to numbers first, e.g. np.asarray(x, np.float32)",
    "c": "complex numbers ({dtype}) cannot be sent: the server takes " + _SUPPORTED,
    "U": "an array of strings ({dtype}) cannot be sent: models take numbers",
    "S": "an array of bytes strings ({dtype}) cannot be sent: models take numbers",
}


@dataclass(frozen=True)
class Prediction:
    """One answer: the model and the version that computed it, and its outputs."""

    model: str
    version: str
    outputs: Any
    """The raw output tensor as a numpy array (batch first), the raw outputs by name as a dict
    of them (for inputs given by name), or the postprocessed outputs (JSON values, one per
    sample)."""

    def as_dict(self) -> dict[str, Any]:
        """``{"model", "version", "outputs"}``, the server's JSON answer."""
        return {"model": self.model, "version": self.version, "outputs": self.outputs}


def predict_result(answer: Prediction) -> np.ndarray | dict[str, Any]:
    """What ``predict`` returns: raw outputs as they came (an array, or arrays by name); the
    postprocessed ones (always a list) as the server's JSON answer."""
    if isinstance(answer.outputs, list):
        return answer.as_dict()
    raw: np.ndarray | dict[str, np.ndarray] = answer.outputs
    return raw


@dataclass(frozen=True)
class PredictCall:
    """The body and headers of one predict request."""

    content: bytes
    headers: dict[str, str]
    postprocess: bool


def predict_call(inputs: Any, postprocess: bool | None, binary: Binary) -> PredictCall:
    """Arrays and tensors as a binary tensor (inputs by name as one ``.npz``), lists as JSON;
    the answer asked for is the postprocessed JSON when ``postprocess`` (default: for lists
    only), else the raw output tensor in the ``binary`` form (outputs by name as an ``.npz``
    for inputs by name)."""
    if binary not in ("raw", "npy"):
        raise ValueError(f"binary must be 'raw' or 'npy'; received {binary!r}")
    body: tuple[bytes, dict[str, str]] | None
    if isinstance(inputs, Mapping):
        inputs = dict(inputs)  # what json.dumps writes as an object
        tensors = named_tensors(inputs)
        arrays = None if tensors is None else {k: npy_values(*t) for k, t in tensors.items()}
        body = None if arrays is None else (encode_npz(arrays), {"Content-Type": NPZ})
        raw_answer = NPZ
    else:
        tensor = as_array(inputs)
        body = None if tensor is None else _tensor_body(*tensor, binary)
        raw_answer = NPY if binary == "npy" else RAW
    if postprocess is None:
        postprocess = body is None
    content, headers = body or (encode_json({"inputs": inputs}), {"Content-Type": JSON})
    headers["Accept"] = JSON if postprocess else raw_answer
    return PredictCall(content, headers, postprocess)


def _tensor_body(array: np.ndarray, dtype: str, binary: Binary) -> tuple[bytes, dict[str, str]]:
    """One array as raw bytes with its shape and dtype headers, or as an ``.npy``."""
    if binary == "npy":
        return encode_npy(array, dtype), {"Content-Type": NPY}
    shape = ",".join(str(dim) for dim in array.shape)
    content = np.ascontiguousarray(array).tobytes()
    return content, {"Content-Type": RAW, SHAPE_HEADER: shape, DTYPE_HEADER: dtype}


def binary_tensors(inputs: Any, postprocess: bool | None) -> WireTensors | None:
    """What a client with a gRPC door sends there: a numpy array or torch tensor, or a dict of
    them by name, when the raw outputs are asked for (``postprocess`` not true); None for the
    rest (lists, the postprocessed answer), which goes over HTTP. UnsendableInputError as for
    :func:`predict_call`."""
    if postprocess:
        return None
    if isinstance(inputs, Mapping):
        return named_tensors(inputs)
    return as_array(inputs)


def named_tensors(inputs: Mapping[Any, Any]) -> dict[str, WireTensor] | None:
    """Inputs by name as tensors for the wire, when every value is a numpy array or torch
    tensor; None when every value is (nested) lists, which go as JSON. UnsendableInputError
    for a name that is not a string, a value that is neither, and a mix (which dtype a list
    should take is the model's, which the client does not know)."""
    arrays: dict[str, WireTensor] = {}
    lists: list[str] = []
    for name, value in inputs.items():
        if not isinstance(name, str):
            raise UnsendableInputError(f"input names are strings; received {name!r}")
        try:
            tensor = as_array(value)
        except UnsendableInputError as exc:
            raise UnsendableInputError(f"input {name!r}: {exc.message}") from None
        if tensor is not None:
            arrays[name] = tensor
        elif isinstance(value, Sequence) and not isinstance(value, str | bytes | bytearray):
            lists.append(name)
        else:
            raise UnsendableInputError(
                f"input {name!r} cannot be sent: {type(value).__name__} is not a numpy array, "
                "a torch tensor or (nested) lists of numbers"
            )
    if arrays and lists:
        raise UnsendableInputError(
            f"inputs {list(arrays)} are arrays but {lists} are lists: send every input as an "
            "array or tensor (one binary .npz; e.g. np.asarray(x, np.int64)) or every one as "
            "lists (JSON)"
        )
    return arrays or None


def as_array(inputs: Any) -> WireTensor | None:
    """A numpy array or torch tensor as (little-endian array, ``X-Tensor-Dtype`` name); None
    for anything else. UnsendableInputError for what no wire dtype carries."""
    if isinstance(inputs, np.ndarray):
        return _checked(inputs)
    torch = sys.modules.get("torch")  # a tensor exists only if its module is loaded
    if torch is None or not isinstance(inputs, torch.Tensor):
        return None
    tensor = inputs.detach()
    if tensor.is_complex():
        raise UnsendableInputError(_UNSENDABLE_KINDS["c"].format(dtype=tensor.dtype))
    tensor = tensor.cpu().contiguous()
    if tensor.dtype == torch.bfloat16:
        bits: np.ndarray = tensor.view(torch.int16).numpy().view("<u2")
        if bits.ndim == 0:
            raise UnsendableInputError(_scalar())
        return bits, "bfloat16"
    try:
        array = tensor.numpy()
    except TypeError:  # a dtype numpy has no counterpart for (float8, quantized...)
        raise UnsendableInputError(
            f"a torch tensor of {tensor.dtype} cannot be sent; the server takes {_SUPPORTED}"
        ) from None
    return _checked(array)


def _checked(array: np.ndarray) -> WireTensor:
    dtype = array.dtype
    name = dtype.name
    if dtype.kind in _UNSENDABLE_KINDS:
        raise UnsendableInputError(_UNSENDABLE_KINDS[dtype.kind].format(dtype=name))
    if name not in WIRE_DTYPES or name == "bfloat16" or dtype.fields is not None:
        raise UnsendableInputError(f"dtype {dtype} cannot be sent; the server takes {_SUPPORTED}")
    if array.ndim == 0:
        raise UnsendableInputError(_scalar())
    return array.astype(dtype.newbyteorder("<"), copy=False), name


def _scalar() -> str:
    return "a 0-d array is one value, not a batch: send (batch, *sample shape), e.g. x[None]"


def encode_npy(array: np.ndarray, dtype: str) -> bytes:
    """An ``.npy`` file of the array (bfloat16 as the float32 values it holds exactly)."""
    stream = io.BytesIO()
    np.save(stream, npy_values(array, dtype), allow_pickle=False)
    return stream.getvalue()


def npy_values(array: np.ndarray, dtype: str) -> np.ndarray:
    """The array as an ``.npy`` holds it: bfloat16 bits as the float32 values they are."""
    return _bfloat16_values(array) if dtype == "bfloat16" else array


def encode_npz(arrays: Mapping[str, np.ndarray]) -> bytes:
    """An ``.npz`` file of the arrays by name."""
    stream = io.BytesIO()
    write_npz(stream, arrays)
    return stream.getvalue()


def write_npz(file: IO[bytes], arrays: Mapping[str, np.ndarray]) -> None:
    """Write an uncompressed ``.npz``, one ``NAME.npy`` member per array: ``np.savez``'s layout,
    for any name (``np.savez(file, **arrays)`` clashes with its own ``file`` argument)."""
    with zipfile.ZipFile(file, "w") as archive:
        for name, array in arrays.items():
            with archive.open(f"{name}.npy", "w") as member:
                np.lib.format.write_array(member, array, allow_pickle=False)


def load_npz(file: Path | IO[bytes]) -> dict[str, np.ndarray]:
    """The arrays of an ``.npz`` file by name (never a pickle); ValueError for anything else
    (OSError for a file that cannot be read)."""
    arrays: dict[str, np.ndarray] = {}
    try:
        with zipfile.ZipFile(file) as archive:
            for info in archive.infolist():
                name = info.filename.removesuffix(".npy")
                if name == info.filename:
                    raise ValueError(f"the .npz holds {info.filename!r}, not a NAME.npy array")
                with archive.open(info) as member:
                    arrays[name] = np.lib.format.read_array(member, allow_pickle=False)
    except (EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise ValueError(f"not an .npz file: {exc}") from None
    return arrays


def _bfloat16_values(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns -> the float32 values they are (a bfloat16 is a float32's upper
    half)."""
    return (bits.astype("<u4") << 16).view("<f4")


def encode_json(body: Any) -> bytes:
    """JSON as Python writes it (NaN and Infinity included, for the server to judge: some
    models take them); numpy values and tensors inside lists as their values. Anything else
    raises UnsendableInputError, never the encoder's TypeError or ValueError."""
    try:
        text = json.dumps(body, allow_nan=True, separators=(",", ":"), default=_json_value)
    except (ValueError, RecursionError) as exc:  # a list that holds itself, or nests too deep
        raise UnsendableInputError(f"'inputs' cannot be written as JSON: {exc}") from None
    return text.encode()


def _json_value(value: Any) -> Any:
    """What json.dumps cannot write itself: numpy scalars and arrays, tensors."""
    if isinstance(value, complex):
        raise UnsendableInputError(_UNSENDABLE_KINDS["c"].format(dtype="complex"))
    to_list = getattr(value, "tolist", None)
    if callable(to_list) and not isinstance(value, type):
        return to_list()
    raise UnsendableInputError(
        f"'inputs' holds a {type(value).__name__}, which cannot be sent; send numbers "
        "(nested lists), a numpy array or a torch tensor"
    )


def prediction_of(response: httpx.Response, model: str) -> Prediction:
    """The answer of a successful predict: JSON outputs, the raw tensor as a numpy array, or
    the raw outputs by name as a dict of them."""
    kind = response.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == JSON:
        body = response.json()
        return Prediction(body["model"], body["version"], body["outputs"])
    version = response.headers.get(VERSION_HEADER, "")
    if kind == NPZ:
        try:
            return Prediction(model, version, load_npz(io.BytesIO(response.content)))
        except ValueError as exc:
            raise ModelportClientError(f"malformed .npz answer: {exc}") from None
    if kind == NPY:
        try:
            array = np.load(io.BytesIO(response.content), allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise ModelportClientError(f"malformed .npy answer: {exc}") from None
    elif kind == RAW:
        array = decode_raw(
            response.content,
            response.headers.get(DTYPE_HEADER, ""),
            response.headers.get(SHAPE_HEADER, ""),
        )
    else:
        raise ModelportClientError(f"unexpected answer of type {kind!r} to a predict")
    return Prediction(model, version, array)


def decode_raw(data: bytes, dtype: str, shape_text: str) -> np.ndarray:
    """Raw little-endian bytes and their headers -> a writable array (as :func:`decode_tensor`)."""
    dims = shape_text.split(",") if shape_text else []
    if dtype not in WIRE_DTYPES or not all(dim.isascii() and dim.isdigit() for dim in dims):
        raise ModelportClientError(
            f"malformed tensor answer: {DTYPE_HEADER} {dtype!r}, {SHAPE_HEADER} {shape_text!r}"
        )
    return decode_tensor(data, dtype, tuple(int(dim) for dim in dims))


def decode_tensor(data: bytes, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """Raw little-endian bytes of a dtype of :data:`WIRE_DTYPES` -> a writable array of
    ``shape`` (bool and bfloat16 widened to numpy's bool and float32)."""
    wire = WIRE_DTYPES[dtype].layout
    if min(shape, default=0) < 0 or len(data) != math.prod(shape) * wire.itemsize:
        raise ModelportClientError(
            f"malformed tensor answer: {len(data)} bytes for shape {list(shape)} of {dtype}"
        )
    array = np.frombuffer(data, wire).reshape(shape)
    if dtype == "bool":
        flags: np.ndarray = array != 0
        return flags
    if dtype == "bfloat16":
        return _bfloat16_values(array)
    return array.astype(wire.newbyteorder("="))  # a copy: the caller's to change
