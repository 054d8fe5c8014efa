"""Where every model's versions live: the database (the truth: versions, pointers, history), the
blob store (the bytes) and the local folder where uploads are received before they are either."""

from __future__ import annotations

from dataclasses import dataclass

from app.config import Settings
from app.errors import ConfigError
from app.state.blobs import BlobStore, open_blob_store
from app.state.database import VersionDatabase
from app.state.incoming import IncomingFolder


@dataclass(frozen=True)
class VersionState:
    """The database, the blob store and the incoming folder that one process works with."""

    db: VersionDatabase
    blobs: BlobStore
    incoming: IncomingFolder

    @classmethod
    def open(cls, settings: Settings) -> VersionState:
        """Open what the settings name (connections are made on first use); ConfigError with
        one line when the store folder cannot be made or a URL is malformed."""
        store_dir = settings.store_dir
        try:
            store_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"MODELPORT_STORE_DIR {str(store_dir)!r}: {exc.strerror}") from None
        url = settings.database_url.get_secret_value() if settings.database_url else None
        return cls(
            VersionDatabase.open(url, store_dir),
            open_blob_store(settings.blob_url, store_dir),
            IncomingFolder(store_dir),
        )
