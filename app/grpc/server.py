"""The gRPC front door's server: a ``grpc.aio`` server on ``MODELPORT_GRPC_PORT``, in the event
loop of each worker process (every worker binds the port with ``SO_REUSEPORT``, as the REST
workers do theirs), opened by the app's lifespan once the models are loaded and closed before
they stop. Every RPC goes through one wrapper: the draining gate and the API token as the REST
door applies them, errors rendered once (:mod:`app.grpc.errors`), the request metrics and the
access log line.

To add an RPC: its messages in a .proto of app/grpc/proto (``make grpc``), a coroutine on a
servicer (:mod:`app.grpc.service`, or :mod:`app.grpc.extensions` for Triton's extensions), and
a row in :func:`rpcs`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from fastapi import FastAPI
from google.protobuf.message import Message

from app.config import Settings
from app.errors import Draining
from app.grpc.errors import refusal
from app.grpc.extensions import ExtensionServicer
from app.grpc.proto import extensions_pb2 as ex
from app.grpc.proto import grpc_predict_v2_pb2 as pb
from app.grpc.proto.health_pb2 import HealthCheckRequest
from app.grpc.service import HEALTH_SERVICE, SERVICE, InferenceServicer
from app.http.auth import authorize_api
from app.http.shutdown import draining
from app.observability.logs import request_id
from app.observability.requests import NO_ID, REQUEST_ID_HEADER, RequestRecorder
from app.runner.limits import grpc_connection_cap
from app.serving.inference import InferenceService

logger = logging.getLogger(__name__)

MAX_CALLS_PER_CONNECTION = 100
"""Calls in flight on one gRPC connection; a client's next ones wait for a free stream."""
MAX_CONNECTION_AGE_S = 600
"""After it, a connection is sent GOAWAY (its client connects again, maybe to another
replica behind a load balancer); its calls in flight have the grace to finish."""
DRAIN_POLL_S = 0.1
"""How often the server looks at the draining flag (uvicorn looks at its own as often)."""

Handler = Callable[[Any], Awaitable[Message]]


@dataclass(frozen=True, slots=True)
class Rpc:
    """One method: its service, name, request type and coroutine, and how the server treats
    it (as REST treats the matching path)."""

    service: str
    name: str
    request: type[Message]
    handler: Handler
    authenticated: bool = False
    """Needs the API token when MODELPORT_API_TOKEN is set (inference, model metadata and
    Triton's extensions, as on REST)."""
    probe: bool = False
    """A health probe: answered while draining, and neither counted nor logged as traffic."""

    @property
    def path(self) -> str:
        """``/inference.GRPCInferenceService/ModelInfer``: the metric's ``endpoint``."""
        return f"/{self.service}/{self.name}"


def rpcs(servicer: InferenceServicer, extensions: ExtensionServicer) -> list[Rpc]:
    """Every method the server answers."""
    return [
        Rpc(SERVICE, "ServerLive", pb.ServerLiveRequest, servicer.server_live, probe=True),
        Rpc(SERVICE, "ServerReady", pb.ServerReadyRequest, servicer.server_ready, probe=True),
        Rpc(SERVICE, "ModelReady", pb.ModelReadyRequest, servicer.model_ready),
        Rpc(SERVICE, "ServerMetadata", pb.ServerMetadataRequest, servicer.server_metadata),
        Rpc(
            SERVICE,
            "ModelMetadata",
            pb.ModelMetadataRequest,
            servicer.model_metadata,
            authenticated=True,
        ),
        Rpc(SERVICE, "ModelInfer", pb.ModelInferRequest, servicer.model_infer, authenticated=True),
        Rpc(
            SERVICE,
            "ModelConfig",
            ex.ModelConfigRequest,
            extensions.model_config,
            authenticated=True,
        ),
        Rpc(
            SERVICE,
            "ModelStatistics",
            ex.ModelStatisticsRequest,
            extensions.model_statistics,
            authenticated=True,
        ),
        Rpc(
            SERVICE,
            "RepositoryIndex",
            ex.RepositoryIndexRequest,
            extensions.repository_index,
            authenticated=True,
        ),
        Rpc(
            SERVICE,
            "RepositoryModelLoad",
            ex.RepositoryModelLoadRequest,
            extensions.model_load,
            authenticated=True,
        ),
        Rpc(
            SERVICE,
            "RepositoryModelUnload",
            ex.RepositoryModelUnloadRequest,
            extensions.model_unload,
            authenticated=True,
        ),
        Rpc(HEALTH_SERVICE, "Check", HealthCheckRequest, servicer.health_check, probe=True),
    ]


