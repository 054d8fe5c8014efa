"""The version database, on SQLite (a file) and on a real PostgreSQL server started here: the
same behaviour from one implementation, and one consistent order under concurrent writers."""

from __future__ import annotations

import itertools
import queue
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.errors import ConfigError, StateUnavailable, VersionConflict, VersionNotFound
from app.state.database import MIGRATIONS, Actor, HistoryEntry, Pointers, VersionDatabase
from app.state.dialects import ANY_MODEL
from app.state.records import VersionRecord
from tests.services import PostgresServer, postgres_server

ACTOR = Actor("req-1", "127.0.0.1")


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.process)])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A new, empty database of each kind."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'state.db'}"
    server: PostgresServer = request.getfixturevalue("postgres")
    return server.new_database()


@pytest.fixture
def db(url: str, tmp_path: Path) -> Iterator[VersionDatabase]:
    database = VersionDatabase.open(url, tmp_path)
    database.migrate()
    yield database
    database.close()


def record(
    version: str, created_at: str = "2026-12-01T00:00:00", source: str = "upload"
) -> VersionRecord:
    return VersionRecord(
        version, version * 5 + "0" * 4, 10, "torch", created_at, "w.pth", source, {"k": [1]}
    )


def stored(db: VersionDatabase, *versions: str) -> None:
    for index, version in enumerate(versions):
        assert db.add_version("m", record(version, f"2026-12-01T00:00:{index:02d}"), ACTOR)


V1, V2, V3, V4 = "111111111111", "222222222222", "333333333333", "444444444444"


def test_migration_is_idempotent_and_reaches_the_newest_schema(url: str, tmp_path: Path) -> None:
    first, second = VersionDatabase.open(url, tmp_path), VersionDatabase.open(url, tmp_path)
    try:
        assert first.migrate() == len(MIGRATIONS)
        assert second.migrate() == len(MIGRATIONS)  # another replica: finds it done
        stored(second, V1)
        assert first.versions("m") == [record(V1, "2026-12-01T00:00:00")]
    finally:
        first.close()
        second.close()


def test_a_version_is_recorded_once_with_its_history(db: VersionDatabase) -> None:
    stored(db, V1)
    assert not db.add_version("m", record(V1), ACTOR)  # the same bytes again
    assert db.version("m", V1) == record(V1, "2026-12-01T00:00:00")
    assert db.version("m", V2) is None
    assert db.versions("other") == []
    [entry] = db.history("m")
    assert (entry.action, entry.from_version, entry.to_version) == ("upload", None, V1)
    assert (entry.request_id, entry.client) == ("req-1", "127.0.0.1")


def test_activation_moves_the_active_version_to_previous(db: VersionDatabase) -> None:
    stored(db, V1, V2)
    assert db.pointers("m") == Pointers(None, None)
    assert db.activate("m", V1, ACTOR) == Pointers(V1, None)
    assert db.activate("m", V2, ACTOR) == Pointers(V2, V1)
    assert db.activate("m", V2, ACTOR) == Pointers(V2, V1)  # already active: nothing recorded
    assert db.pointers("m") == Pointers(V2, V1)
    assert [e.action for e in db.history("m")] == ["activate", "activate", "upload", "upload"]
    with pytest.raises(VersionNotFound):
        db.activate("m", V3, ACTOR)


def test_rollback_returns_to_the_version_active_before_and_back_again(db: VersionDatabase) -> None:
    stored(db, V1, V2, V3)
    with pytest.raises(VersionConflict, match="no previous version"):
        db.rollback("m", ACTOR)
    db.activate("m", V1, ACTOR)
    db.activate("m", V2, ACTOR)
    db.activate("m", V3, ACTOR)
    assert db.rollback("m", ACTOR) == Pointers(V2, V3)
    assert db.rollback("m", ACTOR) == Pointers(V3, V2)
    assert db.rollback("m", ACTOR, to=V1) == Pointers(V1, V3)  # further back, explicitly
    with pytest.raises(VersionConflict, match="already active"):
        db.rollback("m", ACTOR, to=V1)
    with pytest.raises(VersionNotFound):
        db.rollback("m", ACTOR, to=V4)
    latest = db.history("m", limit=1)[0]
    assert (latest.action, latest.from_version, latest.to_version) == ("rollback", V3, V1)


def test_a_change_decided_on_stale_pointers_is_refused(db: VersionDatabase) -> None:
    stored(db, V1, V2, V3)
    db.activate("m", V1, ACTOR)
    seen = db.activate("m", V2, ACTOR)
    db.activate("m", V3, ACTOR)  # another replica, meanwhile
    with pytest.raises(VersionConflict, match="changed meanwhile"):
        db.rollback("m", ACTOR, expect=seen)
    assert db.pointers("m") == Pointers(V3, V2)


