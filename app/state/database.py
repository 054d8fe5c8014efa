"""The version database: every model's versions, its active and previous pointers and the
history of every management action, in SQLite (the default: one file in the store folder) or
PostgreSQL (``MODELPORT_DATABASE_URL=postgresql://...``).

One implementation of the logic; what the two dialects write differently lives in
:mod:`app.state.dialects`. Every mutation is one transaction that first takes the model's write lock
(SQLite: ``BEGIN IMMEDIATE``, one writer at a time; PostgreSQL: a transaction-scoped advisory
lock per model), then reads the state it decides on, so that two conflicting calls from two
replicas end in one order and neither undoes the other. Versions of several models may hold the
same bytes (one blob): recording such a version and dropping bytes no version holds any more
also take that blob's lock (:meth:`VersionDatabase.drop_unheld`).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from app.errors import ConfigError, StateUnavailable, VersionConflict, VersionNotFound
from app.state.dialects import (
    SQLITE,
    Connection,
    Cursor,
    Dialect,
    connect_postgresql,
    connect_sqlite,
    listen_postgresql,
    postgresql,
)
from app.state.records import VersionRecord

logger = logging.getLogger(__name__)
SQLITE_FILE = "modelport.db"
"""The SQLite database's file name in the store folder."""

MIGRATIONS: Sequence[Sequence[str]] = (
    (
        """CREATE TABLE versions (
            model TEXT NOT NULL, id TEXT NOT NULL, sha256 TEXT NOT NULL, size BIGINT NOT NULL,
            format TEXT NOT NULL, created_at TEXT NOT NULL, filename TEXT, source TEXT NOT NULL,
            report TEXT NOT NULL, PRIMARY KEY (model, id))""",
        """CREATE TABLE pointers (
            model TEXT PRIMARY KEY, active TEXT NOT NULL, previous TEXT)""",
        """CREATE TABLE history (
            seq {identity}, model TEXT NOT NULL, at TEXT NOT NULL, action TEXT NOT NULL,
            from_version TEXT, to_version TEXT, request_id TEXT, client TEXT)""",
        "CREATE INDEX history_by_model ON history (model, seq)",
    ),
    ("CREATE TABLE imports (model TEXT PRIMARY KEY, at TEXT NOT NULL)",),
)
"""The schema, one entry per version: a database at version N runs entries N+1... at startup."""


@dataclass(frozen=True)
class Pointers:
    """Which version of a model serves, and which served before it (the rollback target).
    ``active`` is None only until the first start records the bundled weights as active."""

    active: str | None = None
    previous: str | None = None


@dataclass(frozen=True)
class Actor:
    """Who asked for a management action."""

    request_id: str | None = None
    client: str | None = None


@dataclass(frozen=True)
class HistoryEntry:
    """One recorded management action."""

    seq: int
    at: str
    action: str
    from_version: str | None
    to_version: str | None
    request_id: str | None
    client: str | None


_VERSION_COLUMNS = "id, sha256, size, format, created_at, filename, source, report"
_SELECT_VERSION = f"SELECT {_VERSION_COLUMNS} FROM versions WHERE model = ? AND id = ?"
_SELECT_POINTERS = "SELECT active, previous FROM pointers WHERE model = ?"


