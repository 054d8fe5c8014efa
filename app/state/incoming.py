"""The incoming folder where an upload is received (streamed, hashed, capped) before it becomes a
version in the blob store and the database.

Layout under the store directory, per model::

    <model>/incoming/<random>.part   uploads being received (removed at startup: never a version)
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import logging
import os
import re
import secrets
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.config import NAME_PATTERN
from app.errors import BadRequest, InsufficientStorage, PayloadTooLarge

logger = logging.getLogger(__name__)

_NAME = re.compile(NAME_PATTERN)
WRITE_BYTES = 1024 * 1024
"""Bytes of an upload gathered before they go to its writing thread in one batch."""


def lower_this_thread() -> None:
    """Put the calling thread alone in the OS's idle scheduling class (``SCHED_IDLE``): it runs
    on the CPU time no serving thread wants, and gives its core up at once to one that wakes.
    Where that is not permitted, it keeps the serving priority."""
    thread = threading.get_native_id()
    try:
        # On Linux a thread id names that thread alone, not the whole process.
        os.sched_setscheduler(thread, os.SCHED_IDLE, os.sched_param(0))
    except OSError as exc:
        logger.debug("cannot lower the priority of thread %s: %s", thread, exc)


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
        """Stream ``chunks`` to a file in the incoming folder, hashing as it goes. The event loop
        only gathers the chunks; the upload's own thread hashes, writes and syncs them in
        batches of WRITE_BYTES, one batch behind (so at most two batches are held in memory).

        Over ``limit`` bytes raises PayloadTooLarge; on any failure nothing is left behind.
        """
        file = _IncomingFile(self._incoming_dir(name) / f"{secrets.token_hex(8)}.part")
        size = gathered = 0
        batch: list[bytes] = []
        writing: asyncio.Future[None] | None = None
        try:
            await file.run(file.create)
            async for chunk in chunks:
                size += len(chunk)
                if size > limit:
                    raise PayloadTooLarge(f"upload exceeds the limit of {limit} bytes")
                batch.append(chunk)
                gathered += len(chunk)
                if gathered >= WRITE_BYTES:
                    if writing is not None:
                        await writing
                    writing, batch, gathered = file.run(file.write, batch), [], 0
            if writing is not None:
                await writing
            await file.run(file.finish, batch)
        except BaseException:
            if writing is not None:
                with contextlib.suppress(Exception):  # a failed write, if any, told already
                    await writing
            # after every job given to the thread, even when this task was cancelled
            await file.run(file.discard)
            raise
        finally:
            file.close()
        return StagedUpload(file.path, file.digest.hexdigest(), size, file.fd)


class _IncomingFile:
    """One upload's file, created, written, hashed and synced on a thread of its own, in the
    order given: none of it holds up the event loop."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.digest = hashlib.sha256()
        self.fd = -1
        """Written through, and locked (see :class:`StagedUpload`) until discarded."""
        self._thread = ThreadPoolExecutor(
            1,
            thread_name_prefix="upload",
            initializer=lower_this_thread,
        )

    def run(self, job: Callable[..., None], *args: Any) -> asyncio.Future[None]:
        """``job(*args)`` on the file's thread, after every job given before it."""
        return asyncio.wrap_future(self._thread.submit(job, *args))

    def create(self) -> None:
        """Create the file, locked."""
        with _storage_errors("take the upload"):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            fcntl.flock(self.fd, fcntl.LOCK_EX)

    def write(self, chunks: list[bytes]) -> None:
        """Hash and write ``chunks``."""
        with _storage_errors("take the upload"):
            for chunk in chunks:
                self.digest.update(chunk)
                view = memoryview(chunk)
                while view:
                    view = view[os.write(self.fd, view) :]

    def finish(self, chunks: list[bytes]) -> None:
        """Write the last ``chunks``, then sync the file."""
        self.write(chunks)
        with _storage_errors("take the upload"):
            os.fsync(self.fd)

    def discard(self) -> None:
        """Remove the file and release its lock."""
        self.path.unlink(missing_ok=True)
        if self.fd >= 0:
            os.close(self.fd)

    def close(self) -> None:
        """End the thread once its jobs are done (without waiting for them here)."""
        self._thread.shutdown(wait=False)