def test_the_active_previous_and_bundled_versions_cannot_be_deleted(db: VersionDatabase) -> None:
    stored(db, V1, V2, V3)
    assert db.add_version("m", record(V4, source="bundled"), ACTOR)
    db.activate("m", V1, ACTOR)
    db.activate("m", V2, ACTOR)
    for version, reason in [(V2, "is active"), (V1, "rollback target"), (V4, "bundled")]:
        with pytest.raises(VersionConflict, match=reason):
            db.delete("m", version, ACTOR)
    assert db.delete("m", V3, ACTOR).id == V3
    with pytest.raises(VersionNotFound):
        db.delete("m", V3, ACTOR)
    assert sorted(r.id for r in db.versions("m")) == [V1, V2, V4]
    assert (db.history("m")[0].action, db.history("m")[0].from_version) == ("delete", V3)


def test_retention_keeps_the_newest_and_never_the_active_previous_or_bundled(
    db: VersionDatabase,
) -> None:
    stored(db, V1, V2, V3, V4)
    db.add_version("m", record("555555555555", "2026-11-01T00:00:00", "bundled"), ACTOR)
    db.activate("m", V2, ACTOR)
    db.activate("m", V1, ACTOR)  # the oldest two are active and previous
    removed = db.prune("m", keep=1, actor=ACTOR)
    assert [r.id for r in removed] == [V3]
    assert sorted(r.id for r in db.versions("m")) == sorted([V1, V2, V4, "555555555555"])
    assert db.history("m")[0].action == "retention"


def test_bytes_another_version_holds_are_kept_and_dropped_with_the_last(
    db: VersionDatabase,
) -> None:
    """Two models' versions of the same bytes (one blob): removing one keeps the bytes,
    removing the last drops them, once."""
    stored(db, V1, V2, V3)
    db.activate("m", V1, ACTOR)
    same = record(V3)
    assert db.add_version("n", same, ACTOR)
    dropped: list[str] = []
    removed = db.delete("m", V3, ACTOR)
    assert db.drop_unheld([removed.sha256], dropped.append) == []
    assert db.add_version("n", record(V4), ACTOR)
    db.activate("n", V4, ACTOR)
    shas = [r.sha256 for r in db.prune("n", keep=0, actor=ACTOR)]
    assert shas == [same.sha256]
    assert db.drop_unheld(shas * 2 + [record(V2).sha256], dropped.append) == [same.sha256]
    assert dropped == [same.sha256]


def test_a_version_of_bytes_being_dropped_is_recorded_after_the_drop(
    url: str, tmp_path: Path
) -> None:
    """Replica A drops the bytes of the last version that held them while replica B records a
    version of the same bytes for another model (so under another model's lock). B cannot
    commit between A's finding the bytes unheld and A's dropping them: it waits for A's
    transaction, then commits; an uploader stores its bytes again once it has committed, and
    puts them back. Without the wait, B's version would be recorded while A drops its bytes."""
    a, b = VersionDatabase.open(url, tmp_path), VersionDatabase.open(url, tmp_path)
    a.migrate()
    stored(a, V1, V2)
    a.activate("m", V1, ACTOR)
    same = record(V2)
    added: queue.Queue[bool] = queue.Queue()
    held_while_dropping: list[bool] = []

    def drop_while_b_records(sha256: str) -> None:
        assert sha256 == same.sha256
        threading.Thread(target=lambda: added.put(b.add_version("n", same, ACTOR))).start()
        try:
            added.put(added.get(timeout=1.0))  # B committed while A's transaction is open
            held_while_dropping.append(False)
        except queue.Empty:
            held_while_dropping.append(True)

    try:
        a.delete("m", V2, ACTOR)
        assert a.drop_unheld([same.sha256], drop_while_b_records) == [same.sha256]
        assert added.get(timeout=30) is True
        assert held_while_dropping == [True]
        assert [r.id for r in b.versions("n")] == [V2]
    finally:
        a.close()
        b.close()


def test_history_is_newest_first_and_paginated(db: VersionDatabase) -> None:
    stored(db, V1, V2)
    for _ in range(3):
        db.activate("m", V1, ACTOR)
        db.activate("m", V2, ACTOR)
    everything = db.history("m", limit=100)
    assert len(everything) == 8
    assert [e.seq for e in everything] == sorted((e.seq for e in everything), reverse=True)
    pages: list[HistoryEntry] = []
    before = None
    while page := db.history("m", limit=3, before=before):
        pages += page
        before = page[-1].seq
    assert pages == everything


