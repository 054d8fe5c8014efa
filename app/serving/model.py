"""ServedModel: one configured model as this process serves it: the active runtime and the one
kept for rollback, startup with fallback, and following the version database.

The database decides which version is active (:mod:`app.state.database`); this process keeps
runtimes of what it says and swaps its reference when it changes. The management actions that
change it live in :mod:`app.serving.manager`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property, partial
from pathlib import Path
from typing import Any, TypeVar

import torch

from app.codecs.dtypes import TensorSignature
from app.config import ServedModelConfig
from app.errors import (
    InsufficientStorage,
    ModelUnavailable,
    StateUnavailable,
    VersionNotFound,
    WeightsError,
)
from app.observability.metrics import Metrics
from app.serving.batching import BatchPolicy, DynamicBatcher
from app.serving.catalog import ModelSpec
from app.serving.runtime import ModelRuntime, build_runtime
from app.serving.weights import inspect_file
from app.state.database import Actor, Pointers
from app.state.incoming import lower_this_thread
from app.state.legacy import import_legacy_store
from app.state.records import VERSION_PATTERN, VersionRecord, version_id
from app.state.versions import VersionState

logger = logging.getLogger(__name__)
CPU = torch.device("cpu")
RETRY_FAILED_VERSION_S = 30.0
"""How long a replica waits before it tries again to load a version that failed to load."""
_REGISTRAR = Actor(request_id=None, client="startup")
BUILD_TORCH_THREADS = 1
"""Intra-op threads of a runtime built while models serve (an upload's validation, an
activation, a rollback, following the database)."""
T = TypeVar("T")


async def in_background(job: Callable[[], T]) -> T:
    """``job()`` on a thread of its own, with BUILD_TORCH_THREADS torch threads in the OS's idle
    scheduling class: reading, checking and smoke-testing large weights then takes what the
    inference threads leave of the cores, instead of all of them beside those threads."""
    executor = ThreadPoolExecutor(1, thread_name_prefix="build", initializer=_lower_this_thread)
    try:
        return await asyncio.get_running_loop().run_in_executor(executor, job)
    finally:
        executor.shutdown(wait=False)


def _lower_this_thread() -> None:
    torch.set_num_threads(BUILD_TORCH_THREADS)  # per thread: must be set in this one
    lower_this_thread()


@dataclass
class ServedModel:
    """One configured model: its registration, device, inference thread and runtimes."""

    config: ServedModelConfig
    spec: ModelSpec
    device: torch.device
    state: VersionState
    batching: BatchPolicy
    metrics: Metrics
    kwargs: dict[str, Any] = field(default_factory=dict)
    require_finite: bool = True
    runtime: ModelRuntime | None = None
    """The active runtime; replacing this one reference is the whole swap."""
    previous: ModelRuntime | None = None
    """The runtime that served before, kept loaded so that rollback is instant."""
    error: str | None = None
    fallback: str | None = None
    """Why this replica serves another version than the database's active one."""
    bundled: VersionRecord | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    torch_threads: int | None = None
    on_demand_cache: int = 2
    synced_at: float | None = None
    """When this replica last read the database's pointers (monotonic seconds)."""
    _on_demand: list[ModelRuntime] = field(default_factory=list)
    _failed: dict[str, float] = field(default_factory=dict)
    """Versions that failed to load here, and when to try again."""
    batcher: DynamicBatcher = field(init=False)

    def __post_init__(self) -> None:
        self.batcher = DynamicBatcher(
            self.name, self.active, self.batching, self.metrics, self.torch_threads
        )

    @property
    def name(self) -> str:
        """The served name."""
        return self.config.name

    @cached_property
    def inputs(self) -> tuple[TensorSignature, ...]:
        """The inputs for this model's constructor kwargs, in ``forward``'s order."""
        return self.spec.signature(self.kwargs)

    @property
    def outputs(self) -> tuple[TensorSignature, ...]:
        """The outputs as the load-time smoke test saw them (the same class and kwargs for
        every version, so describing them never runs the model); ModelUnavailable when no
        version can serve."""
        return self.active().outputs

    # --- serving -------------------------------------------------------------------------

    def active(self) -> ModelRuntime:
        """The runtime serving now, or ModelUnavailable saying why there is none."""
        runtime = self.runtime
        if runtime is None:
            raise ModelUnavailable(f"model {self.name!r} cannot serve: {self.error}")
        return runtime

    async def runtime_for(self, version: str) -> ModelRuntime:
        """A runtime serving ``version``: the active or previous one if it is either, else the
        stored version loaded on demand and kept (the last ``on_demand_cache`` of them)."""
        loaded = self.loaded(version)
        if loaded is not None:
            return loaded
        async with self.lock:
            record = await asyncio.to_thread(self.record, version)
            runtime = await self.runtime_of(record)
            self._on_demand = [runtime, *self._on_demand][: self.on_demand_cache]
            return runtime

    async def runtime_of(
        self, record: VersionRecord, *, load_device: torch.device | None = None
    ) -> ModelRuntime:
        """The version's runtime: the one held, else built from its blob. A version that
        another replica deleted meanwhile (its blob gone, even while it was being read) is
        VersionNotFound, not weights that fail to load."""
        loaded = self.loaded(record.id)
        if loaded is not None:
            return loaded
        try:
            return await in_background(partial(self.build, record, load_device=load_device))
        except WeightsError:
            await asyncio.to_thread(self.record, record.id)  # VersionNotFound: it was deleted
            raise

    def loaded(self, version: str | None) -> ModelRuntime | None:
        """A runtime of ``version`` this process already holds."""
        for runtime in (self.runtime, self.previous, *self._on_demand):
            if runtime is not None and runtime.version == version:
                return runtime
        return None

    def serves(self, version: str) -> bool:
        """Whether ``version`` is the one this process serves now."""
        return self.runtime is not None and self.runtime.version == version

    def forget(self, version: str) -> None:
        """Drop a loaded runtime of a version that no longer exists (never the active one)."""
        self._on_demand = [r for r in self._on_demand if r.version != version]
        if self.previous is not None and self.previous.version == version:
            self.previous = None

    def serve(self, runtime: ModelRuntime, pointers: Pointers) -> None:
        """Serve ``runtime``, keeping loaded the previous version the database names (if this
        process holds it). In-flight work keeps the runtime it already holds."""
        previous = self.loaded(pointers.previous) if pointers.previous != runtime.version else None
        self.previous = previous
        self.runtime = runtime  # the swap: one reference assignment
        self.fallback = self.error = None

    # --- versions ------------------------------------------------------------------------

    def versions(self) -> list[VersionRecord]:
        """Every version the database has of this model (bundled ones included), oldest first."""
        return self.state.db.versions(self.name)

    def record(self, version: str) -> VersionRecord:
        """The record of one version, as the database has it; VersionNotFound otherwise."""
        well_formed = VERSION_PATTERN.fullmatch(version) is not None
        record = self.state.db.version(self.name, version) if well_formed else None
        if record is None:
            raise VersionNotFound(f"model {self.name!r} has no version {version!r}")
        return record

    def build(
        self, record: VersionRecord, *, load_device: torch.device | None = None
    ) -> ModelRuntime:
        """A runtime of a version: its bytes fetched from the blob store (this deployment's
        bundled file for its own bundled version) and checked against the record's sha256."""
        if self.bundled is not None and record.id == self.bundled.id:
            path, hashed = self.config.weights, False
        else:
            path, hashed = self.state.blobs.fetch(record.sha256), True  # fetch verified it
        return self.build_file(
            path, load_device=load_device, expected_sha256=record.sha256, hashed=hashed
        )

    def build_file(
        self,
        path: Path,
        *,
        load_device: torch.device | None = None,
        strict: bool | None = None,
        expected_sha256: str | None = None,
        hashed: bool = False,
    ) -> ModelRuntime:
        """A runtime of a weights file (upload validation builds its staged file strictly);
        ``hashed``: the caller has just hashed the file to ``expected_sha256``."""
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
            hashed=hashed,
        )

    # --- startup -------------------------------------------------------------------------

    def load(self) -> None:
        """Serve the active version the database records; if it cannot serve, log loudly and
        fall back to the newest loadable stored version, then the bundled weights. Never
        raises: a model with nothing loadable is unavailable, and the others serve."""
        self.state.incoming.prepare(self.name)
        try:
            self.bundled = self._bundled_record()
        except WeightsError as exc:
            self.error = f"{self.config.weights.name}: {exc.message}"
        try:
            pointers, stored = self._register()
        except StateUnavailable as exc:
            pointers, stored = Pointers(), []
            self.fallback = f"{exc.message}; serving the bundled weights until it answers"
            logger.error("model %s: %s", self.name, self.fallback)
        bundled = self.bundled_id()
        wanted = pointers.active or bundled
        records = {r.id: r for r in [*stored, *([self.bundled] if self.bundled else [])]}
        newest_first = [r.id for r in reversed(stored) if r.id != bundled]
        for candidate in dict.fromkeys(v for v in [wanted, *newest_first, bundled] if v):
            try:
                self.runtime = self.build(records[candidate])
            except (WeightsError, KeyError, StateUnavailable) as exc:
                reason = exc.message if not isinstance(exc, KeyError) else "no such version"
                self.error = f"version {candidate}: {reason}"
                logger.error("model %s cannot serve %s", self.name, self.error)
                if candidate == wanted and pointers.active is not None:
                    self.fallback = f"the active {self.error}"
                continue
            self.error = None
            break
        self._report_startup(pointers, records)

    def _register(self) -> tuple[Pointers, list[VersionRecord]]:
        """Import an old store folder (once), register the bundled weights, and read the
        pointers and the stored versions."""
        db, blobs = self.state.db, self.state.blobs
        import_legacy_store(self.state.incoming.root, self.name, db, blobs)
        if self.bundled is None:
            pointers = db.pointers(self.name)
        else:
            db.add_version(self.name, self.bundled, _REGISTRAR, action=None)
            pointers = db.start_with(self.name, self.bundled.id)
            try:
                blobs.put(self.bundled.sha256, self.config.weights)  # for replicas without it
            except (WeightsError, InsufficientStorage) as exc:
                logger.error("model %s: bundled weights not in the blob store: %s", self.name, exc)
        stored = db.versions(self.name)
        self.synced_at = time.monotonic()
        return pointers, stored

    def _report_startup(self, pointers: Pointers, records: dict[str, VersionRecord]) -> None:
        if self.runtime is None:
            return
        if self.fallback:
            logger.error(
                "model %s serves version %s INSTEAD OF the active one: %s",
                self.name,
                self.runtime.version,
                self.fallback,
            )
        elif pointers.previous in records and pointers.previous != self.runtime.version:
            self.previous = self._try_build(records[pointers.previous])
        logger.info(
            "model %s serving version %s on %s", self.name, self.runtime.version, self.device
        )

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

    def bundled_id(self) -> str | None:
        """This deployment's bundled version, if its file could be read."""
        return self.bundled.id if self.bundled else None

    def _try_build(self, record: VersionRecord) -> ModelRuntime | None:
        try:
            return self.build(record)
        except (WeightsError, StateUnavailable) as exc:
            logger.warning(
                "model %s: previous version %s not loaded: %s", self.name, record.id, exc.message
            )
            return None

    # --- following the database ------------------------------------------------------------

    async def follow(self) -> None:
        """Serve what the database records as active when it changed (another replica, or
        another worker, acted): built and smoke-tested beside the serving one, then the same
        one-reference swap. StateUnavailable when the database cannot be read."""
        pointers = await asyncio.to_thread(self.state.db.pointers, self.name)
        self.synced_at = time.monotonic()
        await self._forget_deleted()
        if not self._moved_on(pointers):
            return
        async with self.lock:
            pointers = await asyncio.to_thread(self.state.db.pointers, self.name)
            wanted = pointers.active
            if wanted is None or not self._moved_on(pointers):
                return
            try:
                record = await asyncio.to_thread(self.record, wanted)
                runtime = await self.runtime_of(record, load_device=CPU)
            except (WeightsError, VersionNotFound) as exc:
                self._failed[wanted] = time.monotonic() + RETRY_FAILED_VERSION_S
                self.fallback = f"the active version {wanted}: {exc.message}"
                logger.error("model %s cannot follow the database: %s", self.name, self.fallback)
                return
            self.serve(runtime, pointers)
            logger.info("model %s follows the database: now serving %s", self.name, wanted)

    async def _forget_deleted(self) -> None:
        """Drop the versions loaded on demand that another replica deleted since."""
        for runtime in list(self._on_demand):
            if await asyncio.to_thread(self.state.db.version, self.name, runtime.version) is None:
                self.forget(runtime.version)

    def _moved_on(self, pointers: Pointers) -> bool:
        """Whether the database names another active version than this replica serves (and
        not one that failed to load here a moment ago)."""
        wanted = pointers.active
        if wanted is None or self.serves(wanted):
            return False
        return self._failed.get(wanted, 0.0) <= time.monotonic()
