"""The native predict front door: ``POST /v1/models/{name}/predict`` and ``POST /predict`` with a
JSON body (``{"inputs": [sample, ...]}``, or ``{"inputs": {"name": [sample, ...], ...}}`` for
several inputs), raw little-endian tensor bytes, an ``.npy`` or an ``.npz`` body; JSON outputs
(the model's postprocess) or, asked for in ``Accept``, the raw output tensor(s)."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import parse_qs

import orjson

from app.codecs.binary import (
    DTYPE_HEADER,
    NPY,
    NPZ,
    RAW,
    SHAPE_HEADER,
    decode_npy,
    decode_npz,
    decode_raw,
    encode_npy,
    encode_npz,
    encode_raw,
    parse_shape,
)
from app.codecs.float_json import read_float_inputs
from app.codecs.text import parse_json
from app.errors import BadRequest, InvalidInput, NotAcceptable, UnsupportedMediaType
from app.http import VERSION_HEADER
from app.http.answers import JSON, Answer
from app.http.endpoint import HttpCall, Paths
from app.serving.inference import InferenceRequest, InferenceService, Target

# Read as JSON too: no type, and what `curl -d` sends when not told otherwise.
_JSON_ALIASES = ("", JSON, "application/x-www-form-urlencoded", "text/plain")
NAMED_FIELDS = frozenset({"inputs"})
"""A JSON body's fields on a path that names its model."""
FIELDS = frozenset({"inputs", "model"})
"""A JSON body's fields on ``/predict``."""


class NativePredict:
    """The native protocol's adapter over the inference service."""

    paths: Paths = (
        (re.compile(r"/v1/models/(?P<name>[^/]+)/predict"), "/v1/models/{name}/predict"),
        (re.compile(r"/predict"), "/predict"),
    )

    async def answer(self, call: HttpCall, service: InferenceService) -> Answer:
        """Decode the body, run it, and answer in the form ``Accept`` asks for."""
        body = await call.body()
        kind, accept = _content_type(call), _accept(call)
        if kind in (RAW, NPY, NPZ):
            target = await service.target(call.params.get("name") or _query_model(call))
            call.served = target.model.name
            request = InferenceRequest(_tensors(call, kind, body), postprocess=accept == JSON)
        elif kind == JSON:
            target, request = await _json_request(call, body, service, accept == JSON)
        else:
            raise UnsupportedMediaType(
                f"unsupported Content-Type {kind!r}; send {JSON}, {RAW} (with {SHAPE_HEADER} "
                f"and {DTYPE_HEADER}), {NPY} or {NPZ} (several inputs by name)"
            )
        if accept in (RAW, NPY):
            _check_one_output(service, target, accept)
        result = await service.infer(target, request)
        headers = {VERSION_HEADER: result.version}
        if result.samples is not None:
            payload = {"model": result.model, "version": result.version, "outputs": result.samples}
            return 200, orjson.dumps(payload), {"content-type": JSON, **headers}
        if accept == NPZ:
            return 200, encode_npz(result.outputs), {"content-type": NPZ, **headers}
        [output] = result.outputs.values()
        if accept == NPY:
            return 200, encode_npy(output), {"content-type": NPY, **headers}
        data, dtype = encode_raw(output)
        shape = ",".join(str(d) for d in output.shape)
        headers |= {"content-type": RAW, SHAPE_HEADER: shape, DTYPE_HEADER: dtype}
        return 200, data, headers


async def _json_request(
    call: HttpCall, body: bytes, service: InferenceService, postprocess: bool
) -> tuple[Target, InferenceRequest]:
    """The target (the path's model, resolved before the body is read, else the body's) and
    the request of a JSON body."""
    named = call.params.get("name")
    target = None if named is None else await service.target(named)
    service.check_json_counts(body, None if target is None else target.model)
    parsed, inputs, numeric = decode_json_body(body, FIELDS if target is None else NAMED_FIELDS)
    if target is None:
        name = parsed.get("model")
        if name is not None and not isinstance(name, str):
            raise InvalidInput(f"'model' must be a string; received {type(name).__name__}")
        target = await service.target(name)
    call.served = target.model.name
    return target, InferenceRequest(inputs, postprocess=postprocess, numeric=numeric)