def test_concurrent_writers_on_separate_connections_end_in_one_order(
    url: str, tmp_path: Path
) -> None:
    """Three "replicas" (each its own connection) activate, roll back, upload and delete at
    random: every recorded move starts where the one before it ended, the pointers are where
    the last move left them, no acknowledged upload is lost but to an acknowledged delete, and
    the bytes of exactly the deleted versions are dropped."""
    versions = [f"{i:012d}" for i in range(1, 6)]
    setup = VersionDatabase.open(url, tmp_path)
    setup.migrate()
    stored(setup, *versions)
    setup.activate("m", versions[0], ACTOR)
    replicas = [VersionDatabase.open(url, tmp_path) for _ in range(3)]
    acknowledged: dict[str, list[tuple[str, str]]] = {"added": [], "deleted": []}
    dropped: list[str] = []
    lock = threading.Lock()

    def work(database: VersionDatabase, seed: int) -> None:
        rng = random.Random(seed)
        for step in range(25):
            choice = rng.random()
            try:
                if choice < 0.4:
                    database.activate("m", rng.choice(versions), ACTOR)
                elif choice < 0.6:
                    database.rollback("m", ACTOR)
                elif choice < 0.8:
                    new = f"{seed:06d}{step:06d}"
                    database.add_version("m", record(new), ACTOR)
                    with lock:
                        acknowledged["added"].append(("add", new))
                else:
                    with lock:
                        mine = [v for _, v in acknowledged["added"] if v.startswith(f"{seed:06d}")]
                    if mine:
                        victim = rng.choice(mine)
                        database.delete("m", victim, ACTOR)
                        database.drop_unheld([record(victim).sha256], dropped.append)
                        with lock:
                            acknowledged["deleted"].append(("delete", victim))
            except (VersionConflict, VersionNotFound):
                pass  # refused by the state as it was then: allowed, and recorded nowhere

    threads = [threading.Thread(target=work, args=(db, n)) for n, db in enumerate(replicas, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    moves = [
        e
        for e in reversed(setup.history("m", limit=10_000))
        if e.action in ("activate", "rollback")
    ]
    for before, after in itertools.pairwise(moves):
        assert after.from_version == before.to_version, (before, after)
    assert setup.pointers("m").active == moves[-1].to_version
    assert setup.pointers("m").previous == moves[-1].from_version
    present = {r.id for r in setup.versions("m")}
    deleted = {v for _, v in acknowledged["deleted"]}
    assert {v for _, v in acknowledged["added"]} - deleted <= present
    assert not deleted & present
    assert sorted(dropped) == sorted(record(v).sha256 for v in deleted)
    for database in [setup, *replicas]:
        database.close()


@pytest.mark.process  # libpq tries a TCP connection to 127.0.0.1:1
def test_an_unusable_database_is_state_unavailable_and_a_bad_url_a_config_error(
    tmp_path: Path,
) -> None:
    missing = VersionDatabase.open(f"sqlite:///{tmp_path / 'no' / 'such' / 'dir.db'}", tmp_path)
    with pytest.raises(StateUnavailable, match="cannot be used"):
        missing.migrate()
    with pytest.raises(ConfigError, match="postgresql://"):
        VersionDatabase.open("mysql://root:secret@db/x", tmp_path)
    hidden = VersionDatabase.open("postgresql://user:s3cret@127.0.0.1:1/x", tmp_path)
    assert "s3cret" not in hidden.where
    with pytest.raises(StateUnavailable) as refused:
        hidden.pointers("m")
    assert "s3cret" not in refused.value.message


@pytest.mark.process
def test_postgresql_stopped_then_back_is_unavailable_then_serves_again(tmp_path: Path) -> None:
    with postgres_server() as server:
        db = VersionDatabase.open(server.url(), tmp_path)
        db.migrate()
        stored(db, V1)
        db.activate("m", V1, ACTOR)
        server.stop()
        with pytest.raises(StateUnavailable):
            db.pointers("m")
        server.start()
        assert db.pointers("m") == Pointers(V1, None)  # reconnected by itself
        db.close()


@pytest.mark.process
def test_a_listener_hears_every_committed_move_at_once_and_reconnects(tmp_path: Path) -> None:
    """PostgreSQL LISTEN/NOTIFY: a move committed on one connection reaches a listener on
    another; a rolled-back transaction tells nothing; after the server restarts, the listener
    is back and says that anything may have changed."""
    with postgres_server() as server:
        writer = VersionDatabase.open(server.url(), tmp_path)
        writer.migrate()
        stored(writer, V1, V2)
        heard: queue.Queue[str] = queue.Queue()
        stop = VersionDatabase.open(server.url(), tmp_path).listen(heard.put)
        try:
            assert heard.get(timeout=10) == ANY_MODEL  # connected
            started = time.monotonic()
            writer.activate("m", V1, ACTOR)
            assert heard.get(timeout=5) == "m"
            assert time.monotonic() - started < 1
            with pytest.raises(VersionNotFound):
                writer.activate("m", V3, ACTOR)  # refused: rolled back, nothing to tell
            writer.activate("m", V2, ACTOR)
            assert heard.get(timeout=5) == "m"
            assert heard.empty()
            server.stop()
            server.start()
            assert heard.get(timeout=30) == ANY_MODEL  # back, and it may have missed changes
        finally:
            stop()
            writer.close()


def test_sqlite_has_nothing_to_listen_to(tmp_path: Path) -> None:
    database = VersionDatabase.open(None, tmp_path)
    heard: list[str] = []
    stop = database.listen(heard.append)
    stop()
    assert heard == []
