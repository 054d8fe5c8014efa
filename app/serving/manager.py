"""Weight management of one served model: upload, activate, roll back, delete, retention.

Each action builds (or finds loaded) the runtime it needs, then commits one transaction on the
version database, which decides on the state it reads then, not on what this process last saw;
this process serves the outcome at once and the other replicas follow the database.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

from app.errors import (
    BlobMissing,
    DigestMismatch,
    StateUnavailable,
    VersionConflict,
    VersionNotFound,
)
from app.serving.model import CPU, ServedModel, in_background
from app.serving.runtime import ModelRuntime, check_acceptance, validation_report
from app.state.database import Actor, Pointers
from app.state.incoming import StagedUpload
from app.state.records import VersionRecord, version_id

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class UploadOutcome:
    """What an upload became."""

    record: VersionRecord
    created: bool
    active: bool
    pointers: Pointers
    """The model's pointers as the upload left them."""


@dataclass(frozen=True)
class VersionManager:
    """The management actions of one model (each holds the model's lock in this process)."""

    model: ServedModel
    keep_versions: int = 10

    async def upload(
        self,
        staged: StagedUpload,
        filename: str | None,
        expected_sha256: list[str],
        activate: bool,
        actor: Actor,
    ) -> UploadOutcome:
        """Validate staged bytes beside the serving version, store them as a version (blob,
        then its record), and activate them unless told not to."""
        async with self.model.lock:
            try:
                return await self._upload(staged, filename, expected_sha256, activate, actor)
            finally:
                await asyncio.to_thread(staged.discard)

    async def _upload(
        self,
        staged: StagedUpload,
        filename: str | None,
        expected: list[str],
        activate: bool,
        actor: Actor,
    ) -> UploadOutcome:
        for digest in expected:
            if digest.lower() != staged.sha256:
                raise DigestMismatch(
                    f"the body's sha256 is {staged.sha256}, not the expected {digest.lower()}"
                )
        model, db = self.model, self.model.state.db
        version = version_id(staged.sha256)
        existing = await asyncio.to_thread(db.version, model.name, version)
        if existing is not None:
            try:
                return await self._again(existing, staged, activate, actor)
            except (VersionNotFound, BlobMissing) as exc:
                # deleted since it was read (by another replica), or its bytes lost: these are
                # they, so they are stored again as the version
                logger.warning("model %s: version %s stored again: %s", model.name, version, exc)
        runtime, report = await in_background(partial(self._validate, staged))
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
        await in_background(partial(self._store_blob, record, staged))
        created = await asyncio.to_thread(db.add_version, model.name, record, actor)
        # a delete of the same bytes (another replica's, another model's) may have dropped the
        # blob before the record was added: once it is, no drop can (VersionDatabase.drop_unheld)
        await asyncio.to_thread(self._store_blob, record, staged)
        if activate:
            # the staged file is gone once this returns; the blob is named by the sha256
            runtime = replace(runtime, weights=replace(runtime.weights, path=Path(record.sha256)))
            pointers = await asyncio.to_thread(db.activate, model.name, version, actor)
            model.serve(runtime, pointers)
        else:
            pointers = await asyncio.to_thread(db.pointers, model.name)
        await self._prune(actor)
        return UploadOutcome(record, created, activate, pointers)

    async def _again(
        self, existing: VersionRecord, staged: StagedUpload, activate: bool, actor: Actor
    ) -> UploadOutcome:
        """The outcome of an upload of a stored version's bytes: that version, its blob put
        back if the store lost it, activated unless told not to."""
        model = self.model
        await in_background(partial(self._store_blob, existing, staged))
        if activate:
            pointers = await self._activate(existing, actor)
        else:
            pointers = await asyncio.to_thread(model.state.db.pointers, model.name)
        return UploadOutcome(existing, False, model.serves(existing.id), pointers)

    def _validate(self, staged: StagedUpload) -> tuple[ModelRuntime, dict[str, Any]]:
        """Uploads are always checked strictly, whatever the startup config allows."""
        runtime = self.model.build_file(
            staged.path, load_device=CPU, strict=True, expected_sha256=staged.sha256, hashed=True
        )
        acceptance = check_acceptance(runtime)
        return runtime, validation_report(runtime, acceptance)

    async def activate(self, version: str, actor: Actor) -> tuple[VersionRecord, Pointers]:
        """Make ``version`` serve: built and smoke-tested beside the current one, recorded as
        active, then swapped in; returns its record and the pointers it left."""
        async with self.model.lock:
            record = await asyncio.to_thread(self.model.record, version)
            return record, await self._activate(record, actor)

    async def _activate(self, record: VersionRecord, actor: Actor) -> Pointers:
        runtime = await self.model.runtime_of(record, load_device=CPU)
        pointers = await asyncio.to_thread(
            self.model.state.db.activate, self.model.name, record.id, actor
        )
        self.model.serve(runtime, pointers)
        return pointers

    async def rollback(self, actor: Actor, to: str | None = None) -> tuple[VersionRecord, Pointers]:
        """Switch back to the version that was active before the current one, as the database
        records it (or to ``to``); instant when this process holds it loaded. Returns the
        record gone back to and the pointers it left."""
        model, db = self.model, self.model.state.db
        async with model.lock:
            seen = await asyncio.to_thread(db.pointers, model.name)
            target = to or seen.previous
            if target is None:
                raise VersionConflict(
                    f"model {model.name!r} has no previous version to roll back to"
                )
            record = await asyncio.to_thread(model.record, target)
            runtime = await model.runtime_of(record, load_device=CPU)
            pointers = await asyncio.to_thread(db.rollback, model.name, actor, to=to, expect=seen)
            model.serve(runtime, pointers)
            return record, pointers

    async def delete(self, version: str, actor: Actor) -> None:
        """Delete a stored version that the database says is neither active nor previous."""
        model = self.model
        async with model.lock:
            record = await asyncio.to_thread(model.state.db.delete, model.name, version, actor)
            model.forget(version)
            await asyncio.to_thread(self._drop_unheld, [record])

    async def _prune(self, actor: Actor) -> None:
        """Keep the newest ``keep_versions`` uploads (never the active or previous one)."""
        model = self.model
        removed = await asyncio.to_thread(
            model.state.db.prune, model.name, self.keep_versions, actor
        )
        for record in removed:
            logger.info("model %s: retention removes version %s", model.name, record.id)
            model.forget(record.id)
        if removed:
            await asyncio.to_thread(self._drop_unheld, removed)

    def _drop_unheld(self, removed: list[VersionRecord]) -> None:
        """Drop the removed versions' bytes that no other version holds. The removal stands
        whatever happens here: bytes the store could not drop are left (and logged)."""
        state = self.model.state
        try:
            state.db.drop_unheld([record.sha256 for record in removed], state.blobs.delete)
        except StateUnavailable as exc:
            logger.error("model %s: bytes of removed versions left: %s", self.model.name, exc)

    def _store_blob(self, record: VersionRecord, staged: StagedUpload) -> None:
        # Kept as it is when it exists; else the staged file itself where it can be (it was
        # hashed as it was received, and is ours until it is discarded).
        self.model.state.blobs.put(record.sha256, staged.path, hashed=True)
