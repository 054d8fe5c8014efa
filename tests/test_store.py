"""The incoming folder (streaming receive with a cap, cleanup of interrupted uploads) and the
import of a store folder written by the releases before the version database."""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import asdict
from pathlib import Path

import pytest

from app.errors import BadRequest, PayloadTooLarge
from app.state.blobs import FolderBlobStore
from app.state.database import Pointers, VersionDatabase
from app.state.incoming import IncomingFolder, StagedUpload
from app.state.legacy import import_legacy_store
from app.state.records import VersionRecord, version_id

pytestmark = pytest.mark.unit

MODEL = "linear"


async def chunks_of(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


async def failing_after(*parts: bytes) -> AsyncIterator[bytes]:
    """Yields ``parts``, then fails as a dropped client connection would."""
    for part in parts:
        yield part
    raise ConnectionResetError("client went away")


def files_under(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file())


async def stage(incoming: IncomingFolder, data: bytes) -> StagedUpload:
    return await incoming.receive(MODEL, chunks_of(data[:7], data[7:]), limit=1 << 20)


@pytest.fixture
def incoming(tmp_path: Path) -> IncomingFolder:
    return IncomingFolder(tmp_path / "store")


# --- receive -----------------------------------------------------------------------------------


async def test_receive_streams_chunks_to_incoming_with_their_sha256_and_size(
    incoming: IncomingFolder,
) -> None:
    parts = [b"first chunk ", b"", b"second chunk ", bytes(range(256)) * 40]
    data = b"".join(parts)

    staged = await incoming.receive(MODEL, chunks_of(*parts), limit=len(data))

    assert staged.sha256 == hashlib.sha256(data).hexdigest()
    assert staged.size == len(data)
    assert staged.path.parent == incoming.root / MODEL / "incoming"
    assert staged.path.read_bytes() == data
    staged.discard()
    assert files_under(incoming.root) == []


async def test_receive_over_the_limit_raises_payload_too_large_and_leaves_nothing(
    incoming: IncomingFolder,
) -> None:
    with pytest.raises(PayloadTooLarge, match="limit of 10 bytes"):
        await incoming.receive(MODEL, chunks_of(b"123456", b"78901"), limit=10)

    assert files_under(incoming.root) == []


async def test_receive_of_exactly_the_limit_is_accepted(incoming: IncomingFolder) -> None:
    staged = await incoming.receive(MODEL, chunks_of(b"12345", b"67890"), limit=10)

    assert staged.size == 10
    staged.discard()


async def test_failure_in_the_middle_of_the_stream_leaves_nothing_behind(
    incoming: IncomingFolder,
) -> None:
    with pytest.raises(ConnectionResetError):
        await incoming.receive(MODEL, failing_after(b"partial ", b"bytes"), limit=1 << 20)

    assert files_under(incoming.root) == []


# --- cleanup at startup ------------------------------------------------------------------------


async def test_prepare_removes_uploads_whose_process_died(incoming: IncomingFolder) -> None:
    leftover = await stage(incoming, b"an upload interrupted by a crash")
    leftover.release()  # its process died: the lock went with it

    incoming.prepare(MODEL)

    assert not leftover.path.exists()
    assert (incoming.root / MODEL / "incoming").is_dir()


async def test_prepare_leaves_an_upload_another_replica_still_receives(
    incoming: IncomingFolder,
) -> None:
    receiving = await stage(incoming, b"an upload another replica still validates")

    incoming.prepare(MODEL)

    assert receiving.path.exists()
    receiving.discard()


@pytest.mark.parametrize("name", ["../x", "A", "", "..", "a/b", "linear\n", "/abs"])
async def test_invalid_model_name_is_refused_before_touching_any_path(
    incoming: IncomingFolder, name: str
) -> None:
    with pytest.raises(BadRequest, match="invalid model name"):
        incoming.prepare(name)
    with pytest.raises(BadRequest, match="invalid model name"):
        await incoming.receive(name, chunks_of(b"bytes"), limit=100)

    assert not incoming.root.exists()


# --- importing the store folder of the releases before the database ------------------------------


def legacy_version(store: Path, data: bytes, created_at: str) -> VersionRecord:
    """A version as the old store wrote it: <id>.weights and its <id>.json record."""
    digest = hashlib.sha256(data).hexdigest()
    record = VersionRecord(
        version_id(digest), digest, len(data), "torch", created_at, "w.pth", "upload", {"k": 1}
    )
    versions = store / MODEL / "versions"
    versions.mkdir(parents=True, exist_ok=True)
    (versions / f"{record.id}.weights").write_bytes(data)
    (versions / f"{record.id}.json").write_text(json.dumps(asdict(record)))
    return record


@pytest.fixture
def legacy(tmp_path: Path) -> Iterator[tuple[Path, VersionDatabase, FolderBlobStore]]:
    store = tmp_path / "store"
    database = VersionDatabase.open(None, store)
    store.mkdir()
    database.migrate()
    yield store, database, FolderBlobStore(store / "blobs")
    database.close()


def test_an_old_store_is_imported_once_with_its_versions_bytes_and_pointers(
    legacy: tuple[Path, VersionDatabase, FolderBlobStore],
) -> None:
    store, database, blobs = legacy
    one = legacy_version(store, b"version one", "2025-01-01T00:00:00")
    two = legacy_version(store, b"version two", "2025-02-01T00:00:00")
    (store / MODEL / "active.json").write_text(json.dumps({"version": two.id, "previous": one.id}))

    assert import_legacy_store(store, MODEL, database, blobs) == 2
    assert import_legacy_store(store, MODEL, database, blobs) == 0  # once

    assert database.versions(MODEL) == [one, two]
    assert database.pointers(MODEL) == Pointers(two.id, one.id)
    assert blobs.fetch(two.sha256).read_bytes() == b"version two"
    assert [e.action for e in database.history(MODEL)] == ["import", "import", "import"]


def test_a_damaged_old_record_or_file_is_skipped_and_the_rest_imported(
    legacy: tuple[Path, VersionDatabase, FolderBlobStore],
) -> None:
    store, database, blobs = legacy
    good = legacy_version(store, b"good", "2025-01-01T00:00:00")
    changed = legacy_version(store, b"changed later", "2025-02-01T00:00:00")
    (store / MODEL / "versions" / f"{changed.id}.weights").write_bytes(b"other bytes")
    (store / MODEL / "versions" / "0123456789ab.json").write_text("{not json")
    (store / MODEL / "active.json").write_text(json.dumps({"version": changed.id}))

    assert import_legacy_store(store, MODEL, database, blobs) == 1

    assert database.versions(MODEL) == [good]
    assert database.pointers(MODEL) == Pointers()  # it named a version that was not imported


def test_an_import_interrupted_half_way_completes_on_the_next_start(
    legacy: tuple[Path, VersionDatabase, FolderBlobStore],
) -> None:
    store, database, blobs = legacy
    one = legacy_version(store, b"version one", "2025-01-01T00:00:00")
    (store / MODEL / "active.json").write_text(json.dumps({"version": one.id}))
    blobs.put(one.sha256, store / MODEL / "versions" / f"{one.id}.weights")  # then it crashed

    assert import_legacy_store(store, MODEL, database, blobs) == 1

    assert database.pointers(MODEL) == Pointers(one.id, None)
