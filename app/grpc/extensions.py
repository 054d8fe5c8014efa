"""Triton's extensions on the gRPC door: ``ModelConfig``, ``ModelStatistics`` and
``RepositoryIndex``, each the content its REST route answers (``/v2/models/{name}/config``,
``/v2/models[/{name}]/stats``, ``/v2/repository/index``) in Triton's messages. The configuration
and the statistics are the dicts the REST routes answer, from the same builders
(:func:`app.codecs.v2.model_config`, :func:`app.observability.statistics.model_statistics`),
made messages by ``json_format``: Triton's JSON is its messages' JSON mapping."""

from __future__ import annotations

import asyncio

from google.protobuf.json_format import ParseDict

from app.grpc.proto import extensions_pb2 as ex
from app.observability.metrics import Metrics
from app.observability.statistics import model_statistics
from app.serving.describe import configuration, load, repository_index, serving, unload
from app.serving.registry import ModelRegistry


class ExtensionServicer:
    """One coroutine per extension RPC, over the model registry and the app's metrics."""

    def __init__(self, registry: ModelRegistry, metrics: Metrics) -> None:
        self.registry = registry
        self.metrics = metrics

    async def model_config(self, request: ex.ModelConfigRequest) -> ex.ModelConfigResponse:
        """As ``GET /v2/models/{name}[/versions/{version}]/config``: the model's tensors and
        batching (the same for every version; NOT_FOUND for an unknown model or version)."""
        model = self.registry.get(request.name)
        if request.version:
            await asyncio.to_thread(model.record, request.version)  # NOT_FOUND when none
        return ex.ModelConfigResponse(config=ParseDict(configuration(model), ex.ModelConfig()))

    async def model_statistics(
        self, request: ex.ModelStatisticsRequest
    ) -> ex.ModelStatisticsResponse:
        """As ``GET /v2/models[/{name}[/versions/{version}]]/stats``: every model (no name),
        one model, or one stored version (NOT_FOUND for an unknown model or version)."""
        if request.version:
            model = self.registry.get(request.name)
            await asyncio.to_thread(model.record, request.version)  # NOT_FOUND when none
            versions, only_given = [(model.name, request.version)], True
        else:
            models = [self.registry.get(request.name)] if request.name else list(self.registry)
            versions, only_given = [serving(model) for model in models], False
        stats = model_statistics(self.metrics, versions, only_given=only_given)
        return ParseDict({"model_stats": stats}, ex.ModelStatisticsResponse())

    async def repository_index(
        self, request: ex.RepositoryIndexRequest
    ) -> ex.RepositoryIndexResponse:
        """As ``POST /v2/repository/index``: every model with the version it serves, READY or
        UNAVAILABLE with the reason; with ``ready``, only those that can serve."""
        entries = repository_index(self.registry, ready_only=request.ready)
        models = [entry.model_dump(exclude_defaults=True) for entry in entries]
        return ParseDict({"models": models}, ex.RepositoryIndexResponse())

    async def model_load(
        self, request: ex.RepositoryModelLoadRequest
    ) -> ex.RepositoryModelLoadResponse:
        """As ``POST /v2/repository/models/{name}/load``: OK when the model serves (loaded
        from the configuration), NOT_FOUND or UNAVAILABLE saying why not."""
        load(self.registry, request.model_name)
        return ex.RepositoryModelLoadResponse()

    async def model_unload(
        self, request: ex.RepositoryModelUnloadRequest
    ) -> ex.RepositoryModelUnloadResponse:
        """As ``POST /v2/repository/models/{name}/unload``: refused (INVALID_ARGUMENT)."""
        unload(self.registry, request.model_name)
