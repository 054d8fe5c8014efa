"""The blob store: the bytes of every version stored once under their sha256, never modified, and
verified against it on every fetch; in a local folder (the default) or in S3-compatible storage."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import re
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlsplit

from app.errors import (
    BlobCorrupt,
    BlobMissing,
    ConfigError,
    InsufficientStorage,
    ModelportError,
    StateUnavailable,
)
from app.state.incoming import owned_by_a_live_process

logger = logging.getLogger(__name__)
SHA256_PATTERN = re.compile(r"[0-9a-f]{64}")
"""A blob's name: a sha256 as 64 lowercase hex digits, safe in a path or an object key."""
CHUNK_SIZE = 1 << 20
"""Bytes read at a time when copying or hashing."""
TEMP_PREFIX = ".incoming-"
"""The name of a blob being written, before it is verified and renamed into place."""
_BUCKET_PATTERN = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_NO_LINK = frozenset({errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP})
"""Why a file system refuses a hard link that a copy would make."""


def check_sha256(sha256: str) -> str:
    """``sha256`` when it is 64 lowercase hex digits; ValueError otherwise (a caller's bug)."""
    if not SHA256_PATTERN.fullmatch(sha256):
        raise ValueError(f"not a sha256 hex digest: {sha256[:80]!r}")
    return sha256


class BlobStore(ABC):
    """Immutable blobs named by the sha256 of their bytes. Blocking: call it from a thread.

    Writes that fail raise InsufficientStorage and keep nothing; reads that fail raise
    StateUnavailable. A blob whose bytes do not hash to its name raises BlobCorrupt, an absent
    one BlobMissing.
    """

    @abstractmethod
    def put(self, sha256: str, source: Path, *, hashed: bool = False) -> None:
        """Store the bytes of the local file ``source`` as blob ``sha256``, hashing them on the
        way (BlobCorrupt, nothing kept, when they do not match). A blob already stored is kept
        as it is and ``source`` is not read.

        ``hashed``: the caller hashed these very bytes itself and hands the file over (a staged
        upload, written and locked by this process, removed once stored): they are not hashed
        again, and a folder store takes the file itself (a hard link, made read-only) where
        its file system allows, copying it otherwise."""

    @abstractmethod
    def exists(self, sha256: str) -> bool:
        """Whether blob ``sha256`` is stored (its bytes are not checked)."""

    @abstractmethod
    def fetch(self, sha256: str) -> Path:
        """A local file holding blob ``sha256``, whose bytes this call verified. The file is
        read-only and owned by the store: read it, never move or change it."""

    @property
    @abstractmethod
    def local_dir(self) -> Path:
        """The local folder where this store writes its temporary files."""

    def remove_abandoned(self) -> None:
        """Remove temporary files that a process killed while writing them left behind (a
        file still locked by its live writer, another worker's or replica's, stays)."""
        for leftover in self.local_dir.glob(f"{TEMP_PREFIX}*"):
            if not owned_by_a_live_process(leftover):
                logger.warning("removing %s, left by an interrupted write", leftover)
                leftover.unlink(missing_ok=True)

    @abstractmethod
    def delete(self, sha256: str) -> None:
        """Remove blob ``sha256``; a blob that is not there is fine."""


