"""WeightStore: uploaded weight versions on disk, written atomically, and the active-version record.

Layout under the store directory, per model::

    <model>/incoming/<random>.part   uploads being received (removed at startup: never a version)
    <model>/versions/<id>.weights     an accepted version's bytes (immutable)
    <model>/versions/<id>.json        its record; a version exists only once this file does
    <model>/active.json               {"version": ..., "previous": ...}, replaced atomically
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from app.config import NAME_PATTERN
from app.errors import BadRequest, InsufficientStorage, PayloadTooLarge, StoreCorrupt

logger = logging.getLogger(__name__)

VERSION_PATTERN = re.compile(r"^[0-9a-f]{12}$")
ORPHAN_AGE_S = 300
"""A version's bytes without a record are removed at startup only once this old (seconds since
their commit began): younger ones may be another replica's commit in progress."""
_NAME = re.compile(NAME_PATTERN)


def version_id(sha256: str) -> str:
    """A version id is the first 12 hex digits of the sha256 of its bytes."""
    return sha256[:12]


def check_version_id(version: str) -> str:
    """Return ``version`` if it matches the strict id pattern, else BadRequest."""
    if not VERSION_PATTERN.fullmatch(version):
        raise BadRequest(f"invalid version id {version!r}: expected 12 lowercase hex digits")
    return version


@dataclass(frozen=True)
class VersionRecord:
    """One immutable weights version."""

    id: str
    sha256: str
    size: int
    format: str
    created_at: str
    filename: str | None
    source: str  # "upload" or "bundled"
    report: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ActiveRecord:
    """Which version serves, and which served before it (the rollback target)."""

    version: str
    previous: str | None = None


@dataclass
class StagedUpload:
    """A received upload in the store's incoming folder, not yet a version. Its file stays
    locked (``flock``) while this process owns it, so that replicas sharing the store leave it
    alone; the lock dies with the process, so a crash's leftover can be cleaned."""

    path: Path
    sha256: str
    size: int
    lock_fd: int = -1

    def discard(self) -> None:
        """Remove the staged bytes (a no-op once committed) and release the lock."""
        self.path.unlink(missing_ok=True)
        self.release()

    def release(self) -> None:
        """Release the lock on the file."""
        if self.lock_fd >= 0:
            os.close(self.lock_fd)
            self.lock_fd = -1


