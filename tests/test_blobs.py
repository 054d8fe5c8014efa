"""The blob store, in a folder and on S3 alike: bytes stored once under their sha256, verified on
every fetch, and storage failures reported as the service's own errors."""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from app.errors import BlobCorrupt, BlobMissing, ConfigError, InsufficientStorage, StateUnavailable
from app.state.blobs import BlobStore, FolderBlobStore, open_blob_store
from app.state.s3 import PART_SIZE, S3BlobStore
from tests.helpers import PeakRss, free_port
from tests.services import S3Server

BUCKET = "modelport-blobs"


@pytest.fixture(scope="module")
def s3(s3: S3Server) -> S3Server:
    """The run's S3 server, with this module's bucket, versioned (to count writes of a key)."""
    client = s3.client()
    client.create_bucket(Bucket=BUCKET)
    client.put_bucket_versioning(Bucket=BUCKET, VersioningConfiguration={"Status": "Enabled"})
    return s3


def use_aws_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, **settings: str) -> None:
    """The standard AWS settings of this test: ``settings`` and nothing from the host."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    for name, value in settings.items():
        monkeypatch.setenv(name, value)


@pytest.fixture(params=["folder", pytest.param("s3", marks=pytest.mark.process)])
def store(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> BlobStore:
    """A blob store as ``open_blob_store`` makes it: a folder, or a fresh prefix on moto."""
    if request.param == "folder":
        return open_blob_store(None, tmp_path / "store")
    server: S3Server = request.getfixturevalue("s3")
    use_aws_settings(monkeypatch, tmp_path, **server.environment())
    return open_blob_store(f"s3://{BUCKET}/{uuid.uuid4().hex}", tmp_path / "store")


def blob_file(path: Path, data: bytes) -> str:
    """Write ``data`` to ``path``; its sha256."""
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def overwrite_blob(store: BlobStore, sha256: str, data: bytes) -> None:
    """Change the stored bytes of blob ``sha256`` behind the store's back."""
    if isinstance(store, FolderBlobStore):
        path = store.root / sha256[:2] / sha256
        path.chmod(0o644)
        path.write_bytes(data)
    else:
        assert isinstance(store, S3BlobStore)
        store.client.put_object(Bucket=store.bucket, Key=store.key(sha256), Body=data)


def writes_of(store: BlobStore, sha256: str) -> object:
    """What tells one write of blob ``sha256`` from another: the file's inode and mtime, or
    the versions of the S3 key."""
    if isinstance(store, FolderBlobStore):
        stat = (store.root / sha256[:2] / sha256).stat()
        return (stat.st_ino, stat.st_mtime_ns)
    assert isinstance(store, S3BlobStore)
    answer = store.client.list_object_versions(Bucket=store.bucket, Prefix=store.key(sha256))
    return [version["VersionId"] for version in answer.get("Versions", [])]


def leftovers(store: BlobStore) -> list[str]:
    """Files, objects and unfinished multipart uploads the store holds."""
    if isinstance(store, FolderBlobStore):
        return [str(path) for path in store.root.rglob("*") if not path.is_dir()]
    assert isinstance(store, S3BlobStore)
    objects = store.client.list_objects_v2(Bucket=store.bucket, Prefix=store.prefix)
    uploads = store.client.list_multipart_uploads(Bucket=store.bucket, Prefix=store.prefix)
    cached = store.cache_dir.iterdir() if store.cache_dir.exists() else []
    return (
        [item["Key"] for item in objects.get("Contents", [])]
        + [f"upload {item.get('Key')}" for item in uploads.get("Uploads", [])]
        + [str(path) for path in cached]
    )


@pytest.mark.parametrize("size", [0, 1 << 20 | 1])
def test_put_then_fetch_gives_the_same_bytes_read_only(
    store: BlobStore, tmp_path: Path, size: int
) -> None:
    data = os.urandom(size)
    sha256 = blob_file(tmp_path / "weights.pth", data)
    assert not store.exists(sha256)

    store.put(sha256, tmp_path / "weights.pth")

    assert store.exists(sha256)
    fetched = store.fetch(sha256)
    assert fetched.read_bytes() == data
    assert fetched.stat().st_mode & 0o222 == 0
    assert store.fetch(sha256).read_bytes() == data


def test_put_of_a_stored_blob_keeps_it_as_it_is(store: BlobStore, tmp_path: Path) -> None:
    sha256 = blob_file(tmp_path / "weights.pth", b"weights")
    store.put(sha256, tmp_path / "weights.pth")
    first = writes_of(store, sha256)

    store.put(sha256, tmp_path / "weights.pth")

    assert writes_of(store, sha256) == first
    assert store.fetch(sha256).read_bytes() == b"weights"


def test_a_blob_whose_bytes_changed_is_refused_on_fetch(store: BlobStore, tmp_path: Path) -> None:
    sha256 = blob_file(tmp_path / "weights.pth", b"weights")
    store.put(sha256, tmp_path / "weights.pth")

    overwrite_blob(store, sha256, b"tampered")

    with pytest.raises(BlobCorrupt, match=sha256):
        store.fetch(sha256)
    if isinstance(store, S3BlobStore):
        assert not (store.cache_dir / sha256).exists()


