"""The predict hot path: ``POST /v1/models/{name}/predict`` and ``POST /predict`` served as a raw
ASGI middleware in front of the framework's routing and dependency injection.

On small models the HTTP and JSON path is the whole cost, so this path does only what each
request needs: authenticate, read the body with a byte cap, decode it with orjson + numpy (or
take raw tensor bytes / ``.npy``), check shape and dtype on the array, queue it for the model's
batcher, and answer. :mod:`app.http.routes.predict` describes the endpoints in the OpenAPI document.
"""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

import numpy as np
import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.codecs.arrays import check_array, parse_json, read_capped, to_batch
from app.codecs.binary import (
    DTYPE_HEADER,
    NPY,
    RAW,
    SHAPE_HEADER,
    decode_npy,
    decode_raw,
    encode_npy,
    encode_raw,
    parse_shape,
)
from app.config import Settings
from app.errors import (
    BadRequest,
    InvalidInput,
    MethodNotAllowed,
    ModelportError,
    UnsupportedMediaType,
    error_body,
)
from app.http.deps import authorize_api
from app.http.observer import ROUTE_KEY
from app.serving.model import ServedModel
from app.serving.registry import ModelRegistry

logger = logging.getLogger(__name__)
VERSION_HEADER = "X-Model-Version"
PREDICT_PATH = re.compile(r"/v1/models/([^/]+)/predict")
JSON = "application/json"
# Read as JSON too: no type, and what `curl -d` sends when not told otherwise.
_JSON_ALIASES = ("", JSON, "application/x-www-form-urlencoded", "text/plain")


@dataclass
class _Call:
    """One predict request as the hot path sees it."""

    name: str | None
    headers: dict[str, str]
    query_string: bytes
    served: str = ""
    """The model that served, once resolved (for the request metrics)."""

    @property
    def content_type(self) -> str:
        kind = self.headers.get("content-type", "").split(";")[0].strip().lower()
        return JSON if kind in _JSON_ALIASES else kind

    @property
    def accept(self) -> str:
        """The binary form asked for in ``Accept``, else JSON."""
        accept = self.headers.get("accept", "")
        for binary in (RAW, NPY):
            if binary in accept:
                return binary
        return JSON


class PredictEndpoint:
    """ASGI middleware answering the predict routes; everything else goes to ``app``."""

    def __init__(self, app: ASGIApp, registry: ModelRegistry, settings: Settings) -> None:
        self.app = app
        self.registry = registry
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        match = PREDICT_PATH.fullmatch(path)
        if match is None and path != "/predict":
            await self.app(scope, receive, send)
            return
        if scope["method"] != "POST":
            error = MethodNotAllowed(f"{scope['method']} {path}: method not allowed; allowed: POST")
            await _answer(send, *_error_answer(error))
            return
        call = _Call(
            match.group(1) if match else None,
            {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]},
            scope["query_string"],
        )
        try:
            status, body, headers = await _predict(call, receive, self.registry, self.settings)
        except ModelportError as exc:
            status, body, headers = _error_answer(exc)
        except Exception:  # in front of the framework: nothing else would answer
            logger.exception("unhandled error on POST %s", path)
            status, body = 500, orjson.dumps(error_body("internal server error", "internal_error"))
            headers = {"content-type": JSON}
        scope[ROUTE_KEY] = "/v1/models/{name}/predict" if match else "/predict"
        scope["path_params"] = {"name": call.served or call.name or ""}
        await _answer(send, status, body, headers)


def _error_answer(exc: ModelportError) -> tuple[int, bytes, dict[str, str]]:
    body = orjson.dumps(error_body(exc.message, exc.code, exc.detail))
    return exc.status, body, {"content-type": JSON, **exc.headers}


