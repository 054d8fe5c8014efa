"""The tensors of ``ModelInfer``: its inputs (``raw_input_contents``, or typed ``contents``)
decoded with the V2 codec's checks, and outputs encoded raw or typed."""

from __future__ import annotations

import math

import numpy as np
import torch

from app.codecs.dtypes import to_wire
from app.codecs.v2 import datatype_of, from_bytes, from_json
from app.errors import InvalidInput
from app.grpc.proto.grpc_predict_v2_pb2 import (
    InferTensorContents,
    ModelInferRequest,
    ModelInferResponse,
)

CONTENTS = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
"""The field of ``InferTensorContents`` that holds each datatype's values (FP16 and BF16 have
none: they travel raw)."""
FIELDS = tuple(dict.fromkeys(CONTENTS.values()))


def decode_inputs(request: ModelInferRequest) -> tuple[dict[str, np.ndarray], bool]:
    """The request's input tensors by name, and whether they came raw."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidInput(
            f"raw_input_contents holds {len(raw)} tensors for {len(request.inputs)} inputs; "
            "send one per input, in the order of 'inputs'"
        )
    inputs: dict[str, np.ndarray] = {}
    for index, tensor in enumerate(request.inputs):
        name, datatype, shape = tensor.name, tensor.datatype, list(tensor.shape)
        if name in inputs:
            raise InvalidInput(f"input {name!r} is given twice")
        if raw:
            if tensor.HasField("contents"):
                raise InvalidInput(
                    f"input {name!r} has typed contents beside raw_input_contents; "
                    "send every input one way"
                )
            inputs[name] = from_bytes(raw[index], datatype, shape, name)
        else:
            inputs[name] = _typed(tensor.contents, datatype, shape, name)
    return inputs, bool(raw)


def _typed(contents: InferTensorContents, datatype: str, shape: list[int], name: str) -> np.ndarray:
    field = CONTENTS.get(datatype)
    if field is None and datatype in ("FP16", "BF16"):
        raise InvalidInput(
            f"input {name!r} is {datatype}, which has no typed contents: "
            "send it in raw_input_contents"
        )
    others = [other for other in FIELDS if other != field and len(getattr(contents, other))]
    if others:
        raise InvalidInput(
            f"input {name!r}: {datatype} values go in {field or 'a typed field'}; "
            f"received {', '.join(others)}"
        )
    if field is None:  # an unknown datatype: the codec's message lists the known ones
        return from_json([], datatype, shape, name)
    values = list(getattr(contents, field))
    if shape and min(shape) >= 0 and len(values) != math.prod(shape):
        raise InvalidInput(
            f"input {name!r}: shape {shape} holds {math.prod(shape)} values; "
            f"{field} holds {len(values)}"
        )
    return from_json(values, datatype, shape, name)


def add_output(response: ModelInferResponse, name: str, tensor: torch.Tensor, raw: bool) -> None:
    """Append ``tensor`` to the response's outputs: as raw bytes when ``raw`` or when its
    datatype has no typed contents (then every output of the response must be raw)."""
    datatype = datatype_of(tensor.dtype)
    output = response.outputs.add(name=name, datatype=datatype, shape=list(tensor.shape))
    field = CONTENTS.get(datatype)
    if raw or field is None:
        response.raw_output_contents.append(to_wire(tensor))
        return
    getattr(output.contents, field).extend(tensor.reshape(-1).tolist())


def wants_raw_output(raw_input: bool, outputs: list[torch.Tensor]) -> bool:
    """Outputs mirror the inputs: raw for raw inputs (Triton's answer to every request), typed
    for typed ones unless some output has no typed contents (FP16, BF16)."""
    return raw_input or any(datatype_of(t.dtype) not in CONTENTS for t in outputs)