class FolderBlobStore(BlobStore):
    """Blobs as read-only files ``root/<sha256[:2]>/<sha256>`` in a local folder."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def __repr__(self) -> str:
        return f"FolderBlobStore({str(self.root)!r})"

    @property
    def local_dir(self) -> Path:
        return self.root

    def _path(self, sha256: str) -> Path:
        return self.root / check_sha256(sha256)[:2] / sha256

    def put(self, sha256: str, source: Path, *, hashed: bool = False) -> None:
        path = self._path(sha256)
        if path.is_file():
            return
        with source.open("rb") as stream, storage_errors(InsufficientStorage, "store", sha256):
            if not path.parent.is_dir():
                path.parent.mkdir(parents=True, exist_ok=True)
                _fsync_dir(self.root)
            if hashed and _link(source, path):
                return
            chunks = read_chunks(stream)
            stored = store_verified(chunks, None if hashed else sha256, self.root, path)
        if not stored:
            raise BlobCorrupt(f"{source.name} does not hash to {sha256}; nothing was stored")

    def exists(self, sha256: str) -> bool:
        return self._path(sha256).is_file()

    def fetch(self, sha256: str) -> Path:
        path = self._path(sha256)
        with storage_errors(StateUnavailable, "read", sha256):
            try:
                actual = hash_file(path)
            except FileNotFoundError:
                raise BlobMissing(f"no blob {sha256} in the blob store") from None
        if actual != sha256:
            raise BlobCorrupt(f"blob {sha256} has changed: its bytes hash to {actual}")
        return path

    def delete(self, sha256: str) -> None:
        path = self._path(sha256)
        with storage_errors(StateUnavailable, "delete", sha256):
            path.unlink(missing_ok=True)
            with contextlib.suppress(FileNotFoundError):
                _fsync_dir(path.parent)


def open_blob_store(url: str | None, store_dir: Path) -> BlobStore:
    """The blob store ``url`` names: None is the folder ``store_dir/blobs``; ``s3://bucket/prefix``
    is S3 with the standard AWS settings (endpoint, credentials, region, retries), cached in
    ``store_dir/blob-cache``. Anything else is a ConfigError."""
    if url is None:
        return FolderBlobStore(store_dir / "blobs")
    try:
        parts = urlsplit(url)
        valid = parts.scheme == "s3" and bool(_BUCKET_PATTERN.fullmatch(parts.netloc))
        valid = valid and not (parts.query or parts.fragment)
    except ValueError:  # e.g. an unbalanced "[" in the host part
        valid = False
    if not valid:
        raise ConfigError(
            f"the blob store URL must be s3://bucket/prefix (or unset for a local folder): {url!r}"
        )
    from app.state.s3 import open_s3_store  # boto3: ~9 MiB of every process that needs no S3

    return open_s3_store(url, parts.netloc, parts.path, store_dir / "blob-cache")


@contextlib.contextmanager
def storage_errors(
    error: type[ModelportError],
    action: str,
    sha256: str,
    failures: tuple[type[Exception], ...] = (OSError,),
) -> Iterator[None]:
    """A failure of the storage itself (``failures``: the disk's, or also the network's,
    credentials', S3's) as ``error``."""
    try:
        yield
    except failures as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise error(f"the blob store cannot {action} blob {sha256}: {reason}") from None


def read_chunks(stream: BinaryIO) -> Iterator[bytes]:
    while chunk := stream.read(CHUNK_SIZE):
        yield chunk


def hash_file(path: Path) -> str:
    with path.open("rb") as stream:
        return hashlib.file_digest(stream, "sha256").hexdigest()


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _link(source: Path, target: Path) -> bool:
    """Hard-link ``source`` (made read-only first: it is the blob from then on) as ``target``,
    and fsync its folder; False where the file system cannot (another device, no hard links).
    A ``target`` made meanwhile by another writer of the same bytes is kept."""
    source.chmod(0o444)
    try:
        os.link(source, target)
    except FileExistsError:
        return True
    except OSError as exc:
        if exc.errno in _NO_LINK:
            logger.debug("cannot link %s into the blob store, copying it: %s", source, exc)
            return False
        raise
    _fsync_dir(target.parent)
    return True


def store_verified(
    chunks: Iterable[bytes], sha256: str | None, temp_dir: Path, target: Path
) -> bool:
    """Write ``chunks`` to a temp file in ``temp_dir`` and fsync it; when they hash to ``sha256``
    (None: hashed by the caller, not again), rename it to ``target`` (read-only) and fsync that
    folder. False, and nothing kept, if not."""
    fd, name = tempfile.mkstemp(dir=temp_dir, prefix=TEMP_PREFIX)
    temp = Path(name)
    lock = os.open(temp, os.O_RDONLY)  # held until it is renamed: see remove_abandoned
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as stream:
            for chunk in chunks:
                if sha256 is not None:
                    digest.update(chunk)
                stream.write(chunk)
            stream.flush()
            os.fsync(stream.fileno())
        if sha256 is not None and digest.hexdigest() != sha256:
            return False
        temp.chmod(0o444)
        os.replace(temp, target)
    finally:
        temp.unlink(missing_ok=True)
        os.close(lock)
    _fsync_dir(target.parent)
    return True
