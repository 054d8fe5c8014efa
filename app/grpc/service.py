"""The Open Inference Protocol's gRPC adapter over the inference service: each RPC of
``inference.GRPCInferenceService`` (and the standard health check) as a plain coroutine from its
request message to its response message. Authentication, draining, errors and metrics are the
server's (:mod:`app.grpc.server`), the same for every RPC."""

from __future__ import annotations

import asyncio
import threading

from app.codecs.v2 import EXTENSIONS, PLATFORM, tensor_metadata
from app.errors import NoSuchEndpoint
from app.grpc.proto import grpc_predict_v2_pb2 as pb
from app.grpc.proto.health_pb2 import HealthCheckRequest, HealthCheckResponse
from app.grpc.tensors import add_output, decode_inputs, wants_raw_output
from app.serving.inference import InferenceRequest, InferenceService
from app.serving.model import ServedModel

SERVICE = "inference.GRPCInferenceService"
HEALTH_SERVICE = "grpc.health.v1.Health"
SERVER_NAME = "modelport"


class InferenceServicer:
    """One coroutine per RPC, over the inference service and its registry."""

    def __init__(
        self, service: InferenceService, server_version: str, draining: threading.Event
    ) -> None:
        self.service = service
        self.registry = service.registry
        self.server_version = server_version
        self.draining = draining

    def ready(self) -> bool:
        """Ready as ``/health/ready`` is: every model can serve, and the process is not
        draining."""
        return not self.registry.unavailable() and not self.draining.is_set()

    async def server_live(self, request: pb.ServerLiveRequest) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def server_ready(self, request: pb.ServerReadyRequest) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.ready())

    async def model_ready(self, request: pb.ModelReadyRequest) -> pb.ModelReadyResponse:
        """As ``GET /v2/models/{name}[/versions/{version}]/ready``: an unknown model or version
        is NOT_FOUND; a stored version is ready once loaded here (a pure read)."""
        model = self.registry.get(request.name)
        if request.version:
            await asyncio.to_thread(model.record, request.version)  # NOT_FOUND when none
            return pb.ModelReadyResponse(ready=model.loaded(request.version) is not None)
        return pb.ModelReadyResponse(ready=model.runtime is not None)

    async def server_metadata(self, request: pb.ServerMetadataRequest) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(
            name=SERVER_NAME, version=self.server_version, extensions=EXTENSIONS
        )

    async def model_metadata(self, request: pb.ModelMetadataRequest) -> pb.ModelMetadataResponse:
        """As ``GET /v2/models/{name}[/versions/{version}]``: the output's datatype and shape
        are those the load-time smoke test saw, so metadata never runs the model."""
        model = self.registry.get(request.name)
        if request.version:
            await asyncio.to_thread(model.record, request.version)  # NOT_FOUND when none
        return await _metadata(model)

    async def model_infer(self, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
        """Resolve the model and version (NOT_FOUND before any tensor is read), decode, run
        on the model's batcher, encode."""
        target = await self.service.target(request.model_name, request.model_version or None)
        wanted = self.service.outputs(target, [output.name for output in request.outputs])
        inputs, raw = decode_inputs(request)
        result = await self.service.infer(target, InferenceRequest(inputs))
        tensors = [result.outputs[name] for name in wanted]
        response = pb.ModelInferResponse(
            model_name=result.model, model_version=result.version, id=request.id
        )
        raw = wants_raw_output(raw, tensors)
        for name, tensor in zip(wanted, tensors, strict=True):
            add_output(response, name, tensor, raw)
        return response

    async def health_check(self, request: HealthCheckRequest) -> HealthCheckResponse:
        """The standard health check: the server as a whole (``""``) serves while the process
        runs (liveness: a model that cannot load is no reason to restart); the inference
        service serves while ready (readiness)."""
        if request.service == "":
            serving = True
        elif request.service == SERVICE:
            serving = self.ready()
        else:
            raise NoSuchEndpoint(f"no service named {request.service!r}; one of '', {SERVICE!r}")
        status = HealthCheckResponse.SERVING if serving else HealthCheckResponse.NOT_SERVING
        return HealthCheckResponse(status=status)


async def _metadata(model: ServedModel) -> pb.ModelMetadataResponse:
    versions = [record.id for record in await asyncio.to_thread(model.versions)]
    tensor = pb.ModelMetadataResponse.TensorMetadata
    return pb.ModelMetadataResponse(
        name=model.name,
        versions=versions,
        platform=PLATFORM,
        inputs=[tensor(**t.model_dump()) for t in tensor_metadata(model.inputs)],
        outputs=[tensor(**t.model_dump()) for t in tensor_metadata(model.outputs)],
    )
