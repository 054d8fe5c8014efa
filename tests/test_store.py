"""WeightStore on disk: streaming receive with a cap, commit, records, active pointer, cleanup."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from app.errors import BadRequest, PayloadTooLarge, StoreCorrupt
from app.store import (
    ORPHAN_AGE_S,
    ActiveRecord,
    StagedUpload,
    VersionRecord,
    WeightStore,
    check_version_id,
    version_id,
    write_atomically,
)

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


def record_for(staged: StagedUpload, created_at: str, filename: str | None = None) -> VersionRecord:
    return VersionRecord(
        version_id(staged.sha256),
        staged.sha256,
        staged.size,
        "torch",
        created_at,
        filename,
        "upload",
        {"smoke_test": "passed"},
    )


async def stage(store: WeightStore, data: bytes) -> StagedUpload:
    return await store.receive(MODEL, chunks_of(data[:7], data[7:]), limit=1 << 20)


@pytest.fixture
def store(tmp_path: Path) -> WeightStore:
    return WeightStore(tmp_path / "store")


# --- receive -----------------------------------------------------------------------------------


async def test_receive_streams_chunks_to_incoming_with_their_sha256_and_size(
    store: WeightStore,
) -> None:
    parts = [b"first chunk ", b"", b"second chunk ", bytes(range(256)) * 40]
    data = b"".join(parts)

    staged = await store.receive(MODEL, chunks_of(*parts), limit=len(data))

    assert staged.sha256 == hashlib.sha256(data).hexdigest()
    assert staged.size == len(data)
    assert staged.path.parent == store.root / MODEL / "incoming"
    assert staged.path.read_bytes() == data
    staged.discard()
    assert files_under(store.root) == []


async def test_receive_over_the_limit_raises_payload_too_large_and_leaves_nothing(
    store: WeightStore,
) -> None:
    with pytest.raises(PayloadTooLarge, match="limit of 10 bytes"):
        await store.receive(MODEL, chunks_of(b"123456", b"78901"), limit=10)

    assert files_under(store.root) == []
    assert list((store.root / MODEL / "incoming").iterdir()) == []


async def test_receive_of_exactly_the_limit_is_accepted(store: WeightStore) -> None:
    staged = await store.receive(MODEL, chunks_of(b"12345", b"67890"), limit=10)

    assert staged.size == 10


async def test_failure_in_the_middle_of_the_stream_leaves_nothing_behind(
    store: WeightStore,
) -> None:
    with pytest.raises(ConnectionResetError):
        await store.receive(MODEL, failing_after(b"partial ", b"bytes"), limit=1 << 20)

    assert files_under(store.root) == []


# --- commit and versions -----------------------------------------------------------------------


async def test_commit_makes_a_weights_file_and_its_record(store: WeightStore) -> None:
    data = b"weights bytes of version one"
    staged = await stage(store, data)
    record = record_for(staged, "2025-01-01T00:00:00+00:00", "one.pth")

    path = store.commit(MODEL, staged, record)

    versions = store.root / MODEL / "versions"
    assert path == versions / f"{record.id}.weights"
    assert path.read_bytes() == data
    assert json.loads((versions / f"{record.id}.json").read_text())["sha256"] == staged.sha256
    assert not staged.path.exists()
    assert list((store.root / MODEL / "incoming").iterdir()) == []
    assert store.get(MODEL, record.id) == record
    assert store.weights_path(MODEL, record.id) == path


async def test_versions_lists_committed_versions_oldest_first(store: WeightStore) -> None:
    created = [
        "2025-03-01T00:00:00+00:00",
        "2025-01-01T00:00:00+00:00",
        "2025-02-01T00:00:00+00:00",
    ]
    records = []
    for index, created_at in enumerate(created):
        staged = await stage(store, f"version {index}".encode() * 10)
        records.append(record_for(staged, created_at))
        store.commit(MODEL, staged, records[-1])

    listed = store.versions(MODEL)

    assert [r.created_at for r in listed] == sorted(created)
    assert {r.id for r in listed} == {r.id for r in records}


async def test_versions_skip_an_unreadable_record(store: WeightStore) -> None:
    staged = await stage(store, b"good version bytes")
    good = record_for(staged, "2025-01-01T00:00:00+00:00")
    store.commit(MODEL, staged, good)
    (store.root / MODEL / "versions" / "0123456789ab.json").write_text("{not json")

    assert store.versions(MODEL) == [good]
    with pytest.raises(StoreCorrupt):
        store.get(MODEL, "0123456789ab")


async def test_delete_removes_the_record_and_the_weights(store: WeightStore) -> None:
    staged = await stage(store, b"to be deleted")
    record = record_for(staged, "2025-01-01T00:00:00+00:00")
    store.commit(MODEL, staged, record)

    store.delete(MODEL, record.id)

    assert store.get(MODEL, record.id) is None
    assert store.versions(MODEL) == []
    assert files_under(store.root) == []


def test_get_of_an_unknown_version_is_none(store: WeightStore) -> None:
    assert store.get(MODEL, "0123456789ab") is None


# --- the active-version record -----------------------------------------------------------------


@pytest.mark.parametrize("previous", [None, "ba9876543210"])
def test_active_record_round_trips(store: WeightStore, previous: str | None) -> None:
    record = ActiveRecord("0123456789ab", previous)

    store.write_active(MODEL, record)

    assert store.read_active(MODEL) == record


def test_no_active_record_reads_as_none(store: WeightStore) -> None:
    assert store.read_active(MODEL) is None


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        "[]",
        '{"previous": null}',
        '{"version": "../../etc/passwd"}',
        '{"version": "0123456789ab", "previous": "ZZZ"}',
        "",
    ],
    ids=["malformed", "a-list", "no-version", "traversal", "bad-previous", "empty"],
)
def test_corrupt_active_record_raises_store_corrupt(store: WeightStore, content: str) -> None:
    (store.root / MODEL).mkdir(parents=True)
    (store.root / MODEL / "active.json").write_text(content)

    with pytest.raises(StoreCorrupt, match="active-version record"):
        store.read_active(MODEL)


def test_write_active_replaces_the_record_and_leaves_no_temp_files(store: WeightStore) -> None:
    store.write_active(MODEL, ActiveRecord("0123456789ab"))
    store.write_active(MODEL, ActiveRecord("ba9876543210", "0123456789ab"))

    assert store.read_active(MODEL) == ActiveRecord("ba9876543210", "0123456789ab")
    assert [p.name for p in (store.root / MODEL).iterdir()] == ["active.json"]


# --- prepare -----------------------------------------------------------------------------------


async def test_prepare_removes_interrupted_uploads_and_weights_without_a_record(
    store: WeightStore,
) -> None:
    staged = await stage(store, b"a committed version")
    kept = record_for(staged, "2025-01-01T00:00:00+00:00")
    kept_path = store.commit(MODEL, staged, kept)
    leftover = await stage(store, b"an upload interrupted by a crash")
    leftover.release()  # its process died: the lock went with it
    orphan = store.root / MODEL / "versions" / "ba9876543210.weights"
    orphan.write_bytes(b"renamed in, but the record was never written")
    long_ago = time.time() - ORPHAN_AGE_S - 1
    os.utime(orphan, (long_ago, long_ago))

    store.prepare(MODEL)

    assert not leftover.path.exists()
    assert not orphan.exists()
    assert list((store.root / MODEL / "incoming").iterdir()) == []
    assert kept_path.exists()
    assert store.versions(MODEL) == [kept]


async def test_prepare_leaves_a_live_upload_and_a_commit_in_progress_alone(
    store: WeightStore,
) -> None:
    # what another replica sharing the store is doing while this one starts
    receiving = await stage(store, b"an upload another replica still validates")
    committing = store.root / MODEL / "versions" / "ba9876543210.weights"
    committing.parent.mkdir(parents=True)
    committing.write_bytes(b"renamed in a moment ago; its record is being written")

    store.prepare(MODEL)

    assert receiving.path.exists()
    assert committing.exists()
    receiving.discard()


def test_prepare_creates_the_model_folders(store: WeightStore) -> None:
    store.prepare(MODEL)

    assert (store.root / MODEL / "incoming").is_dir()
    assert (store.root / MODEL / "versions").is_dir()


# --- names and version ids never become paths unchecked ----------------------------------------

BAD_NAMES = ["../x", "A", "", "..", "a/b", "linear\n", "/abs"]
BAD_VERSIONS = ["../../etc", "ABC", "0123456789a", "0123456789AB", "0123456789abc", "", "../../..."]
BAD_VERSIONS += ["0123456789ab\n", "012345/789ab"]


def _name_calls(store: WeightStore, name: str) -> list[Callable[[], Any]]:
    return [
        lambda: store.prepare(name),
        lambda: store.get(name, "0123456789ab"),
        lambda: store.weights_path(name, "0123456789ab"),
        lambda: store.versions(name),
        lambda: store.delete(name, "0123456789ab"),
        lambda: store.read_active(name),
        lambda: store.write_active(name, ActiveRecord("0123456789ab")),
    ]


@pytest.mark.parametrize("name", BAD_NAMES)
async def test_invalid_model_name_is_refused_before_touching_any_path(
    store: WeightStore, name: str
) -> None:
    for call in _name_calls(store, name):
        with pytest.raises(BadRequest, match="invalid model name"):
            call()
    with pytest.raises(BadRequest, match="invalid model name"):
        await store.receive(name, chunks_of(b"bytes"), limit=100)

    assert not store.root.exists()


@pytest.mark.parametrize("version", BAD_VERSIONS)
def test_invalid_version_id_is_refused_before_touching_any_path(
    store: WeightStore, version: str
) -> None:
    calls: list[Callable[[], Any]] = [
        lambda: check_version_id(version),
        lambda: store.get(MODEL, version),
        lambda: store.weights_path(MODEL, version),
        lambda: store.delete(MODEL, version),
    ]
    for call in calls:
        with pytest.raises(BadRequest, match="invalid version id"):
            call()

    assert not store.root.exists()


@pytest.mark.parametrize("version", BAD_VERSIONS)
async def test_commit_refuses_an_invalid_version_id_and_keeps_the_staged_bytes_out(
    store: WeightStore, version: str
) -> None:
    staged = await stage(store, b"staged bytes")
    record = VersionRecord(version, staged.sha256, staged.size, "torch", "2025", None, "upload")

    with pytest.raises(BadRequest, match="invalid version id"):
        store.commit(MODEL, staged, record)

    assert files_under(store.root) == [staged.path]


@pytest.mark.parametrize("content", ['{"version": "0123456789ab\\n"}', '{"version": "A"}'])
def test_active_record_holding_an_invalid_version_id_is_corrupt(
    store: WeightStore, content: str
) -> None:
    (store.root / MODEL).mkdir(parents=True)
    (store.root / MODEL / "active.json").write_text(content)

    with pytest.raises(StoreCorrupt):
        store.read_active(MODEL)


# --- atomic writes -----------------------------------------------------------------------------


def test_write_atomically_writes_the_bytes_and_leaves_no_temp_files(tmp_path: Path) -> None:
    target = tmp_path / "record.json"

    write_atomically(target, b"first")
    write_atomically(target, b"second, longer")

    assert target.read_bytes() == b"second, longer"
    assert [p.name for p in tmp_path.iterdir()] == ["record.json"]


def test_write_atomically_that_fails_keeps_the_old_file_and_leaves_no_temp_files(
    tmp_path: Path,
) -> None:
    target = tmp_path / "record.json"
    write_atomically(target, b"old")
    (tmp_path / "blocker").mkdir()

    with pytest.raises(IsADirectoryError):
        write_atomically(tmp_path / "blocker", b"cannot replace a directory")

    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocker", "record.json"]
    assert list((tmp_path / "blocker").iterdir()) == []
