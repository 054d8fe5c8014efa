"""ModelRegistry: the served models by name, each with its active runtime and inference thread."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Iterator

import torch

from app.batching import BatchPolicy
from app.catalog import ModelSpec, discover, get_spec, registered_names
from app.config import ServedModelConfig, Settings
from app.errors import ConfigError, InvalidInput, ModelNotFound
from app.metrics import Metrics
from app.runtime import check_constructor_kwargs
from app.served import ServedModel
from app.store import WeightStore

logger = logging.getLogger(__name__)


def resolve_device(spec: str) -> torch.device:
    """Turn a config device string into a torch.device available here, or raise ConfigError."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {spec!r} requested but CUDA is not available here")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(
                f"device {spec!r} requested but only {torch.cuda.device_count()} GPU(s) exist"
            )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {spec!r} requested but MPS is not available here")
    return device


class ModelRegistry:
    """All served models by name."""

    def __init__(self, models: list[ServedModel], default_model: str | None) -> None:
        self._models = {m.name: m for m in models}
        self._default = default_model

    @classmethod
    def from_settings(
        cls, settings: Settings, configs: list[ServedModelConfig], metrics: Metrics
    ) -> ModelRegistry:
        """Check every entry (class, weights file, kwargs, device) without loading weights.

        Raises ConfigError with one line naming the model and the problem.
        """
        discover()
        store = _open_store(settings)
        # Default: share the cores between the worker processes, one model thread each.
        threads = settings.torch_threads or max(1, (os.cpu_count() or 1) // settings.workers)
        models = []
        for config in configs:
            spec, device = _check_entry(config)
            models.append(
                ServedModel(
                    config,
                    spec,
                    device,
                    store,
                    _policy(config, settings),
                    metrics,
                    kwargs=spec.constructor_kwargs(config.kwargs),
                    require_finite=settings.require_finite_weights,
                    keep_versions=settings.keep_versions,
                    torch_threads=threads,
                )
            )
        default = settings.default_model
        if default is not None and default not in {c.name for c in configs}:
            raise ConfigError(f"MODELPORT_DEFAULT_MODEL names {default!r}, which is not served")
        return cls(models, default)

    def load_all(self) -> None:
        """Load every model's weights; a model that fails is kept, unavailable, with its reason."""
        for model in self._models.values():
            model.load()

    def __iter__(self) -> Iterator[ServedModel]:
        return iter(self._models.values())

    def get(self, name: str) -> ServedModel:
        """The served model called ``name``, or ModelNotFound."""
        model = self._models.get(name)
        if model is None:
            served = ", ".join(sorted(self._models))
            raise ModelNotFound(f"no model named {name!r}; served models: {served}")
        return model

    def resolve(self, name: str | None) -> ServedModel:
        """``name``, else the default model, else the only model."""
        if name is not None:
            return self.get(name)
        if self._default is not None:
            return self.get(self._default)
        if len(self._models) == 1:
            return next(iter(self._models.values()))
        served = ", ".join(sorted(self._models))
        raise InvalidInput(f"several models are served ({served}); name one in 'model'")

    def active_versions(self) -> list[tuple[str, str, str]]:
        """(model, version, sha256) of every model that serves."""
        return [
            (m.name, m.runtime.version, m.runtime.weights.sha256)
            for m in self
            if m.runtime is not None
        ]

    def unavailable(self) -> dict[str, str]:
        """Models that cannot serve now, with the reason."""
        return {m.name: m.error or "not loaded" for m in self if m.runtime is None}

    async def follow_store(self, interval_s: float) -> None:
        """Every ``interval_s``, follow versions activated by other replicas sharing the store."""
        while True:
            await asyncio.sleep(interval_s)
            for model in self:
                await model.follow_store()

    def start(self) -> None:
        """Start every model's inference thread."""
        for model in self:
            model.batcher.start()

    def close(self) -> None:
        """Stop the inference threads after their current batch."""
        for model in self:
            model.batcher.stop()


def _open_store(settings: Settings) -> WeightStore:
    try:
        settings.store_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            f"MODELPORT_STORE_DIR {str(settings.store_dir)!r}: {exc.strerror}"
        ) from None
    return WeightStore(settings.store_dir)


def _policy(config: ServedModelConfig, settings: Settings) -> BatchPolicy:
    return BatchPolicy(
        max_batch_size=config.max_batch_size if config.batching else 1,
        max_batch_delay_s=config.max_batch_delay_ms / 1000,
        max_queue=settings.max_queue,
        timeout_s=settings.request_timeout_s,
    )


def _check_entry(config: ServedModelConfig) -> tuple[ModelSpec, torch.device]:
    where = f"model {config.name!r}"
    spec = get_spec(config.model_class)
    if spec is None:
        known = ", ".join(registered_names()) or "none"
        raise ConfigError(f"{where}: unknown class {config.model_class!r} (registered: {known})")
    if not config.weights.is_file():
        raise ConfigError(f"{where}: weights file not found: {str(config.weights)!r}")
    problem = check_constructor_kwargs(spec, spec.constructor_kwargs(config.kwargs))
    if problem:
        raise ConfigError(f"{where}: bad kwargs: {problem}")
    try:
        device = resolve_device(config.device)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc.message}") from None
    return spec, device
