"""ModelRegistry: the served models by name, each with its active runtime and inference thread."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator

import torch

from app.config import ServedModelConfig, Settings
from app.errors import ConfigError, InvalidInput, ModelNotFound, ModelportError, StateUnavailable
from app.observability.metrics import Metrics
from app.serving.batching import BatchPolicy
from app.serving.catalog import ModelSpec
from app.serving.classes import discover_all, spec_for
from app.serving.model import ServedModel
from app.serving.runtime import check_constructor_kwargs
from app.state.versions import VersionState

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

    def __init__(
        self,
        models: list[ServedModel],
        default_model: str | None,
        state: VersionState,
        max_sync_age_s: float = 30.0,
    ) -> None:
        self._models = {m.name: m for m in models}
        self._default = default_model
        self.state = state
        self.max_sync_age_s = max_sync_age_s
        self.following = False
        """Whether this process follows the database (readiness then needs recent reads)."""
        self.started_at = time.monotonic()

    @classmethod
    def from_settings(
        cls, settings: Settings, configs: list[ServedModelConfig], metrics: Metrics
    ) -> ModelRegistry:
        """Check every entry (class, weights file, kwargs, device) without loading weights.

        Raises ConfigError with one line naming the model and the problem.
        """
        discover_all(settings.model_packages)
        state = VersionState.open(settings)
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
                    state,
                    _policy(config, settings),
                    metrics,
                    kwargs=spec.constructor_kwargs(config.kwargs),
                    require_finite=settings.require_finite_weights,
                    torch_threads=threads,
                )
            )
        default = settings.default_model
        if default is not None and default not in {c.name for c in configs}:
            raise ConfigError(f"MODELPORT_DEFAULT_MODEL names {default!r}, which is not served")
        return cls(models, default, state, settings.max_sync_age_s)

    def load_all(self) -> None:
        """Migrate the version database, then load every model's weights; a model that fails
        is kept, unavailable, with its reason. A database that cannot be reached is logged:
        the models serve their bundled weights until it answers."""
        try:
            self.state.db.migrate()
        except StateUnavailable as exc:
            logger.error("%s", exc.message)
        self.state.blobs.remove_abandoned()
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
        """Models that cannot serve now, with the reason; while following the database, also
        those whose last successful read of it is older than ``max_sync_age_s``."""
        found = {m.name: m.error or "not loaded" for m in self if m.runtime is None}
        if self.following:
            now = time.monotonic()
            for model in self:
                age = now - (model.synced_at or self.started_at)
                if model.name not in found and age > self.max_sync_age_s:
                    read = "never" if model.synced_at is None else f"{age:.0f} s ago"
                    found[model.name] = f"the version database was last read {read}"
        return found

    async def follow(self, interval_s: float, on_failure: Callable[[str], None]) -> None:
        """Follow what the version database records as active, each model on its own (one that
        waits for its lock, held by a management call, holds up no other): at once when the
        database notifies a change (PostgreSQL), else every ``interval_s``. A failure is logged
        and counted (``on_failure``) and retried with backoff (up to 8x the interval); it never
        ends the loop."""
        self.following = True
        loop = asyncio.get_running_loop()
        changed = [asyncio.Event() for _ in self]

        def wake() -> None:
            for event in changed:
                event.set()

        def notified(_: str) -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed: nothing left to wake
                loop.call_soon_threadsafe(wake)

        stop_listening = self.state.db.listen(notified)
        try:
            followers = zip(self, changed, strict=True)
            await asyncio.gather(
                *(_follow(m, event, interval_s, on_failure) for m, event in followers)
            )
        finally:
            stop_listening()

    def start(self) -> None:
        """Start every model's inference thread."""
        for model in self:
            model.batcher.start()

    def close(self) -> None:
        """Stop the inference threads after their current batch."""
        for model in self:
            model.batcher.stop()


async def _follow(
    model: ServedModel, changed: asyncio.Event, interval_s: float, on_failure: Callable[[str], None]
) -> None:
    """Follow the version database for ``model`` until cancelled (see ModelRegistry.follow)."""
    failures = 0
    while True:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(changed.wait(), interval_s * 2 ** min(failures, 3))
        changed.clear()
        try:
            await model.follow()
        except Exception as exc:  # never end the follower: retry, readiness tells
            failures += 1
            on_failure(model.name)
            reason = exc.message if isinstance(exc, ModelportError) else repr(exc)
            logger.warning("model %s cannot follow the version database: %s", model.name, reason)
        else:
            failures = 0


def _policy(config: ServedModelConfig, settings: Settings) -> BatchPolicy:
    return BatchPolicy(
        max_batch_size=config.max_batch_size if config.batching else 1,
        max_batch_delay_s=config.max_batch_delay_ms / 1000,
        max_queue=settings.max_queue,
        timeout_s=settings.request_timeout_s,
    )


def _check_entry(config: ServedModelConfig) -> tuple[ModelSpec, torch.device]:
    where = f"model {config.name!r}"
    spec = spec_for(config)
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
