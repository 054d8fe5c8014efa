"""What SQLite and PostgreSQL do differently for the version database: the SQL they write,
how a connection is made, and PostgreSQL's notifications of committed changes."""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, cast

if TYPE_CHECKING:
    pass

logger = logging.getLogger(__name__)
CHANNEL = "modelport_versions"
"""The PostgreSQL notification channel of pointer changes; the payload is the model's name."""
ANY_MODEL = "*"
"""What a listener is told when it (re)connects: it may have missed changes of any model."""
_MIGRATION_LOCK = 7_245_031_907
"""PostgreSQL advisory lock key held while the schema is migrated (any fixed number)."""


class Cursor(Protocol):
    """What both drivers' cursors offer."""

    def fetchone(self) -> Any: ...
    def fetchall(self) -> list[Any]: ...


class Connection(Protocol):
    """What both drivers' connections offer (each in autocommit mode here)."""

    def execute(self, sql: str, params: Sequence[Any] = ..., /) -> Cursor: ...
    def close(self) -> None: ...


@dataclass(frozen=True)
class Dialect:
    """Everything SQLite and PostgreSQL write differently."""

    name: str
    placeholder: str
    identity: str
    """The column type of an auto-numbered primary key."""
    begin_write: str
    """Opens a transaction that will write."""
    lock_model: str | None
    """Takes the model's write lock inside the transaction (None: the transaction holds it)."""
    lock_blob: str | None
    """Takes the lock of one blob (by its sha256) inside the transaction (after the model's,
    where it takes one): recording a version that holds the bytes and dropping the bytes no
    version holds any more take it, so that the two never interleave across models (None: the
    transaction holds it)."""
    lock_migrations: str | None
    notify: str | None
    """Tells the listening replicas, at commit, that a model's pointers moved (None: they poll)."""
    errors: tuple[type[Exception], ...]
    """What the driver raises when the database cannot be reached or used."""

    def sql(self, statement: str) -> str:
        """``statement`` written with ``?`` placeholders, in this dialect."""
        return statement.replace("?", self.placeholder)


SQLITE = Dialect(
    name="sqlite",
    placeholder="?",
    identity="INTEGER PRIMARY KEY AUTOINCREMENT",
    begin_write="BEGIN IMMEDIATE",
    lock_model=None,
    lock_blob=None,
    lock_migrations=None,
    notify=None,
    errors=(sqlite3.Error,),
)


@cache
def postgresql() -> Dialect:
    """PostgreSQL's dialect. psycopg is imported for a PostgreSQL database only: it costs each
    worker process ~9 MiB that SQLite does not need."""
    import psycopg

    return Dialect(
        name="postgresql",
        placeholder="%s",
        identity="BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY",
        begin_write="BEGIN",
        lock_model="SELECT pg_advisory_xact_lock(hashtext(%s))",
        # the two-key form: a key space apart from the models' and the migrations' locks
        lock_blob="SELECT pg_advisory_xact_lock(1, hashtext(%s))",
        lock_migrations=f"SELECT pg_advisory_xact_lock({_MIGRATION_LOCK})",
        notify=f"SELECT pg_notify('{CHANNEL}', %s)",
        errors=(psycopg.Error,),
    )


def connect_sqlite(path: Path) -> Connection:
    """A connection to the SQLite file: autocommit (transactions are explicit), WAL, synchronous
    commits."""
    # autocommit (isolation_level=None): transactions are the explicit BEGIN IMMEDIATE / COMMIT
    connection = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
    connection.execute("PRAGMA journal_mode = WAL")  # readers never wait for the writer
    connection.execute("PRAGMA synchronous = FULL")  # an acknowledged commit survives power loss
    connection.execute("PRAGMA busy_timeout = 30000")
    return connection


def connect_postgresql(url: str) -> Connection:
    """A connection to the PostgreSQL server of ``url``, in autocommit mode."""
    import psycopg

    # psycopg types its queries as literal strings; these are, once formatted with a dialect
    return cast(Connection, psycopg.connect(url, autocommit=True, connect_timeout=5))


def listen_postgresql(
    connect: Callable[[], Connection],
    on_change: Callable[[str], None],
    stop: threading.Event,
    where: str,
) -> None:
    """LISTEN on a connection of its own and pass each notified model to ``on_change`` until
    ``stop`` is set; a lost connection is made again with backoff (then ``ANY_MODEL``)."""
    import psycopg

    backoff = 0.5
    while not stop.is_set():
        try:
            connection = cast(psycopg.Connection[Any], connect())
            with connection:
                connection.execute(f"LISTEN {CHANNEL}")
                on_change(ANY_MODEL)
                backoff = 0.5
                while not stop.is_set():
                    for notice in connection.notifies(timeout=1.0):
                        on_change(notice.payload)
        except psycopg.Error as exc:
            logger.warning("listening to %s failed (%s); again in %.1f s", where, exc, backoff)
            stop.wait(backoff)
            backoff = min(backoff * 2, 10.0)
