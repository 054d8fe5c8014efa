"""Importing a store folder written by the releases before the version database: each model's
version records and weights files into the database and the blob store, and its active-version
record into the pointers. Once per model (the database remembers it), and safe to run again
after a crash half-way; the old files are left where they are."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from app.errors import ModelportError
from app.state.blobs import BlobStore
from app.state.database import Actor, Pointers, VersionDatabase
from app.state.records import VERSION_PATTERN, VersionRecord

logger = logging.getLogger(__name__)
IMPORTER = Actor(request_id=None, client="import")


def import_legacy_store(store_dir: Path, model: str, db: VersionDatabase, blobs: BlobStore) -> int:
    """Import ``store_dir/<model>`` if it holds the old layout and was not imported yet; returns
    how many versions were imported. A version that cannot be read is skipped with an ERROR."""
    folder = store_dir / model
    if not (folder / "versions").is_dir() or db.imported(model):
        return 0
    imported = 0
    for path in sorted((folder / "versions").glob("*.json")):
        record = _read_record(path)
        if record is None:
            continue
        try:
            blobs.put(record.sha256, path.with_suffix(".weights"))
        except (ModelportError, OSError) as exc:
            reason = exc.message if isinstance(exc, ModelportError) else exc.strerror
            logger.error("import of %s: version %s skipped: %s", model, record.id, reason)
            continue
        if db.add_version(model, record, IMPORTER, action="import"):
            imported += 1
            # a delete of the same bytes meanwhile (another model's) may have dropped them
            blobs.put(record.sha256, path.with_suffix(".weights"))
    if db.finish_import(model, _read_pointers(folder / "active.json"), IMPORTER):
        logger.info("model %s: imported %d version(s) from %s", model, imported, folder)
    return imported


def _read_record(path: Path) -> VersionRecord | None:
    try:
        record = VersionRecord(**json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError) as exc:
        logger.error("import: %s is unreadable, skipped: %s", path, exc)
        return None
    if not VERSION_PATTERN.fullmatch(record.id) or record.id != record.sha256[:12]:
        logger.error("import: %s names no valid version, skipped", path)
        return None
    return record


def _read_pointers(path: Path) -> Pointers:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        return Pointers(str(raw["version"]), raw.get("previous"))
    except FileNotFoundError:
        return Pointers()
    except (OSError, ValueError, TypeError, KeyError) as exc:
        logger.error("import: %s is unreadable; the active version is not imported: %s", path, exc)
        return Pointers()
