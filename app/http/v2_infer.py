"""The Open Inference Protocol (V2) inference front door: ``POST /v2/models/{name}[/versions/
{version}]/infer`` with JSON tensors or the binary tensor data extension (optionally gzip or
deflate), answering JSON or binary outputs per ``binary_data`` / ``binary_data_output``."""

from __future__ import annotations

import functools
import re

from app.codecs.v2 import (
    HEADER_LENGTH,
    DecodedRequest,
    datatype_of,
    decode_request,
    decompress,
    encode_response,
    from_bytes,
)
from app.errors import InvalidInput
from app.http import VERSION_HEADER
from app.http.answers import JSON, Answer
from app.http.endpoint import HttpCall, Paths
from app.serving.inference import InferenceRequest, InferenceService, Target


class V2Infer:
    """The Open Inference Protocol's inference adapter over the inference service."""

    paths: Paths = (
        (re.compile(r"/v2/models/(?P<name>[^/]+)/infer"), "/v2/models/{name}/infer"),
        (
            re.compile(r"/v2/models/(?P<name>[^/]+)/versions/(?P<version>[^/]+)/infer"),
            "/v2/models/{name}/versions/{version}/infer",
        ),
    )

    async def answer(self, call: HttpCall, service: InferenceService) -> Answer:
        """Resolve the model and version (404 before the body is read), decode, run, encode."""
        target = await service.target(call.params["name"], call.params.get("version"))
        call.served = target.model.name
        body = decompress(
            await call.body(), call.headers.get("content-encoding"), call.max_body_bytes
        )
        header_length = call.headers.get(HEADER_LENGTH.lower())
        if header_length is not None and header_length.strip() == "0":
            decoded = _raw_request(target, body)
        else:
            check = functools.partial(service.check_json_counts, model=target.model)
            decoded = decode_request(body, header_length, check)
        wanted = service.outputs(target, decoded.outputs)
        result = await service.infer(target, InferenceRequest(decoded.inputs))
        outputs = [(name, result.outputs[name], decoded.binary(name)) for name in wanted]
        content, json_length = encode_response(result.model, result.version, decoded.id, outputs)
        headers = {VERSION_HEADER: result.version}
        if json_length is None:
            return 200, content, {"content-type": JSON, **headers}
        headers |= {"content-type": "application/octet-stream", HEADER_LENGTH: str(json_length)}
        return 200, content, headers


def _raw_request(target: Target, body: bytes) -> DecodedRequest:
    """``Inference-Header-Content-Length: 0``: the body is one sample of the model's one input,
    and every output comes back binary."""
    model = target.model
    if len(model.inputs) > 1:
        raise InvalidInput(
            f"model {model.name!r} takes {len(model.inputs)} inputs: a body without a JSON"
            f" header carries one; name each input in the header"
        )
    [only] = model.inputs
    array = from_bytes(body, datatype_of(only.dtype), [1, *only.shape], only.name)
    return DecodedRequest(None, {only.name: array}, {}, binary_output=True)
