"""Predictions over the server's gRPC door, the Open Inference Protocol's ``ModelInfer``: arrays
go as ``raw_input_contents`` and come back from ``raw_output_contents`` as the same numpy arrays
as over HTTP, with no JSON on the way; status codes become the client's typed errors. Only a
client given ``grpc=`` imports this module: ``import app.client`` loads neither grpc nor the
generated protocol code (messages and stubs, no server logic)."""

from __future__ import annotations

from typing import Any, TypeVar

import grpc
import grpc.aio

from app.client.errors import (
    ApiError,
    AuthenticationError,
    ConflictError,
    InvalidInputError,
    ModelportClientError,
    NotAcceptableError,
    NotFoundError,
    PayloadTooLargeError,
    PermissionDeniedError,
    ServerTimeout,
    ServerUnreachable,
    UnavailableError,
)
from app.client.tensors import BY_DATATYPE, WIRE_DTYPES, Prediction, WireTensors, decode_tensor
from app.grpc.proto import grpc_predict_v2_pb2 as pb

Request = TypeVar("Request")
Response = TypeVar("Response")

SERVICE = "/inference.GRPCInferenceService"
INFER = (
    f"{SERVICE}/ModelInfer",
    pb.ModelInferRequest.SerializeToString,
    pb.ModelInferResponse.FromString,
)
DESCRIBE = (
    f"{SERVICE}/ModelMetadata",
    pb.ModelMetadataRequest.SerializeToString,
    pb.ModelMetadataResponse.FromString,
)
"""A channel's ``unary_unary`` arguments of each RPC the client calls."""
REQUEST_ID = "x-request-id"
"""Trailing metadata the server sets on every call it answers, refusals included."""
OPTIONS = (("grpc.max_receive_message_length", -1),)
"""Answers as large as the server sends, as over HTTP (gRPC's default stops at 4 MiB)."""
ERRORS: dict[grpc.StatusCode, type[ApiError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidInputError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.UNAUTHENTICATED: AuthenticationError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.FAILED_PRECONDITION: ConflictError,
    # the server's body bound (MODELPORT_MAX_BODY_BYTES), which REST answers with a 413
    grpc.StatusCode.RESOURCE_EXHAUSTED: PayloadTooLargeError,
    # the model cannot serve, its queue is full, or the server drains
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
}
"""The server's status codes (app/grpc/errors.py) as the errors its REST door's statuses
raise; any other code is a plain ApiError."""


class GrpcPredictions:
    """What the sync and async transports share: the messages, the answers and the errors.
    An unnamed array is named by the model's one input, from its metadata (asked once)."""

    def __init__(self, target: str, token: str | None, timeout: float) -> None:
        self.target = target
        self.timeout = timeout
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._signatures: dict[str, tuple[list[str], list[str]]] = {}
        """Input and output names by model, for unnamed arrays."""

    def metadata_request(self, model: str, tensors: WireTensors) -> pb.ModelMetadataRequest | None:
        """The metadata to ask for before ``tensors`` can go: an unnamed array's input name."""
        if isinstance(tensors, dict) or model in self._signatures:
            return None
        return pb.ModelMetadataRequest(name=model)

    def learn(self, model: str, answer: pb.ModelMetadataResponse) -> None:
        """Keep the model's input and output names, from its metadata."""
        names = [tensor.name for tensor in answer.inputs], [t.name for t in answer.outputs]
        self._signatures[model] = names

    def infer_request(self, model: str, tensors: WireTensors) -> pb.ModelInferRequest:
        """Each array as raw little-endian bytes; an unnamed one asks for the model's one
        output (NotAcceptableError and InvalidInputError as the REST door for a model of
        several)."""
        request = pb.ModelInferRequest(model_name=model)
        if not isinstance(tensors, dict):
            inputs, outputs = self._signatures[model]
            if len(outputs) > 1:
                raise NotAcceptableError(
                    f"model {model!r} has {len(outputs)} outputs ({', '.join(outputs)}): one "
                    "array holds one; give the inputs by name",
                    406,
                    "not_acceptable",
                )
            if len(inputs) > 1:
                raise InvalidInputError(
                    f"model {model!r} takes {len(inputs)} inputs by name ({', '.join(inputs)});"
                    " received one unnamed input",
                    422,
                    "invalid_input",
                )
            tensors = {inputs[0]: tensors}
            request.outputs.add(name=outputs[0])
        for name, (array, dtype) in tensors.items():
            request.inputs.add(name=name, datatype=WIRE_DTYPES[dtype].datatype, shape=array.shape)
            request.raw_input_contents.append(array.tobytes())
        return request

    def prediction_of(self, answer: pb.ModelInferResponse, named: bool) -> Prediction:
        """The outputs by name for inputs by name, else the one output."""
        raw = answer.raw_output_contents
        if len(raw) != len(answer.outputs):
            raise ModelportClientError(
                f"malformed ModelInfer answer: {len(raw)} raw_output_contents for "
                f"{len(answer.outputs)} outputs"
            )
        outputs = {}
        for output, data in zip(answer.outputs, raw, strict=True):
            dtype = BY_DATATYPE.get(output.datatype)
            if dtype is None:
                raise ModelportClientError(
                    f"malformed ModelInfer answer: output {output.name!r} of datatype "
                    f"{output.datatype!r}"
                )
            outputs[output.name] = decode_tensor(data, dtype, tuple(output.shape))
        if named:
            return Prediction(answer.model_name, answer.model_version, outputs)
        [array] = outputs.values()  # the one output asked for
        return Prediction(answer.model_name, answer.model_version, array)

    def failure(self, exc: grpc.RpcError) -> ModelportClientError:
        """The client's error for a failed call, with the server's message. A code without
        the server's request id came from the channel: no connection, or no answer in time."""
        code, message = exc.code(), exc.details() or ""
        trailers: tuple[Any, ...] = tuple(exc.trailing_metadata() or ())
        answered = any(item[0] == REQUEST_ID for item in trailers)
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            if answered:  # the server's own bound, MODELPORT_REQUEST_TIMEOUT_S
                return ServerTimeout(message)
            return ServerTimeout(
                f"the server's gRPC door at {self.target} did not answer within the client's "
                f"timeout of {self.timeout} s"
            )
        if code == grpc.StatusCode.UNAVAILABLE and not answered:
            return ServerUnreachable(f"cannot reach the gRPC door at {self.target}: {message}")
        cls = ERRORS.get(code, ApiError)
        status = cls.status_codes[0] if cls.status_codes else 500
        return cls(message, status, code.name.lower(), grpc_code=code.name)


class GrpcTransport(GrpcPredictions):
    """Predictions over a ``grpc`` channel, for :class:`app.client.ModelportClient`."""

    def __init__(self, target: str, token: str | None, timeout: float) -> None:
        super().__init__(target, token, timeout)
        self._channel = grpc.insecure_channel(target, options=OPTIONS)
        self._infer = self._channel.unary_unary(*INFER)
        self._describe = self._channel.unary_unary(*DESCRIBE)

    def close(self) -> None:
        self._channel.close()

    def prediction(self, model: str, tensors: WireTensors) -> Prediction:
        """Run ``tensors`` through ``model``: the answer as HTTP's raw one."""
        ask = self.metadata_request(model, tensors)
        if ask is not None:
            self.learn(model, self._call(self._describe, ask))
        answer = self._call(self._infer, self.infer_request(model, tensors))
        return self.prediction_of(answer, isinstance(tensors, dict))

    def _call(
        self, method: grpc.UnaryUnaryMultiCallable[Request, Response], request: Request
    ) -> Response:
        try:
            return method(request, timeout=self.timeout, metadata=self.metadata)
        except grpc.RpcError as exc:
            raise self.failure(exc) from None


class AsyncGrpcTransport(GrpcPredictions):
    """Predictions over a ``grpc.aio`` channel, for :class:`app.client.AsyncModelportClient`;
    the channel opens on the first call, in the caller's event loop (it belongs to one)."""

    def __init__(self, target: str, token: str | None, timeout: float) -> None:
        super().__init__(target, token, timeout)
        self._channel: grpc.aio.Channel | None = None

    async def aclose(self) -> None:
        if self._channel is not None:
            await self._channel.close()

    async def prediction(self, model: str, tensors: WireTensors) -> Prediction:
        """See :meth:`GrpcTransport.prediction`."""
        if self._channel is None:
            self._channel = grpc.aio.insecure_channel(self.target, options=OPTIONS)
        ask = self.metadata_request(model, tensors)
        if ask is not None:
            self.learn(model, await self._call(self._channel.unary_unary(*DESCRIBE), ask))
        request = self.infer_request(model, tensors)
        answer = await self._call(self._channel.unary_unary(*INFER), request)
        return self.prediction_of(answer, isinstance(tensors, dict))

    async def _call(
        self, method: grpc.aio.UnaryUnaryMultiCallable[Request, Response], request: Request
    ) -> Response:
        try:
            return await method(request, timeout=self.timeout, metadata=self.metadata)
        except grpc.RpcError as exc:
            raise self.failure(exc) from None
