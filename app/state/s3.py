"""The blob store in S3-compatible storage (boto3, imported only for an ``s3://`` URL): every
version's bytes once under their sha256, sent as a multipart upload, cached locally once
fetched, and verified on every fetch."""

from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from boto3.session import Session
from botocore.exceptions import BotoCoreError, ClientError

from app.errors import BlobCorrupt, BlobMissing, ConfigError, InsufficientStorage, StateUnavailable
from app.state.blobs import (
    CHUNK_SIZE,
    BlobStore,
    check_sha256,
    hash_file,
    storage_errors,
    store_verified,
)

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_s3.type_defs import CompletedPartTypeDef

PART_SIZE = 8 << 20
"""Bytes per part of an S3 multipart upload (S3 needs 5 MiB or more in all parts but the last)."""
# S3 answers a missing key with NoSuchKey (GET) or a bare 404 (HEAD); NoSuchBucket is a
# misconfiguration, not a missing blob, so it is not one of these.
_NOT_FOUND = frozenset({"404", "NoSuchKey", "NotFound"})
_FAILURES = (OSError, BotoCoreError, ClientError)


def open_s3_store(url: str, bucket: str, prefix: str, cache_dir: Path) -> S3BlobStore:
    """The S3 store of ``url`` (bucket and key prefix parsed from it), with the standard AWS
    settings (endpoint, credentials, region, retries); ConfigError without a client."""
    try:
        # A session of its own: boto3's default session is module state shared by every caller.
        client = Session().client("s3")
    except (BotoCoreError, ValueError) as exc:
        raise ConfigError(f"no S3 client for the blob store {url!r}: {exc}") from None
    return S3BlobStore(bucket, prefix, client, cache_dir)


class S3BlobStore(BlobStore):
    """Blobs as objects ``<prefix>/<sha256>`` in an S3 bucket, fetched into a local cache folder
    (``cache_dir/<sha256>``) that is verified again on every fetch."""

    def __init__(self, bucket: str, prefix: str, client: S3Client, cache_dir: Path) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.client = client
        self.cache_dir = cache_dir

    def __repr__(self) -> str:
        return f"S3BlobStore('s3://{self.bucket}/{self.prefix}')"

    @property
    def local_dir(self) -> Path:
        return self.cache_dir

    def key(self, sha256: str) -> str:
        """The object key of blob ``sha256``."""
        check_sha256(sha256)
        return f"{self.prefix}/{sha256}" if self.prefix else sha256

    def put(self, sha256: str, source: Path, *, hashed: bool = False) -> None:
        key = self.key(sha256)
        with storage_errors(InsufficientStorage, "store", sha256, _FAILURES):
            if self._has(key):
                return
        with (
            source.open("rb") as stream,
            storage_errors(InsufficientStorage, "store", sha256, _FAILURES),
        ):
            self._upload(key, None if hashed else sha256, stream)

    def exists(self, sha256: str) -> bool:
        key = self.key(sha256)
        with storage_errors(StateUnavailable, "look up", sha256, _FAILURES):
            return self._has(key)

    def fetch(self, sha256: str) -> Path:
        key = self.key(sha256)
        cached = self.cache_dir / sha256
        with storage_errors(StateUnavailable, "read", sha256, _FAILURES):
            try:
                actual = hash_file(cached)
            except FileNotFoundError:
                self._download(key, sha256, cached)
                return cached
        if actual != sha256:
            # Dropped so that the next fetch downloads a good copy; this one is refused, since
            # a local copy that changes is worth an operator's look.
            cached.unlink(missing_ok=True)
            raise BlobCorrupt(
                f"the cached copy of blob {sha256} has changed (its bytes hash to {actual}); "
                "it was removed"
            )
        return cached

    def delete(self, sha256: str) -> None:
        key = self.key(sha256)
        with storage_errors(StateUnavailable, "delete", sha256, _FAILURES):
            self.client.delete_object(Bucket=self.bucket, Key=key)
            (self.cache_dir / sha256).unlink(missing_ok=True)

    def _has(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in _NOT_FOUND:
                return False
            raise
        return True

    def _upload(self, key: str, sha256: str | None, stream: BinaryIO) -> None:
        """Send ``stream`` as a multipart upload, one part in memory at a time; complete it only
        when the bytes sent hash to ``sha256`` (None: hashed by the caller), and abort it on
        any failure."""
        upload = self.client.create_multipart_upload(Bucket=self.bucket, Key=key)
        upload_id = upload["UploadId"]
        try:
            digest = hashlib.sha256()
            parts: list[CompletedPartTypeDef] = []
            # An upload needs at least one part, so an empty file goes as one empty part.
            while (chunk := stream.read(PART_SIZE)) or not parts:
                if sha256 is not None:
                    digest.update(chunk)
                number = len(parts) + 1
                sent = self.client.upload_part(
                    Bucket=self.bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=chunk
                )
                parts.append({"PartNumber": number, "ETag": sent["ETag"]})
            if sha256 is not None and digest.hexdigest() != sha256:
                raise BlobCorrupt(f"the file does not hash to {sha256}; nothing was stored")
            self.client.complete_multipart_upload(
                Bucket=self.bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}
            )
        except BaseException:
            # Parts of an upload that is neither completed nor aborted are kept (and billed).
            with contextlib.suppress(BotoCoreError, ClientError):
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
            raise

    def _download(self, key: str, sha256: str, cached: Path) -> None:
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=key)["Body"]
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in _NOT_FOUND:
                raise BlobMissing(f"no blob {sha256} in the blob store") from None
            raise
        with contextlib.closing(body):
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            stored = store_verified(body.iter_chunks(CHUNK_SIZE), sha256, self.cache_dir, cached)
        if not stored:
            where = f"s3://{self.bucket}/{key}"
            raise BlobCorrupt(f"blob {sha256} at {where} has changed: its bytes do not hash to it")
