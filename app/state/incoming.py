"""The incoming folder where an upload is received (streamed, hashed, capped) before it becomes a
version in the blob store and the database.

Layout under the store directory, per model::

    <model>/incoming/<random>.part   uploads being received (removed at startup: never a version)
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import re
import secrets
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

from app.config import NAME_PATTERN
from app.errors import BadRequest, InsufficientStorage, PayloadTooLarge

logger = logging.getLogger(__name__)

_NAME = re.compile(NAME_PATTERN)


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


def owned_by_a_live_process(path: Path) -> bool:
    """Whether a live process holds the lock on ``path``: the writer of a staged upload or of
    a blob being written holds it until it is done with the file, and it dies with the process."""
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


class IncomingFolder:
    """Each model's ``incoming`` folder under the store directory (shared by replicas)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _model_dir(self, name: str) -> Path:
        if not _NAME.fullmatch(name):
            raise BadRequest(f"invalid model name {name!r}")
        return self.root / name

    def _incoming_dir(self, name: str) -> Path:
        return self._model_dir(name) / "incoming"

    def prepare(self, name: str) -> None:
        """Create the model's folder and drop leftovers of interrupted uploads."""
        incoming = self._incoming_dir(name)
        incoming.mkdir(parents=True, exist_ok=True)
        for leftover in incoming.iterdir():
            if owned_by_a_live_process(leftover):
                continue  # another replica is receiving or validating it
            logger.warning("removing interrupted upload %s of model %s", leftover.name, name)
            leftover.unlink(missing_ok=True)

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
