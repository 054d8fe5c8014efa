"""ServedModel: one configured model's lifecycle: startup load with fallback, versions,
validated upload, load-validate-flip activation, instant rollback, deletion, retention."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from app.batching import BatchPolicy, DynamicBatcher
from app.catalog import ModelSpec
from app.config import ServedModelConfig
from app.errors import (
    DigestMismatch,
    InsufficientStorage,
    ModelUnavailable,
    StoreCorrupt,
    VersionConflict,
    VersionNotFound,
    WeightsError,
)
from app.metrics import Metrics
from app.runtime import ModelRuntime, build_runtime, check_acceptance, validation_report
from app.store import ActiveRecord, StagedUpload, VersionRecord, WeightStore, version_id
from app.weights import inspect_file

logger = logging.getLogger(__name__)
CPU = torch.device("cpu")


@dataclass(frozen=True)
class UploadOutcome:
    """What an upload became."""

    record: VersionRecord
    created: bool
    active: bool


@dataclass
class ServedModel:
    """One configured model: its registration, device, inference thread and versions."""

    config: ServedModelConfig
    spec: ModelSpec
    device: torch.device
    store: WeightStore
    batching: BatchPolicy
    metrics: Metrics
    kwargs: dict[str, Any] = field(default_factory=dict)
    require_finite: bool = True
    keep_versions: int = 10
    runtime: ModelRuntime | None = None
    """The active runtime; replacing this one reference is the whole swap."""
    previous: ModelRuntime | None = None
    """The runtime that served before, kept loaded so that rollback is instant."""
    error: str | None = None
    fallback: str | None = None
    """Why this replica serves another version than the recorded active one."""
    bundled: VersionRecord | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    torch_threads: int | None = None
    on_demand_cache: int = 2
    _on_demand: list[ModelRuntime] = field(default_factory=list)
    _unfollowable: str | None = None
    batcher: DynamicBatcher = field(init=False)

    def __post_init__(self) -> None:
        self.batcher = DynamicBatcher(
            self.name, self.active, self.batching, self.metrics, self.torch_threads
        )

    @property
    def name(self) -> str:
        """The served name."""
        return self.config.name

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """Per-sample input shape for this model's constructor kwargs."""
        return self.spec.sample_shape(self.kwargs)

    # --- serving -------------------------------------------------------------------------

    def active(self) -> ModelRuntime:
        """The runtime serving now, or ModelUnavailable saying why there is none."""
        runtime = self.runtime
        if runtime is None:
            raise ModelUnavailable(f"model {self.name!r} cannot serve: {self.error}")
        return runtime

    async def predict(self, batch: np.ndarray) -> tuple[ModelRuntime, list[Any]]:
        """Run a checked batch through the batcher on the active version; returns the runtime
        that served it and one JSON-ready output per sample."""
        self.active()  # fail fast, before queueing, when no version can serve
        runtime, outputs = await self.batcher.submit(batch)
        return runtime, outputs

    async def infer(
        self, batch: np.ndarray, version: str | None = None
    ) -> tuple[ModelRuntime, torch.Tensor]:
        """Run a checked batch on the inference thread; returns the runtime that served it and
        the raw output batch on the CPU. ``version`` picks a stored version instead of the
        active one (see :meth:`runtime_for`)."""
        pinned = None if version is None else await self.runtime_for(version)
        if pinned is None:
            self.active()  # fail fast, before queueing, when no version can serve
        runtime, output = await self.batcher.submit(batch, runtime=pinned, postprocess=False)
        return runtime, output

    async def runtime_for(self, version: str) -> ModelRuntime:
        """A runtime serving ``version``: the active or previous one if it is either, else the
        stored version loaded on demand and kept (the last ``on_demand_cache`` of them)."""
        loaded = self.loaded(version)
        if loaded is not None:
            return loaded
        async with self.lock:
            self.record(version)  # VersionNotFound for an unknown id
            runtime = await asyncio.to_thread(self._build, version)
            self._on_demand = [runtime, *self._on_demand][: self.on_demand_cache]
            return runtime

    # --- startup -------------------------------------------------------------------------

    def load(self) -> None:
        """Serve the recorded active version; if it cannot serve, log loudly and fall back to
        the newest valid stored version, then the bundled weights. Never raises."""
        self.store.prepare(self.name)
        try:
            self.bundled = self._bundled_record()
        except WeightsError as exc:
            self.error = f"{self.config.weights.name}: {exc.message}"
        recorded = self._read_active()
        # An unreadable record names nothing: the newest valid stored version comes first.
        wanted = recorded.version if recorded else None if self.fallback else self._bundled_id()
        for candidate in self._startup_candidates(wanted):
            try:
                self.runtime = self._build(candidate)
            except (WeightsError, VersionNotFound) as exc:
                self.error = f"version {candidate}: {exc.message}"
                logger.error("model %s cannot serve %s", self.name, self.error)
                if candidate == wanted and recorded is not None:
                    self.fallback = f"recorded active {self.error}"
                continue
            self.error = None
            break
        if self.runtime is None:
            return
        if self.fallback:
            logger.error(
                "model %s serves version %s INSTEAD OF the recorded active one: %s",
                self.name,
                self.runtime.version,
                self.fallback,
            )
        elif recorded is not None and recorded.previous and recorded.previous != wanted:
            self.previous = self._try_build(recorded.previous)
        logger.info(
            "model %s serving version %s on %s", self.name, self.runtime.version, self.device
        )

    def _read_active(self) -> ActiveRecord | None:
        try:
            return self.store.read_active(self.name)
        except StoreCorrupt as exc:
            self.fallback = exc.message
            logger.error("model %s: %s; falling back", self.name, exc.message)
            return None

    def _bundled_record(self) -> VersionRecord:
        path = self.config.weights
        file = inspect_file(path)
        created = datetime.fromtimestamp(path.stat().st_mtime, UTC).isoformat()
        return VersionRecord(
            version_id(file.sha256),
            file.sha256,
            file.size,
            file.format,
            created,
            path.name,
            "bundled",
        )

    def _bundled_id(self) -> str | None:
        return self.bundled.id if self.bundled else None

    def _startup_candidates(self, wanted: str | None) -> list[str]:
        newest_first = [r.id for r in reversed(self.store.versions(self.name))]
        ordered = [wanted, *newest_first, self._bundled_id()]
        return list(dict.fromkeys(v for v in ordered if v is not None))

    def _try_build(self, version: str) -> ModelRuntime | None:
        try:
            return self._build(version)
        except (WeightsError, VersionNotFound) as exc:
            logger.warning(
                "model %s: previous version %s not loaded: %s", self.name, version, exc.message
            )
            return None

    # --- versions ------------------------------------------------------------------------

    def versions(self) -> list[VersionRecord]:
        """The bundled weights and every stored version, oldest first."""
        stored = self.store.versions(self.name)
        return ([self.bundled] if self.bundled else []) + stored

    def record(self, version: str) -> VersionRecord:
        """The record of one version, or VersionNotFound."""
        if self.bundled is not None and version == self.bundled.id:
            return self.bundled
        record = self.store.get(self.name, version)
        if record is None:
            raise VersionNotFound(f"model {self.name!r} has no version {version!r}")
        return record

    def _build(self, version: str, *, load_device: torch.device | None = None) -> ModelRuntime:
        """A runtime of a known version, its bytes checked against the version's sha256."""
        record = self.record(version)
        bundled = record is self.bundled
        path = self.config.weights if bundled else self.store.weights_path(self.name, version)
        return self._build_file(path, load_device=load_device, expected_sha256=record.sha256)

    def _build_file(
        self,
        path: Path,
        *,
        load_device: torch.device | None = None,
        strict: bool | None = None,
        expected_sha256: str | None = None,
    ) -> ModelRuntime:
        return build_runtime(
            self.spec,
            self.kwargs,
            path,
            self.device,
            strict=self.config.strict if strict is None else strict,
            checkpoint_key=self.config.checkpoint_key,
            require_finite=self.require_finite,
            load_device=load_device,
            expected_sha256=expected_sha256,
        )

    # --- following the shared store ------------------------------------------------------

    async def follow_store(self) -> None:
        """Serve the version the store records as active when another replica changed it:
        loaded and smoke-tested beside the serving one, then the same one-reference swap."""
        if not self._store_moved_on():
            return
        async with self.lock:
            recorded = self._store_moved_on()  # again: it may have moved while we waited
            if recorded is None:
                return
            runtime = self.loaded(recorded.version)
            try:
                if runtime is None:
                    runtime = await asyncio.to_thread(
                        self._build, recorded.version, load_device=CPU
                    )
            except (WeightsError, VersionNotFound) as exc:
                self._unfollowable = recorded.version
                logger.error(
                    "model %s cannot follow the store to version %s: %s",
                    self.name,
                    recorded.version,
                    exc.message,
                )
                return
            current = self.runtime
            keep_current = current is not None and current.version == recorded.previous
            self.previous = current if keep_current else self.loaded(recorded.previous)
            self.runtime = runtime  # the swap: one reference assignment
            self.fallback = self.error = None
            logger.info(
                "model %s follows the store: now serving version %s", self.name, runtime.version
            )

    def _store_moved_on(self) -> ActiveRecord | None:
        """The store's active-version record when it names another version than this replica
        serves (and not one it already failed to load)."""
        try:
            recorded = self.store.read_active(self.name)
        except StoreCorrupt:
            return None  # being replaced or damaged: keep serving, read it next time
        if recorded is None or self._is_active(recorded.version):
            return None
        return None if recorded.version == self._unfollowable else recorded

    def loaded(self, version: str | None) -> ModelRuntime | None:
        """A runtime of ``version`` this process already holds."""
        for runtime in (self.runtime, self.previous, *self._on_demand):
            if runtime is not None and runtime.version == version:
                return runtime
        return None

    # --- management (each holds the model's lock) ----------------------------------------

    async def upload(
        self,
        staged: StagedUpload,
        filename: str | None,
        expected_sha256: list[str],
        activate: bool,
    ) -> UploadOutcome:
        """Validate staged bytes beside the serving version, store them, maybe activate them."""
        async with self.lock:
            try:
                return await self._upload(staged, filename, expected_sha256, activate)
            finally:
                staged.discard()  # a no-op once committed: the bytes were renamed away

    async def _upload(
        self, staged: StagedUpload, filename: str | None, expected: list[str], activate: bool
    ) -> UploadOutcome:
        for digest in expected:
            if digest.lower() != staged.sha256:
                raise DigestMismatch(
                    f"the body's sha256 is {staged.sha256}, not the expected {digest.lower()}"
                )
        version = version_id(staged.sha256)
        existing = self._existing(version)
        if existing is not None:
            if activate:
                await self._activate(version)
            return UploadOutcome(existing, created=False, active=self._is_active(version))
        runtime, report = await asyncio.to_thread(self._validate, staged)
        record = VersionRecord(
            version,
            staged.sha256,
            staged.size,
            runtime.weights.format,
            datetime.now(UTC).isoformat(),
            filename,
            "upload",
            report,
        )
        path = self.store.commit(self.name, staged, record)
        runtime = replace(runtime, weights=replace(runtime.weights, path=path))
        if activate:
            try:
                self._flip(runtime)
            except InsufficientStorage:
                self.store.delete(self.name, version)  # the upload did not happen: no trace
                raise
        self._prune()
        return UploadOutcome(record, created=True, active=activate)

    def _existing(self, version: str) -> VersionRecord | None:
        try:
            return self.record(version)
        except VersionNotFound:
            return None

    def _validate(self, staged: StagedUpload) -> tuple[ModelRuntime, dict[str, Any]]:
        """Uploads are always checked strictly, whatever the startup config allows."""
        runtime = self._build_file(
            staged.path, load_device=CPU, strict=True, expected_sha256=staged.sha256
        )
        acceptance = check_acceptance(runtime)
        return runtime, validation_report(runtime, acceptance)

    async def activate(self, version: str) -> VersionRecord:
        """Make ``version`` serve: built and smoke-tested beside the current one, then flipped."""
        async with self.lock:
            return await self._activate(version)

    async def _activate(self, version: str) -> VersionRecord:
        record = self.record(version)
        if self._is_active(version):
            return record
        previous = self.previous
        if previous is not None and previous.version == version:
            runtime = previous
        else:
            runtime = await asyncio.to_thread(self._build, version, load_device=CPU)
        self._flip(runtime)
        return record

    async def rollback(self) -> VersionRecord:
        """Switch back to the previously active version, which is kept loaded."""
        async with self.lock:
            previous = self.previous
            if previous is None:
                raise VersionConflict(
                    f"model {self.name!r} has no previous version to roll back to"
                )
            self._flip(previous)
            return self.record(previous.version)

    async def delete(self, version: str) -> None:
        """Delete a stored version that is not active."""
        async with self.lock:
            record = self.record(version)
            if self._is_active(version):
                raise VersionConflict(
                    f"version {version} is active; activate another version before deleting it"
                )
            if record.source == "bundled":
                raise VersionConflict("the bundled weights are part of the deployment; not deleted")
            if self.previous is not None and self.previous.version == version:
                self._write_active(self.active(), None)
                self.previous = None
            self.store.delete(self.name, version)

    def _is_active(self, version: str) -> bool:
        return self.runtime is not None and self.runtime.version == version

    def _flip(self, runtime: ModelRuntime) -> None:
        """Record, then switch: in-flight work keeps the runtime it already holds."""
        current = self.runtime
        previous = current if current is not None and current.version != runtime.version else None
        self._write_active(runtime, previous)
        self.previous = previous
        self.runtime = runtime  # the swap: one reference assignment
        self.fallback = None
        self.error = None

    def _write_active(self, runtime: ModelRuntime, previous: ModelRuntime | None) -> None:
        record = ActiveRecord(runtime.version, previous.version if previous is not None else None)
        self.store.write_active(self.name, record)

    def _prune(self) -> None:
        """Keep the newest ``keep_versions`` stored versions (never the active or previous one,
        as this replica or the store's record knows them)."""
        keep = {r.version for r in (self.runtime, self.previous) if r is not None}
        with contextlib.suppress(StoreCorrupt):
            recorded = self.store.read_active(self.name)
            if recorded is not None:
                keep |= {recorded.version, recorded.previous or ""}
        stored = self.store.versions(self.name)
        for record in stored[: max(0, len(stored) - self.keep_versions)]:
            if record.id not in keep:
                logger.info("model %s: retention removes version %s", self.name, record.id)
                self.store.delete(self.name, record.id)