class GrpcServer:
    """The gRPC server of one process, over the app's inference service."""

    def __init__(
        self,
        service: InferenceService,
        settings: Settings,
        recorder: RequestRecorder,
        server_version: str,
    ) -> None:
        self.settings = settings
        self.recorder = recorder
        metrics = recorder.metrics
        self.servicer = InferenceServicer(service, server_version, draining)
        self.extensions = ExtensionServicer(service.registry, metrics)
        self.address = f"{_bracketed(settings.host)}:{settings.grpc_port}"
        self._server: grpc.aio.Server | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._drained_by: float | None = None
        """When the grace period ends, once the process drains (monotonic seconds)."""

    async def start(self) -> None:
        """Bind the port and serve (RuntimeError naming the address when it cannot bind)."""
        client_ms = round(self.settings.client_timeout_s * 1000)
        answer_ms = round(self.settings.request_timeout_s * 1000)
        connections = grpc_connection_cap(self.settings.max_connections)
        server = grpc.aio.server(
            options=[
                # the REST door's bounds: a larger message is RESOURCE_EXHAUSTED before it is read
                ("grpc.max_receive_message_length", self.settings.max_body_bytes),
                ("grpc.max_metadata_size", self.settings.max_header_bytes),
                # the REST door's client timeout: a connection that has not finished its HTTP/2
                # handshake by then is dropped, and one with no call for as long is sent GOAWAY
                # (clients reconnect for their next call): neither holds a socket for ever
                ("grpc.server_handshake_timeout_ms", client_ms),
                ("grpc.max_connection_idle_ms", client_ms),
                # calls in flight on one connection, as HTTP/2 recommends at least (unbounded, a
                # client opened thousands that sent their headers and never a message, ~8 KiB
                # each); and no call outlives its connection's age by more than an answer's time
                ("grpc.max_concurrent_streams", MAX_CALLS_PER_CONNECTION),
                # and connections (unbounded, a flood of idle ones used up the descriptors)
                ("grpc.max_allowed_incoming_connections", connections),
                ("grpc.max_connection_age_ms", MAX_CONNECTION_AGE_S * 1000),
                ("grpc.max_connection_age_grace_ms", client_ms + answer_ms),
                # the workers of one launcher bind the same port, as their REST sockets do, and the
                # kernel spreads the connections; one process alone fails on a port in use, as
                # uvicorn does, rather than silently share it with another server
                ("grpc.so_reuseport", int(self.settings.workers > 1)),
            ]
        )
        handlers: dict[str, dict[str, grpc.RpcMethodHandler[Any, Any]]] = {}
        for rpc in rpcs(self.servicer, self.extensions):
            handlers.setdefault(rpc.service, {})[rpc.name] = grpc.unary_unary_rpc_method_handler(
                self._wrap(rpc),
                request_deserializer=rpc.request.FromString,
                response_serializer=_serialize,
            )
        server.add_generic_rpc_handlers(
            [
                grpc.method_handlers_generic_handler(name, methods)
                for name, methods in handlers.items()
            ]
        )
        try:
            server.add_insecure_port(self.address)
        except RuntimeError as exc:
            raise RuntimeError(
                f"gRPC cannot listen on {self.address} ({exc}); choose another "
                "MODELPORT_GRPC_PORT, or 0 to turn gRPC off"
            ) from None
        await server.start()
        self._server = server
        self._watcher = asyncio.create_task(self._watch_draining())
        logger.info("gRPC (Open Inference Protocol) on %s, process %d", self.address, os.getpid())

    async def stop(self) -> None:
        """Stop serving: the calls in flight may finish within the grace period, counted from
        SIGTERM when the process drains (the REST door drains meanwhile)."""
        if self._server is None:
            return
        grace = self.settings.shutdown_grace_s
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        if self._drained_by is not None:
            grace = max(0.0, self._drained_by - time.monotonic())
        await self._server.stop(grace)  # new calls UNAVAILABLE; then those left are cancelled

    async def _watch_draining(self) -> None:
        """Note when SIGTERM set the draining flag: the grace period runs from then. Until the
        lifespan stops the server, new calls are refused (UNAVAILABLE, with the server's
        message) and probes answer, as on the REST door."""
        # ASYNC110: the flag is a threading.Event that a signal handler sets; nothing to await
        while not draining.is_set():  # noqa: ASYNC110
            await asyncio.sleep(DRAIN_POLL_S)
        self._drained_by = time.monotonic() + self.settings.shutdown_grace_s

    def _wrap(self, rpc: Rpc) -> Callable[[Message, grpc.aio.ServicerContext[Any, Any]], Any]:
        settings, path = self.settings, rpc.path

        async def serve(request: Message, context: grpc.aio.ServicerContext[Any, Any]) -> Message:
            started = time.perf_counter()
            metadata = _metadata(context)
            rid = self.recorder.request_id(metadata.get(REQUEST_ID_HEADER))
            token = request_id.set(rid)
            trailer = ((REQUEST_ID_HEADER, rid),) if rid != NO_ID else ()
            context.set_trailing_metadata(trailer)
            # a call the client cancels (or the grace period cuts off) ends neither way below
            status, code, response = "499", grpc.StatusCode.CANCELLED.name, None
            try:
                if draining.is_set() and not rpc.probe:
                    raise Draining("the server is shutting down; retry on another replica")
                if rpc.authenticated:
                    authorize_api(metadata.get("authorization"), settings)
                response = await rpc.handler(request)
                status, code = "200", grpc.StatusCode.OK.name
                return response
            except Exception as exc:
                refused = refusal(exc, path)
                status, code = str(refused.http_status), refused.code.name
                await context.abort(refused.code, refused.message, trailer)
                raise  # abort raises; this line only satisfies the type checker
            finally:
                if not rpc.probe:
                    self._record(rpc, request, response, status, code, context, started, rid)
                request_id.reset(token)

        return serve

    def _record(
        self,
        rpc: Rpc,
        request: Message,
        response: Message | None,
        status: str,
        code: str,
        context: grpc.aio.ServicerContext[Any, Any],
        started: float,
        rid: str,
    ) -> None:
        """Count the call and log it, as the REST door does a request."""
        named = getattr(request, "model_name", None) or getattr(request, "name", "")
        version = str(getattr(response, "model_version", ""))
        elapsed = time.perf_counter() - started
        self.recorder.record(
            "GRPC",
            rpc.path,
            rpc.path,
            str(named),
            version,
            status,
            elapsed,
            _client(context.peer()),
            rid,
            shown=code,
        )