def _owned_by_a_live_process(path: Path) -> bool:
    """Whether a process still holds the lock a staged upload's owner takes."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return True  # gone already: nothing to clean
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


@contextlib.contextmanager
def _storage_errors(action: str) -> Iterator[None]:
    """A failed write of the store (disk full, quota, read-only) as InsufficientStorage."""
    try:
        yield
    except OSError as exc:
        raise InsufficientStorage(
            f"the weight store cannot {action}: {exc.strerror or exc}; nothing was kept"
        ) from None


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to a temp file beside ``path``, fsync, rename over ``path``, fsync the dir."""
    temp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with temp.open("wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


class WeightStore:
    """Versions of each model's weights under one directory (shared by replicas)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _model_dir(self, name: str) -> Path:
        if not _NAME.fullmatch(name):
            raise BadRequest(f"invalid model name {name!r}")
        return self.root / name

    def _versions_dir(self, name: str) -> Path:
        return self._model_dir(name) / "versions"

    def _incoming_dir(self, name: str) -> Path:
        return self._model_dir(name) / "incoming"

    def prepare(self, name: str) -> None:
        """Create the model's folders and drop leftovers of interrupted uploads."""
        incoming = self._incoming_dir(name)
        incoming.mkdir(parents=True, exist_ok=True)
        self._versions_dir(name).mkdir(parents=True, exist_ok=True)
        for leftover in incoming.iterdir():
            if _owned_by_a_live_process(leftover):
                continue  # another replica is receiving or validating it
            logger.warning("removing interrupted upload %s of model %s", leftover.name, name)
            leftover.unlink(missing_ok=True)
        now = time.time()
        for weights in self._versions_dir(name).glob("*.weights"):
            recent = now - weights.stat().st_mtime < ORPHAN_AGE_S  # a commit may be under way
            if not recent and not weights.with_suffix(".json").exists():
                logger.warning("removing %s of model %s: it has no record", weights.name, name)
                weights.unlink(missing_ok=True)

    async def receive(self, name: str, chunks: AsyncIterator[bytes], limit: int) -> StagedUpload:
        """Stream ``chunks`` to a file in the incoming folder, hashing as it goes.

        Over ``limit`` bytes raises PayloadTooLarge; on any failure nothing is left behind.
        """
        with _storage_errors("take the upload"):
            incoming = self._incoming_dir(name)
            incoming.mkdir(parents=True, exist_ok=True)
            path = incoming / f"{secrets.token_hex(8)}.part"
            lock_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
        digest = hashlib.sha256()
        size = 0
        try:
            with path.open("wb") as stream:
                async for chunk in chunks:
                    size += len(chunk)
                    if size > limit:
                        raise PayloadTooLarge(f"upload exceeds the limit of {limit} bytes")
                    digest.update(chunk)
                    with _storage_errors("take the upload"):
                        stream.write(chunk)
                with _storage_errors("take the upload"):
                    stream.flush()
                    os.fsync(stream.fileno())
        except BaseException:
            path.unlink(missing_ok=True)
            os.close(lock_fd)
            raise
        return StagedUpload(path, digest.hexdigest(), size, lock_fd)

    def commit(self, name: str, staged: StagedUpload, record: VersionRecord) -> Path:
        """Make the staged bytes an immutable version: rename them in, then write the record.
        When the store cannot take the record, the bytes go too (InsufficientStorage)."""
        versions = self._versions_dir(name)
        target = versions / f"{check_version_id(record.id)}.weights"
        with _storage_errors("store the version"):
            versions.mkdir(parents=True, exist_ok=True)
            os.utime(staged.path)  # its age, for prepare(), counts from the commit
            os.replace(staged.path, target)
            staged.release()
            try:
                _fsync_dir(versions)
                write_atomically(target.with_suffix(".json"), json.dumps(asdict(record)).encode())
            except OSError:
                target.unlink(missing_ok=True)
                raise
        return target

    def weights_path(self, name: str, version: str) -> Path:
        """Where a stored version's bytes are."""
        return self._versions_dir(name) / f"{check_version_id(version)}.weights"

    def get(self, name: str, version: str) -> VersionRecord | None:
        """A stored version's record, or None."""
        path = self._versions_dir(name) / f"{check_version_id(version)}.json"
        try:
            return VersionRecord(**json.loads(path.read_text(encoding="utf-8")))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError) as exc:
            raise StoreCorrupt(
                f"record of version {version} of {name!r} is unreadable: {exc}"
            ) from None

    def versions(self, name: str) -> list[VersionRecord]:
        """Every stored version, oldest first; unreadable records are logged and skipped."""
        records = []
        for path in self._versions_dir(name).glob("*.json"):
            try:
                record = self.get(name, path.stem)
            except (StoreCorrupt, BadRequest) as exc:
                logger.error("skipping %s: %s", path, exc)
                continue
            if record is not None:
                records.append(record)
        return sorted(records, key=lambda r: (r.created_at, r.id))

    def delete(self, name: str, version: str) -> None:
        """Remove a stored version: the record first, so it stops existing at once."""
        path = self.weights_path(name, version)
        path.with_suffix(".json").unlink(missing_ok=True)
        path.unlink(missing_ok=True)
        with contextlib.suppress(FileNotFoundError):
            _fsync_dir(path.parent)

    def read_active(self, name: str) -> ActiveRecord | None:
        """The active-version record, None when there is none; StoreCorrupt when unreadable."""
        path = self._model_dir(name) / "active.json"
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            record = ActiveRecord(version=raw["version"], previous=raw.get("previous"))
            check_version_id(record.version)
            if record.previous is not None:
                check_version_id(record.previous)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError, KeyError, BadRequest) as exc:
            raise StoreCorrupt(f"active-version record of {name!r} is unreadable: {exc}") from None
        return record

    def write_active(self, name: str, record: ActiveRecord) -> None:
        """Replace the active-version record atomically."""
        directory = self._model_dir(name)
        with _storage_errors("record the active version"):
            directory.mkdir(parents=True, exist_ok=True)
            write_atomically(directory / "active.json", json.dumps(asdict(record)).encode())