class VersionDatabase:
    """The authoritative version state, shared by every process and replica that opens it."""

    def __init__(self, connect: Callable[[], Connection], dialect: Dialect, where: str) -> None:
        self._connect = connect
        self.dialect = dialect
        self.where = where
        """The database, for messages (never credentials)."""
        self._connection: Connection | None = None
        self._lock = threading.Lock()  # one statement sequence at a time on the connection

    @classmethod
    def open(cls, url: str | None, store_dir: Path) -> VersionDatabase:
        """The database at ``url`` (``postgresql://...``; ``sqlite:///path``), else the SQLite
        file in ``store_dir``. Connects lazily: nothing is reached until the first call."""
        if url is None or url.startswith("sqlite:///"):
            path = store_dir / SQLITE_FILE if url is None else Path(url.removeprefix("sqlite:///"))
            return cls(lambda: connect_sqlite(path), SQLITE, str(path))
        if url.startswith(("postgresql://", "postgres://")):
            where = url.split("@")[-1]  # host, port and database: never the password
            return cls(lambda: connect_postgresql(url), postgresql(), f"postgresql://{where}")
        raise ConfigError(
            "MODELPORT_DATABASE_URL must start with postgresql:// (or sqlite:///); "
            f"received {url.split(':', 1)[0]!r}"
        )

    def close(self) -> None:
        """Close the connection (a later call opens another)."""
        with self._lock:
            if self._connection is not None:
                self._connection.close()
                self._connection = None

    # --- schema ---------------------------------------------------------------------------

    def migrate(self) -> int:
        """Bring the schema to the newest version (every replica may call this at startup:
        one migrates, the others find it done); returns that version."""
        with self._transaction(self.dialect.lock_migrations) as run:
            run("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = run("SELECT version FROM schema_version").fetchone()
            current = 0 if row is None else int(row[0])
            for statements in MIGRATIONS[current:]:
                for statement in statements:
                    run(statement.format(identity=self.dialect.identity))
            if row is None:
                run("INSERT INTO schema_version (version) VALUES (?)", len(MIGRATIONS))
            else:
                run("UPDATE schema_version SET version = ?", len(MIGRATIONS))
        return len(MIGRATIONS)

    # --- reads ----------------------------------------------------------------------------

    def versions(self, model: str) -> list[VersionRecord]:
        """Every version of ``model``, oldest first."""
        rows = self._read(
            f"SELECT {_VERSION_COLUMNS} FROM versions WHERE model = ? ORDER BY created_at, id",
            model,
        )
        return [_record(row) for row in rows]

    def version(self, model: str, version: str) -> VersionRecord | None:
        """One version's record, or None."""
        rows = self._read(_SELECT_VERSION, model, version)
        return _record(rows[0]) if rows else None

    def pointers(self, model: str) -> Pointers:
        """The active and previous version as the database says now."""
        rows = self._read(_SELECT_POINTERS, model)
        return Pointers(*rows[0]) if rows else Pointers()

    def history(self, model: str, limit: int = 50, before: int | None = None) -> list[HistoryEntry]:
        """Recorded actions, newest first: at most ``limit``, older than ``before`` (a seq)."""
        rows = self._read(
            "SELECT seq, at, action, from_version, to_version, request_id, client FROM history"
            " WHERE model = ? AND seq < ? ORDER BY seq DESC LIMIT ?",
            model,
            before if before is not None else 2**62,
            limit,
        )
        return [HistoryEntry(*row) for row in rows]

    # --- mutations: one transaction each ---------------------------------------------------

    def add_version(
        self, model: str, record: VersionRecord, actor: Actor, action: str | None = "upload"
    ) -> bool:
        """Record a version, and ``action`` in the history (None: the bundled weights, which
        every replica registers at startup); False when it existed."""
        with self._write(model) as run:
            exists = "SELECT 1 FROM versions WHERE model = ? AND id = ?"
            if run(exists, model, record.id).fetchone():
                return False
            self._lock_blob(run, record.sha256)
            run(
                f"INSERT INTO versions (model, {_VERSION_COLUMNS})"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                model,
                *_columns(record),
            )
            if action is not None:
                _log(run, model, action, None, record.id, actor)
        return True

    def start_with(self, model: str, version: str) -> Pointers:
        """Record ``version`` as active when no version ever was (the bundled weights, at the
        first start), so that the first activation makes it the rollback target; the pointers
        as they are otherwise."""
        with self._write(model) as run:
            current = self._pointers(run, model, None)
            if current.active is not None:
                return current
            self._require(run, model, version)
            insert = "INSERT INTO pointers (model, active, previous) VALUES (?, ?, ?)"
            run(insert, model, version, None)
        return Pointers(version, None)

    def imported(self, model: str) -> bool:
        """Whether the store folder of the releases before this database was imported."""
        return bool(self._read("SELECT 1 FROM imports WHERE model = ?", model))

    def finish_import(self, model: str, pointers: Pointers, actor: Actor) -> bool:
        """Take the imported pointers (unless the database has its own already, or they name
        versions it lacks) and mark the import done; False when it was done before."""
        with self._write(model) as run:
            if run("SELECT 1 FROM imports WHERE model = ?", model).fetchone():
                return False
            rows = run("SELECT id FROM versions WHERE model = ?", model).fetchall()
            known = {row[0] for row in rows}
            if self._pointers(run, model, None).active is None and pointers.active in known:
                previous = pointers.previous if pointers.previous in known else None
                insert = "INSERT INTO pointers (model, active, previous) VALUES (?, ?, ?)"
                run(insert, model, pointers.active, previous)
                _log(run, model, "import", previous, pointers.active, actor)
            at = datetime.now(UTC).isoformat()
            run("INSERT INTO imports (model, at) VALUES (?, ?)", model, at)
        return True

    def activate(
        self, model: str, version: str, actor: Actor, *, expect: Pointers | None = None
    ) -> Pointers:
        """Make ``version`` the active one; the one active until now becomes the previous.
        With ``expect``, refuse (VersionConflict) when the pointers changed since they were
        read (the caller built its runtime for that state)."""
        with self._write(model) as run:
            self._require(run, model, version)
            current = self._pointers(run, model, expect)
            if current.active == version:
                return current
            return self._move(run, model, current, version, "activate", actor)

    def rollback(
        self, model: str, actor: Actor, *, to: str | None = None, expect: Pointers | None = None
    ) -> Pointers:
        """Switch back to the version active before the current one (or to ``to``, any stored
        version); the current one becomes the previous, so a second rollback returns."""
        with self._write(model) as run:
            current = self._pointers(run, model, expect)
            target = to if to is not None else current.previous
            if target is None:
                raise VersionConflict(f"model {model!r} has no previous version to roll back to")
            self._require(run, model, target)
            if target == current.active:
                raise VersionConflict(f"version {target} of {model!r} is already active")
            return self._move(run, model, current, target, "rollback", actor)

    def delete(self, model: str, version: str, actor: Actor) -> VersionRecord:
        """Remove a stored version that is neither active nor previous (nor bundled); its
        bytes go with :meth:`drop_unheld`, once this has committed."""
        with self._write(model) as run:
            record = self._require(run, model, version)
            current = self._pointers(run, model, None)
            if version in (current.active, current.previous):
                role = "active" if version == current.active else "the rollback target"
                raise VersionConflict(
                    f"version {version} of {model!r} is {role}; activate another version first"
                )
            if record.source == "bundled":
                raise VersionConflict("the bundled weights are part of the deployment; not deleted")
            run("DELETE FROM versions WHERE model = ? AND id = ?", model, version)
            _log(run, model, "delete", version, None, actor)
        return record

    def prune(self, model: str, keep: int, actor: Actor) -> list[VersionRecord]:
        """Remove the oldest uploaded versions beyond the newest ``keep`` (never the active or
        the previous one); returns what was removed (their bytes: :meth:`drop_unheld`)."""
        with self._write(model) as run:
            current = self._pointers(run, model, None)
            uploads = [
                _record(row)
                for row in run(
                    f"SELECT {_VERSION_COLUMNS} FROM versions WHERE model = ? AND source <> ?"
                    " ORDER BY created_at, id",
                    model,
                    "bundled",
                ).fetchall()
            ]
            removed = [
                record
                for record in uploads[: max(0, len(uploads) - keep)]
                if record.id not in (current.active, current.previous)
            ]
            for record in removed:
                run("DELETE FROM versions WHERE model = ? AND id = ?", model, record.id)
                _log(run, model, "retention", record.id, None, actor)
        return removed

    def drop_unheld(self, shas: list[str], drop_blob: Callable[[str], None]) -> list[str]:
        """``drop_blob`` each of ``shas`` (the bytes of removed versions) that no version of any
        model holds, each under its blob's lock, which recording a version also takes: a
        version of the same bytes recorded meanwhile (by any replica, for any model) is either
        seen here, and its bytes kept, or committed after the drop, and its uploader, storing
        the bytes again once it has committed, puts them back. Called once the removal has
        committed, so that no reader finds a version whose bytes are gone. Returns the sha256
        of the bytes dropped."""
        dropped = []
        with self._transaction(None) as run:
            for sha256 in sorted(set(shas)):  # one order: two transactions never wait in a cycle
                self._lock_blob(run, sha256)
                if not run("SELECT 1 FROM versions WHERE sha256 = ? LIMIT 1", sha256).fetchone():
                    drop_blob(sha256)
                    dropped.append(sha256)
        return dropped

    def listen(self, on_change: Callable[[str], None]) -> Callable[[], None]:
        """Call ``on_change(model)`` from a thread of its own as soon as any process commits a
        move of a model's pointers (PostgreSQL LISTEN/NOTIFY; ``ANY_MODEL`` after each
        (re)connection, since changes may have been missed). Returns what stops it. SQLite has
        nothing to listen to: its followers poll."""
        stop = threading.Event()
        if self.dialect.notify is not None:
            args = (self._connect, on_change, stop, self.where)
            threading.Thread(
                target=listen_postgresql, args=args, name="version-listener", daemon=True
            ).start()
        return stop.set

    # --- transaction steps -------------------------------------------------------------------

    def _lock_blob(self, run: _Run, sha256: str) -> None:
        if self.dialect.lock_blob is not None:
            run(self.dialect.lock_blob, sha256)

    def _require(self, run: _Run, model: str, version: str) -> VersionRecord:
        row = run(_SELECT_VERSION, model, version).fetchone()
        if row is None:
            raise VersionNotFound(f"model {model!r} has no version {version!r}")
        return _record(row)

    def _pointers(self, run: _Run, model: str, expect: Pointers | None) -> Pointers:
        row = run(_SELECT_POINTERS, model).fetchone()
        current = Pointers(*row) if row else Pointers()
        if expect is not None and current != expect:
            raise VersionConflict(
                f"the versions of {model!r} changed meanwhile (active {current.active}, "
                f"previous {current.previous}); retry"
            )
        return current

    def _move(
        self, run: _Run, model: str, current: Pointers, target: str, action: str, actor: Actor
    ) -> Pointers:
        moved = Pointers(target, current.active)
        if current.active is None:
            run(
                "INSERT INTO pointers (model, active, previous) VALUES (?, ?, ?)",
                model,
                target,
                None,
            )
        else:
            run(
                "UPDATE pointers SET active = ?, previous = ? WHERE model = ?",
                moved.active,
                moved.previous,
                model,
            )
        _log(run, model, action, current.active, target, actor)
        if self.dialect.notify is not None:
            run(self.dialect.notify, model)  # delivered at commit; never if it rolls back
        return moved

    # --- connections and transactions --------------------------------------------------------

    def _read(self, statement: str, *params: Any) -> list[Any]:
        with self._guarded() as connection:
            rows: list[Any] = connection.execute(self.dialect.sql(statement), params).fetchall()
            return rows

    @contextmanager
    def _write(self, model: str) -> Iterator[_Run]:
        with self._transaction(self.dialect.lock_model, model) as run:
            yield run

    @contextmanager
    def _transaction(self, lock: str | None, *lock_params: Any) -> Iterator[_Run]:
        """BEGIN (and the lock), the caller's statements, COMMIT; ROLLBACK on any error."""
        with self._guarded() as connection:

            def run(statement: str, *params: Any) -> Cursor:
                return connection.execute(self.dialect.sql(statement), params)

            connection.execute(self.dialect.begin_write)
            try:
                if lock is not None:
                    connection.execute(lock, lock_params)
                yield run
            except BaseException:
                connection.execute("ROLLBACK")
                raise
            connection.execute("COMMIT")

    @contextmanager
    def _guarded(self) -> Iterator[Connection]:
        """The connection, one caller at a time; a driver error is StateUnavailable (and the
        connection is dropped, so the next call reconnects)."""
        with self._lock:
            try:
                if self._connection is None:
                    self._connection = self._connect()
                yield self._connection
            except self.dialect.errors as exc:
                self._drop()
                first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                raise StateUnavailable(
                    f"the version database ({self.where}) cannot be used: "
                    f"{first_line or type(exc).__name__}"
                ) from None

    def _drop(self) -> None:
        if self._connection is not None:
            with suppress(*self.dialect.errors):  # already broken: dropping it is all there is
                self._connection.close()
            self._connection = None


class _Run(Protocol):
    def __call__(self, statement: str, *params: Any) -> Cursor: ...


def _columns(record: VersionRecord) -> tuple[Any, ...]:
    values = asdict(record)
    values["report"] = json.dumps(values["report"])
    return tuple(values[name] for name in _VERSION_COLUMNS.split(", "))


def _record(row: Sequence[Any]) -> VersionRecord:
    version, sha256, size, file_format, created_at, filename, source, report = row
    return VersionRecord(
        version, sha256, size, file_format, created_at, filename, source, json.loads(report)
    )


def _log(
    run: _Run, model: str, action: str, source: str | None, target: str | None, actor: Actor
) -> None:
    run(
        "INSERT INTO history (model, at, action, from_version, to_version, request_id, client)"
        " VALUES (?, ?, ?, ?, ?, ?, ?)",
        model,
        datetime.now(UTC).isoformat(),
        action,
        source,
        target,
        actor.request_id,
        actor.client,
    )