@contextlib.asynccontextmanager
async def grpc_door(app: FastAPI) -> AsyncIterator[None]:
    """The gRPC server of this process for the app's lifespan: started once the models are
    loaded, stopped (drained) before they stop."""
    server = GrpcServer(
        app.state.inference,
        app.state.settings,
        app.state.recorder,
        app.version,
    )
    await server.start()
    try:
        yield
    finally:
        await server.stop()


def add_grpc_door(app: FastAPI, settings: Settings) -> None:
    """Serve the gRPC door beside the app's REST one, unless MODELPORT_GRPC_PORT is 0."""
    if settings.grpc_port:
        app.state.doors.append(grpc_door)


def _serialize(message: Message) -> bytes:
    return message.SerializeToString()


def _metadata(context: grpc.aio.ServicerContext[Any, Any]) -> dict[str, str]:
    """The call's metadata, text values by lower-case key (binary ``-bin`` ones left out)."""
    return {
        key.lower(): value
        for key, value in context.invocation_metadata() or ()
        if isinstance(value, str)
    }


def _client(peer: str) -> str:
    """``ipv4:127.0.0.1:5555`` -> ``127.0.0.1``; ``ipv6:[::1]:5555`` -> ``::1``."""
    address = peer.partition(":")[2] if peer.startswith(("ipv4:", "ipv6:")) else peer
    return address.rpartition(":")[0].strip("[]") or address or "-"


def _bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host else host
