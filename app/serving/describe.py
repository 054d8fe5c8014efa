"""What Triton's extensions of the Open Inference Protocol answer, once for its REST and gRPC
doors: a model's configuration in Triton's shape, the repository index with model load and
unload, and the version each model serves (what the statistics are kept under)."""

from __future__ import annotations

from typing import Any, NoReturn

from app.codecs.v2 import RepositoryEntry, model_config, tensor_metadata
from app.errors import UnloadRefused
from app.serving.model import ServedModel
from app.serving.registry import ModelRegistry


def configuration(model: ServedModel) -> dict[str, Any]:
    """The model's tensors and dynamic batching in Triton's model configuration shape (the
    same for every version)."""
    policy = model.batching
    return model_config(
        model.name,
        tensor_metadata(model.inputs),
        tensor_metadata(model.outputs),
        policy.max_batch_size,
        policy.max_batch_delay_s,
        policy.max_queue,
        policy.timeout_s,
    )


def repository_index(registry: ModelRegistry, *, ready_only: bool) -> list[RepositoryEntry]:
    """Every model with the version it serves, READY or UNAVAILABLE with the reason; with
    ``ready_only``, only those that can serve."""
    entries = []
    for model in registry:
        runtime = model.runtime
        if runtime is not None:
            entries.append(RepositoryEntry(name=model.name, version=runtime.version, state="READY"))
        elif not ready_only:
            reason = model.error or "not loaded"
            entries.append(
                RepositoryEntry(name=model.name, version="", state="UNAVAILABLE", reason=reason)
            )
    return entries


def serving(model: ServedModel) -> tuple[str, str]:
    """The model and the version it serves (``""`` when none)."""
    return model.name, model.runtime.version if model.runtime is not None else ""


def load(registry: ModelRegistry, name: str) -> None:
    """Triton's model load: the models here are loaded from the configuration at startup, so
    this only answers whether ``name`` serves (ModelNotFound, or ModelUnavailable saying why)."""
    registry.get(name).active()


def unload(registry: ModelRegistry, name: str) -> NoReturn:
    """Triton's model unload: refused (UnloadRefused; ModelNotFound for an unknown model)."""
    model = registry.get(name)
    raise UnloadRefused(
        f"model {model.name!r} cannot be unloaded: modelport serves every model its"
        " configuration names while it runs (remove it from the configuration to stop serving it)"
    )