def test_a_cached_s3_copy_changed_on_disk_is_refused_then_fetched_anew(
    s3: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_aws_settings(monkeypatch, tmp_path, **s3.environment())
    store = open_blob_store(f"s3://{BUCKET}/cache-test", tmp_path / "store")
    sha256 = blob_file(tmp_path / "weights.pth", b"weights")
    store.put(sha256, tmp_path / "weights.pth")
    cached = store.fetch(sha256)

    cached.chmod(0o644)
    cached.write_bytes(b"tampered")

    with pytest.raises(BlobCorrupt, match="cached copy"):
        store.fetch(sha256)
    assert store.fetch(sha256).read_bytes() == b"weights"


def test_a_blob_never_stored_is_missing(store: BlobStore) -> None:
    sha256 = hashlib.sha256(b"never stored").hexdigest()

    assert not store.exists(sha256)
    with pytest.raises(BlobMissing):
        store.fetch(sha256)


def test_delete_removes_the_blob_and_its_local_copy(store: BlobStore, tmp_path: Path) -> None:
    sha256 = blob_file(tmp_path / "weights.pth", b"weights")
    store.put(sha256, tmp_path / "weights.pth")
    fetched = store.fetch(sha256)

    store.delete(sha256)

    assert not store.exists(sha256)
    assert not fetched.exists()
    with pytest.raises(BlobMissing):
        store.fetch(sha256)
    store.delete(sha256)


def test_a_source_that_does_not_hash_to_its_name_is_refused_and_nothing_kept(
    store: BlobStore, tmp_path: Path
) -> None:
    claimed = hashlib.sha256(b"what the caller hashed").hexdigest()
    (tmp_path / "weights.pth").write_bytes(b"what the file holds now")

    with pytest.raises(BlobCorrupt):
        store.put(claimed, tmp_path / "weights.pth")

    assert not store.exists(claimed)
    assert leftovers(store) == []


@pytest.mark.parametrize(
    "name", ["", "abc", "A" * 64, "g" * 64, "a" * 63 + "/", "../" + "a" * 61, "a" * 64 + "\n"]
)
def test_a_blob_name_that_is_not_a_sha256_touches_no_path_or_key(
    store: BlobStore, tmp_path: Path, name: str
) -> None:
    (tmp_path / "weights.pth").write_bytes(b"weights")
    calls: list[Callable[[], object]] = [
        lambda: store.put(name, tmp_path / "weights.pth"),
        lambda: store.exists(name),
        lambda: store.fetch(name),
        lambda: store.delete(name),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="not a sha256"):
            call()
    assert leftovers(store) == []


def test_a_large_s3_put_goes_in_parts_and_is_never_whole_in_memory(
    s3: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_aws_settings(monkeypatch, tmp_path, **s3.environment())
    store = open_blob_store(f"s3://{BUCKET}/large", tmp_path / "store")
    assert isinstance(store, S3BlobStore)
    digest = hashlib.sha256()
    with (tmp_path / "weights.pth").open("wb") as stream:
        for _ in range(5 * PART_SIZE >> 20):
            chunk = os.urandom(1 << 20)
            digest.update(chunk)
            stream.write(chunk)
    sha256 = digest.hexdigest()

    with PeakRss(os.getpid()) as peak:
        store.put(sha256, tmp_path / "weights.pth")
        fetched = store.fetch(sha256)

    etag = store.client.head_object(Bucket=BUCKET, Key=store.key(sha256))["ETag"]
    assert etag.strip('"').endswith("-5")
    assert fetched.stat().st_size == 5 * PART_SIZE
    # Bounded by the part size, not the file's: about two parts' worth at the peak.
    assert peak.growth_mib < 3 * PART_SIZE / (1 << 20)


UNUSABLE_S3 = {
    "unreachable endpoint": lambda server: {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}"},
    "no credentials": lambda server: {"AWS_ENDPOINT_URL": server.url},
    "no such bucket": lambda server: server.environment(),
}


@pytest.mark.parametrize("case", UNUSABLE_S3)
def test_s3_that_cannot_be_used_is_reported_as_storage_errors(
    s3: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    use_aws_settings(monkeypatch, tmp_path, AWS_MAX_ATTEMPTS="1", **UNUSABLE_S3[case](s3))
    bucket = "no-such-bucket" if case == "no such bucket" else BUCKET
    store = open_blob_store(f"s3://{bucket}/x", tmp_path / "store")
    sha256 = blob_file(tmp_path / "weights.pth", b"weights")

    with pytest.raises(InsufficientStorage, match=sha256):
        store.put(sha256, tmp_path / "weights.pth")
    with pytest.raises(StateUnavailable, match=sha256):
        store.fetch(sha256)
    with pytest.raises(StateUnavailable, match=sha256):
        store.delete(sha256)


@pytest.mark.parametrize(
    "url",
    [
        "",
        "/var/lib/blobs",
        "file:///var/lib/blobs",
        "http://bucket/x",
        "s3://",
        "s3:///prefix",
        "s3://Bad_Bucket/x",
        "s3://key:secret@bucket/x",
        "s3://bucket/x?versioning=1",
        "s3://[x",
    ],
)
def test_a_blob_store_url_that_is_not_s3_is_a_config_error(tmp_path: Path, url: str) -> None:
    with pytest.raises(ConfigError, match="s3://bucket/prefix") as caught:
        open_blob_store(url, tmp_path)
    assert "\n" not in caught.value.message


def test_a_folder_on_a_small_disk_refuses_the_put_and_keeps_nothing(
    small_disk: Path, tmp_path: Path
) -> None:
    store = FolderBlobStore(small_disk / "blobs")
    sha256 = blob_file(tmp_path / "weights.pth", os.urandom(2 << 20))

    with pytest.raises(InsufficientStorage, match="No space left"):
        store.put(sha256, tmp_path / "weights.pth")

    assert not store.exists(sha256)
    assert leftovers(store) == []