async def _predict(
    call: _Call, receive: Receive, registry: ModelRegistry, settings: Settings
) -> tuple[int, bytes, dict[str, str]]:
    authorize_api(call.headers.get("authorization"), settings)
    body = await read_capped(
        _body_chunks(receive), call.headers.get("content-length"), settings.max_body_bytes
    )
    model, batch = _decode(call, body, registry, settings)
    if call.accept == JSON:
        runtime, outputs = await model.predict(batch)
        payload = {"model": model.name, "version": runtime.version, "outputs": outputs}
        return 200, orjson.dumps(payload), {"content-type": JSON, VERSION_HEADER: runtime.version}
    runtime, output = await model.infer(batch)
    headers = {"content-type": call.accept, VERSION_HEADER: runtime.version}
    if call.accept == NPY:
        return 200, encode_npy(output), headers
    data, dtype = encode_raw(output)
    shape = ",".join(str(d) for d in output.shape)
    return 200, data, {**headers, SHAPE_HEADER.lower(): shape, DTYPE_HEADER.lower(): dtype}


def _decode(
    call: _Call, body: bytes, registry: ModelRegistry, settings: Settings
) -> tuple[ServedModel, np.ndarray]:
    """The model and the checked input batch, from a JSON, raw-tensor or .npy body."""
    kind = call.content_type
    if kind in (RAW, NPY):
        model = registry.resolve(call.name or _query_model(call.query_string))
        call.served = model.name
        if kind == RAW:
            shape = parse_shape(call.headers.get(SHAPE_HEADER.lower()))
            array = decode_raw(body, call.headers.get(DTYPE_HEADER.lower()), shape)
        else:
            array = decode_npy(body)
        return model, _check(model, array, settings)
    if kind != JSON:
        raise UnsupportedMediaType(
            f"unsupported Content-Type {kind!r}; send {JSON}, {RAW} (with {SHAPE_HEADER} and "
            f"{DTYPE_HEADER}) or {NPY}"
        )
    parsed = _parse_json(body, {"inputs"} if call.name else {"inputs", "model"})
    name = call.name or parsed.get("model")
    if name is not None and not isinstance(name, str):
        raise InvalidInput(f"'model' must be a string; received {type(name).__name__}")
    model = registry.resolve(name)
    call.served = model.name
    batch = to_batch(
        parsed["inputs"],
        model.sample_shape,
        model.spec.input_dtype,
        max_samples=settings.max_samples_per_request,
        allow_non_finite=model.spec.allow_non_finite_input,
        known_numeric=_inputs_hold_no_string(body, parsed),
    )
    return model, batch


def _check(model: ServedModel, array: np.ndarray, settings: Settings) -> np.ndarray:
    return check_array(
        array,
        model.sample_shape,
        model.spec.input_dtype,
        max_samples=settings.max_samples_per_request,
        allow_non_finite=model.spec.allow_non_finite_input,
    )


def _query_model(query_string: bytes) -> str | None:
    """``?model=NAME``, which names the model of a raw or .npy body on ``/predict``."""
    values = parse_qs(query_string.decode("latin-1")).get("model")
    return values[0] if values else None


def _parse_json(body: bytes, fields: set[str]) -> dict[str, Any]:
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


def _inputs_hold_no_string(body: bytes, parsed: dict[str, Any]) -> bool:
    """Whether the body proves that ``inputs`` holds no string, at the cost of counting its
    quote characters: every key, and a string ``model``, takes at least two, so when they
    account for all of them no string is left for ``inputs``."""
    least = 2 * len(parsed) + (2 if isinstance(parsed.get("model"), str) else 0)
    return body.count(b'"') <= least


async def _body_chunks(receive: Receive) -> AsyncIterator[bytes]:
    while True:
        message: Message = await receive()
        if message["type"] == "http.disconnect":
            raise BadRequest("the client disconnected before sending the whole body")
        yield message.get("body", b"")
        if not message.get("more_body", False):
            return


async def _answer(send: Send, status: int, body: bytes, headers: dict[str, str]) -> None:
    raw = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
    raw.append((b"content-length", b"%d" % len(body)))
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})
