"""Open Inference Protocol (V2) tensors: datatypes, request decoding (JSON and the binary tensor
data extension, gzip/deflate bodies) and response encoding. No HTTP framework here."""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
import torch
from pydantic import BaseModel, Field, ValidationError

from app.codecs.arrays import check_numeric
from app.codecs.binary import MAX_DIMS
from app.codecs.dtypes import BY_V2, DType, TensorSignature, from_wire, of_torch, to_wire
from app.codecs.float_json import read_v2_request
from app.codecs.text import decimal, parse_json
from app.errors import BadRequest, InvalidInput, PayloadTooLarge, describe_problems

PLATFORM = "pytorch_statedict"
EXTENSIONS = ["binary_tensor_data", "model_configuration", "model_repository", "statistics"]
HEADER_LENGTH = "Inference-Header-Content-Length"

DATATYPES = [*BY_V2, "BYTES"]
_KINDS = {"b": "booleans", "i": "integers", "u": "integers", "f": "floating-point numbers"}


def datatype_of(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``FP32``."""
    return of_torch(dtype).v2


class TensorMetadata(BaseModel):
    """A model input or output: name, datatype and shape (-1 for the batch dimension)."""

    name: str
    datatype: str
    shape: list[int]


class ServerLive(BaseModel):
    """``GET /v2/health/live``."""

    live: bool


class ServerReady(BaseModel):
    """``GET /v2/health/ready``; a 503 adds ``error`` naming the models that cannot serve."""

    ready: bool
    error: str | None = None


class ModelReady(BaseModel):
    """``GET /v2/models/{name}[/versions/{version}]/ready``; a 503 adds ``error``."""

    name: str
    ready: bool
    error: str | None = None


class ServerMetadata(BaseModel):
    """``GET /v2``."""

    name: str
    version: str
    extensions: list[str]


class ModelMetadata(BaseModel):
    """``GET /v2/models/{name}[/versions/{version}]``."""

    name: str
    versions: list[str] = Field(description="Every version that can serve, oldest first.")
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class RequestInput(BaseModel):
    """One input tensor of an inference request: ``data`` in JSON, or binary after the header
    (``parameters.binary_data_size`` bytes)."""

    name: str
    shape: list[int] = Field(description="Whole-batch shape; entries fit in uint64.")
    datatype: str
    parameters: dict[str, Any] = Field(default_factory=dict)
    data: Any = Field(default=None, description="Row-major values, flat or nested.")


class RequestOutput(BaseModel):
    """An output the client wants; ``parameters.binary_data`` asks for it in binary."""

    name: str
    parameters: dict[str, Any] = Field(default_factory=dict)


class InferenceRequest(BaseModel):
    """The JSON part of ``POST /v2/models/{name}[/versions/{version}]/infer``."""

    id: str | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)
    inputs: list[RequestInput] = Field(min_length=1)
    outputs: list[RequestOutput] | None = Field(
        default=None, description="Absent or empty: every output."
    )


class ResponseOutput(BaseModel):
    """One output tensor: ``data``, or ``parameters.binary_data_size`` bytes after the header."""

    name: str
    datatype: str
    shape: list[int]
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = None


class InferenceResponse(BaseModel):
    """The JSON part of an inference answer."""

    model_name: str
    model_version: str
    id: str | None = None
    outputs: list[ResponseOutput]


class RepositoryEntry(BaseModel):
    """One model of ``POST /v2/repository/index``: its serving version and state."""

    name: str
    version: str
    state: str = Field(description="READY, or UNAVAILABLE with the reason.")
    reason: str = ""


class RepositoryIndexRequest(BaseModel):
    """The optional body of ``POST /v2/repository/index``."""

    ready: bool = Field(default=False, description="Only the models that can serve.")


def tensor_metadata(tensors: Iterable[TensorSignature]) -> list[TensorMetadata]:
    """A model's inputs or outputs as the protocol describes them (-1: the batch dimension)."""
    return [
        TensorMetadata(name=t.name, datatype=datatype_of(t.dtype), shape=[-1, *t.shape])
        for t in tensors
    ]


def model_config(
    name: str,
    inputs: list[TensorMetadata],
    outputs: list[TensorMetadata],
    max_batch_size: int,
    batch_delay_s: float,
    max_queue: int,
    timeout_s: float,
) -> dict[str, Any]:
    """A model's configuration in Triton's JSON shape (``GET /v2/models/{name}/config``): its
    inputs and outputs (``dims`` without the batch dimension) and its dynamic batching."""
    config: dict[str, Any] = {
        "name": name,
        "platform": PLATFORM,
        "backend": "pytorch",
        "max_batch_size": max_batch_size,
        "input": [_config_tensor(tensor) for tensor in inputs],
        "output": [_config_tensor(tensor) for tensor in outputs],
    }
    if max_batch_size > 1:
        config["dynamic_batching"] = {
            "max_queue_delay_microseconds": round(batch_delay_s * 1e6),
            "default_queue_policy": {
                "max_queue_size": max_queue,
                "default_timeout_microseconds": round(timeout_s * 1e6),
            },
        }
    return config


def _config_tensor(tensor: TensorMetadata) -> dict[str, Any]:
    return {"name": tensor.name, "data_type": f"TYPE_{tensor.datatype}", "dims": tensor.shape[1:]}


@dataclass(frozen=True, slots=True)
class DecodedRequest:
    """An inference request with its input tensors decoded (BF16 as float32)."""

    id: str | None
    inputs: dict[str, np.ndarray]
    outputs: dict[str, bool]
    """The outputs asked for by name, each with whether it comes back binary (empty: every
    output, each as ``binary_output`` says)."""
    binary_output: bool
    """Whether outputs not named in ``outputs`` come back binary."""

    def binary(self, output: str) -> bool:
        """Whether ``output`` comes back as binary data."""
        return self.outputs.get(output, self.binary_output)


def decompress(body: bytes, encoding: str | None, limit: int) -> bytes:
    """Undo a ``Content-Encoding`` of gzip or deflate, never growing past ``limit`` bytes."""
    coding = (encoding or "identity").strip().lower()
    if coding == "identity":
        return body
    if coding not in ("gzip", "deflate"):
        raise BadRequest(f"unsupported Content-Encoding {coding!r}; send gzip, deflate or none")
    # deflate is zlib-wrapped on the wire (RFC 9110) and tritonclient sends it so;
    # 47 = 32 + 15 detects a gzip or zlib header.
    inflater = zlib.decompressobj(47 if coding == "gzip" else zlib.MAX_WBITS)
    try:
        data = inflater.decompress(body, limit + 1)
        if len(data) > limit:
            raise PayloadTooLarge(f"the decompressed body exceeds the limit of {limit} bytes")
        if not inflater.eof:
            raise BadRequest(f"the {coding} body is truncated")
    except zlib.error as exc:
        raise BadRequest(f"the body is not valid {coding}: {exc}") from None
    return data


def decode_request(
    body: bytes, header_length: str | None, check_json: Callable[[bytes], None] | None = None
) -> DecodedRequest:
    """Split the body into the JSON header and the binary tensors, and decode every input;
    ``check_json``, if given, sees the JSON header before it is parsed.

    Without ``Inference-Header-Content-Length`` the whole body is JSON. A length of 0 (a raw
    binary request) is the caller's to handle, since only the model knows its one input.
    """
    split = len(body) if header_length is None else _header_length(header_length, len(body))
    if check_json is not None:
        check_json(body[:split])
    request = _read_whole_json(body) if header_length is None else None
    request = request or _parse_header(body[:split])
    binary = memoryview(body)[split:]
    offset = 0
    inputs: dict[str, np.ndarray] = {}
    for tensor in request["inputs"]:
        name, datatype, shape = tensor["name"], tensor["datatype"], tensor["shape"]
        if name in inputs:
            raise InvalidInput(f"input {name!r} is given twice")
        size = tensor.get("parameters", {}).get("binary_data_size")
        data = tensor.get("data")
        if size is None:
            if data is None:
                raise InvalidInput(
                    f"input {name!r} has neither 'data' nor 'parameters.binary_data_size'"
                )
            inputs[name] = from_json(data, datatype, shape, name)
            continue
        if data is not None:
            raise InvalidInput(f"input {name!r} has both 'data' and 'binary_data_size'")
        if type(size) is not int or size < 0:
            raise InvalidInput(f"input {name!r}: binary_data_size must be a byte count")
        if offset + size > len(binary):
            raise InvalidInput(
                f"input {name!r} declares {size} bytes of binary data but only "
                f"{len(binary) - offset} follow the JSON header"
            )
        inputs[name] = from_bytes(binary[offset : offset + size], datatype, shape, name)
        offset += size
    if offset != len(binary):
        raise InvalidInput(
            f"{len(binary) - offset} bytes follow the JSON header that no input's "
            "binary_data_size accounts for"
        )
    binary_output = request.get("parameters", {}).get("binary_data_output") is True
    outputs = {
        output["name"]: output.get("parameters", {}).get("binary_data", binary_output) is True
        for output in request.get("outputs") or ()
    }
    return DecodedRequest(request.get("id"), inputs, outputs, binary_output)


def _header_length(value: str, body_length: int) -> int:
    length = decimal(value)
    if length is None:
        raise BadRequest(f"{HEADER_LENGTH} must be a byte count; received {value[:40]!r}")
    if length > body_length:
        raise BadRequest(
            f"{HEADER_LENGTH} is {length} but the (decompressed) body has {body_length} bytes"
        )
    return length


def _read_whole_json(body: bytes) -> dict[str, Any] | None:
    """A request that is all JSON with its floating-point inputs read straight into arrays
    (:func:`read_v2_request`), where it reads the body and the fields are as clients send them;
    else None."""
    request = read_v2_request(body)
    return request if request is not None and _already_valid(request) else None


def _parse_header(data: bytes) -> dict[str, Any]:
    """The JSON header as :class:`InferenceRequest` validates it, as plain values."""
    parsed = parse_json(data, "the inference request")
    if not isinstance(parsed, dict):
        kind = type(parsed).__name__
        raise BadRequest(f"the inference request must be a JSON object; received {kind}")
    if _already_valid(parsed):
        return parsed
    try:
        return InferenceRequest.model_validate(parsed).model_dump()
    except ValidationError as exc:
        problems = describe_problems(exc.errors())
        raise InvalidInput(f"invalid inference request: {problems}") from None


def _already_valid(request: dict[str, Any]) -> bool:
    """Whether ``request`` holds every field of :class:`InferenceRequest` in exactly the type
    it validates to, as clients send them: then validating would only copy it (a third of the
    cost of decoding a small binary request). Anything else goes through pydantic, which
    converts or refuses it."""
    inputs, outputs = request.get("inputs"), request.get("outputs")
    return (
        (request.get("id") is None or type(request["id"]) is str)
        and type(request.get("parameters", {})) is dict
        and type(inputs) is list
        and len(inputs) > 0
        and all(_named(tensor) and _typed(tensor) for tensor in inputs)
        and (outputs is None or (type(outputs) is list and all(map(_named, outputs))))
    )


def _named(tensor: Any) -> bool:
    """An object with a string ``name`` and, if any, an object of ``parameters``."""
    return (
        type(tensor) is dict
        and type(tensor.get("name")) is str
        and type(tensor.get("parameters", {})) is dict
    )


def _typed(tensor: dict[str, Any]) -> bool:
    shape = tensor.get("shape")
    return (
        type(tensor.get("datatype")) is str
        and type(shape) is list
        and all(type(dim) is int for dim in shape)
    )


def _check_shape(shape: list[int], name: str) -> int:
    if len(shape) > MAX_DIMS:
        raise InvalidInput(f"input {name!r}: shape has more than {MAX_DIMS} dimensions")
    if shape and (min(shape) < 0 or max(shape) >= 2**64):
        raise InvalidInput(f"input {name!r}: shape {shape} must hold non-negative integers")
    return math.prod(shape)


def _dtype(datatype: str, name: str) -> DType:
    if datatype == "BYTES":
        raise InvalidInput(
            f"input {name!r} is BYTES; this model takes numeric tensors (see its metadata)"
        )
    try:
        return BY_V2[datatype]
    except KeyError:
        raise InvalidInput(
            f"input {name!r}: unknown datatype {datatype!r}; one of {', '.join(DATATYPES)}"
        ) from None


def from_bytes(raw: bytes | memoryview, datatype: str, shape: list[int], name: str) -> np.ndarray:
    """Little-endian row-major bytes -> an array of ``shape`` (BF16 widened to float32)."""
    count = _check_shape(shape, name)
    dtype = _dtype(datatype, name)
    if len(raw) != count * dtype.wire.itemsize:
        raise InvalidInput(
            f"input {name!r}: shape {shape} of {datatype} needs {count * dtype.wire.itemsize} "
            f"bytes; received {len(raw)}"
        )
    return from_wire(raw, dtype, tuple(shape))


def from_json(data: Any, datatype: str, shape: list[int], name: str) -> np.ndarray:
    """Flat or nested JSON values (or the float64 array :func:`read_v2_request` read them into)
    -> an array of ``shape`` in ``datatype`` (BF16 as float32)."""
    count = _check_shape(shape, name)
    held = _dtype(datatype, name).held
    array = data if isinstance(data, np.ndarray) else _json_array(data, name)
    if array.size == 0:
        array = array.astype(held)
    allowed = {"b": "b", "u": "iu", "i": "iu", "f": "iuf"}[held.kind]
    if array.dtype.kind not in allowed:
        expected = {"b": "booleans", "f": "numbers"}.get(held.kind, "integers")
        received = _KINDS.get(array.dtype.kind, "mixed or non-numeric values")
        raise InvalidInput(f"input {name!r}: {datatype} data must hold {expected}; got {received}")
    if array.size != count:
        raise InvalidInput(
            f"input {name!r}: shape {shape} holds {count} values; 'data' holds {array.size}"
        )
    if held.kind in "iu" and array.size:
        info = np.iinfo(held)
        if array.min() < info.min or array.max() > info.max:
            raise InvalidInput(
                f"input {name!r}: values must lie in [{info.min}, {info.max}] for {datatype}"
            )
    with np.errstate(over="ignore", invalid="ignore"):
        return array.astype(held).reshape(shape)


def _json_array(data: Any, name: str) -> np.ndarray:
    check_numeric(data, f"input {name!r}")
    try:
        return np.asarray(data)
    except (ValueError, TypeError, OverflowError):
        raise InvalidInput(f"input {name!r}: 'data' is ragged or malformed") from None


def encode_response(
    model: str, version: str, request_id: str | None, tensors: list[tuple[str, torch.Tensor, bool]]
) -> tuple[bytes, int | None]:
    """The body of an inference answer (an :class:`InferenceResponse` with ``tensors`` as its
    outputs) and, when some output is binary, its JSON header length.

    Each named tensor goes as JSON ``data`` or, when its flag is set, as raw bytes after the
    header in output order, with ``parameters.binary_data_size``. Written as plain dicts: the
    pydantic models describe the answer, building them would double the cost of a small one.
    """
    chunks: list[bytes] = []
    outputs: list[dict[str, Any]] = []
    for name, tensor, binary in tensors:
        output: dict[str, Any] = {
            "name": name,
            "datatype": datatype_of(tensor.dtype),
            "shape": list(tensor.shape),
        }
        if binary:
            chunks.append(to_wire(tensor))
            output["parameters"] = {"binary_data_size": len(chunks[-1])}
        else:
            values = tensor.float() if tensor.dtype == torch.bfloat16 else tensor
            output["data"] = values.reshape(-1).tolist()
        outputs.append(output)
    answer: dict[str, Any] = {"model_name": model, "model_version": version}
    if request_id is not None:
        answer["id"] = request_id
    answer["outputs"] = outputs
    header = orjson.dumps(answer)
    if not chunks:
        return header, None
    return b"".join([header, *chunks]), len(header)