def decode_json_body(body: bytes, fields: frozenset[str]) -> tuple[dict[str, Any], Any, bool]:
    """A JSON body's fields (``model`` is what callers read; ``inputs`` may be among them), its
    ``inputs`` (an array read straight from the body where :mod:`app.codecs.float_json` can,
    else lists), and whether they are proven to hold numbers only."""
    fast = read_float_inputs(body, fields)
    if fast is not None:
        others, array = fast
        return others, array, True
    parsed = _parse_body(body, fields)
    return parsed, parsed["inputs"], _inputs_hold_numbers_only(body, parsed)


def _check_one_output(service: InferenceService, target: Target, accept: str) -> None:
    """NotAcceptable, before the model runs, when one raw or .npy answer cannot hold its
    outputs."""
    outputs = service.outputs(target, ())
    if len(outputs) > 1:
        raise NotAcceptable(
            f"model {target.model.name!r} has {len(outputs)} outputs ({', '.join(outputs)}):"
            f" one {accept} body holds one; ask for {NPZ} or {JSON}"
        )


def _tensors(call: HttpCall, kind: str, body: bytes) -> Any:
    """A binary body's tensor (raw or .npy), or its tensors by name (.npz)."""
    if kind == RAW:
        return decode_raw(body, *_tensor_headers(call))
    if kind == NPY:
        return decode_npy(body)
    return decode_npz(body, call.max_body_bytes)


def _content_type(call: HttpCall) -> str:
    kind = call.headers.get("content-type", "").split(";")[0].strip().lower()
    return JSON if kind in _JSON_ALIASES else kind


def _accept(call: HttpCall) -> str:
    """The binary form asked for in ``Accept``, else JSON."""
    accept = call.headers.get("accept", "")
    return next((binary for binary in (RAW, NPY, NPZ) if binary in accept), JSON)


def _tensor_headers(call: HttpCall) -> tuple[str | None, tuple[int, ...]]:
    shape = parse_shape(call.headers.get(SHAPE_HEADER.lower()))
    return call.headers.get(DTYPE_HEADER.lower()), shape


def _query_model(call: HttpCall) -> str | None:
    """``?model=NAME``, which names the model of a raw or .npy body on ``/predict``."""
    values = parse_qs(call.query_string.decode("latin-1")).get("model")
    return values[0] if values else None


def _parse_body(body: bytes, fields: frozenset[str]) -> dict[str, Any]:
    """The body as a JSON object holding ``inputs`` and no keys outside ``fields``."""
    parsed = parse_json(body, "the body")
    if not isinstance(parsed, dict):
        raise BadRequest(f"the body must be a JSON object; received {type(parsed).__name__}")
    if "inputs" not in parsed:
        raise InvalidInput("the body has no 'inputs': send {\"inputs\": [sample, ...]}")
    unknown = sorted(set(parsed) - fields)
    if unknown:
        raise InvalidInput(f"unknown field(s) {unknown}; expected {sorted(fields)}")
    return parsed


def _inputs_hold_numbers_only(body: bytes, parsed: dict[str, Any]) -> bool:
    """Whether the body proves that ``inputs`` holds no string and no boolean, at the cost of
    counting its quote characters and looking for ``true`` and ``false``: every key, and a
    string ``model``, takes at least two quotes, so when they account for all of them no
    string is left for ``inputs``."""
    inputs = parsed["inputs"]
    least = 2 * len(parsed) + (2 if isinstance(parsed.get("model"), str) else 0)
    least += 2 * len(inputs) if isinstance(inputs, dict) else 0  # the input names
    return body.count(b'"') <= least and b"true" not in body and b"false" not in body
