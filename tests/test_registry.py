"""ModelRegistry on its own: names, loading the configured models, readiness reasons and the loop
that follows the version database, over a real SQLite database and blob folder on tmp_path."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from app.errors import ConfigError, InvalidInput, ModelNotFound
from app.serving.manager import VersionManager
from app.serving.registry import ModelRegistry
from app.state.database import SQLITE_FILE
from tests.helpers import (
    ACTOR,
    BROKEN,
    DIGITS,
    LINEAR,
    registry_for,
    scaled_linear_weights,
    store_version,
    wait_until_async,
)

pytestmark = pytest.mark.unit

FOLLOW_WITHIN_S = 5.0
"""Upper bound for the follow loop to notice a change; only reached when a test fails."""

Registries = Callable[..., ModelRegistry]


@pytest.fixture
def registry_of(tmp_path: Path) -> Iterator[Registries]:
    """Makes registries of ``models`` over one store folder (each with its own database
    connection, as replicas have); stops their threads and closes their databases after."""
    made: list[ModelRegistry] = []

    def make(*models: dict[str, Any], **overrides: Any) -> ModelRegistry:
        registry = registry_for(tmp_path, *models, torch_threads=1, **overrides)
        made.append(registry)
        return registry

    try:
        yield make
    finally:
        for registry in made:
            registry.close()
            registry.state.db.close()


def test_get_finds_a_served_model_and_an_unknown_name_is_model_not_found(
    registry_of: Registries,
) -> None:
    registry = registry_of(LINEAR, DIGITS)
    assert registry.get("linear").name == "linear"
    assert registry.get("digits").spec.name == "digits"
    with pytest.raises(ModelNotFound, match="no model named 'nope'; served models: digits, linear"):
        registry.get("nope")
    with pytest.raises(ModelNotFound):
        registry.resolve("nope")


def test_resolve_without_a_name_takes_the_default_model(registry_of: Registries) -> None:
    registry = registry_of(LINEAR, DIGITS, default_model="digits")
    assert registry.resolve(None) is registry.get("digits")
    assert registry.resolve("linear") is registry.get("linear")


def test_resolve_without_a_name_takes_the_only_model(registry_of: Registries) -> None:
    registry = registry_of(DIGITS)
    assert registry.resolve(None) is registry.get("digits")


def test_resolve_without_a_name_among_several_and_no_default_is_invalid_input(
    registry_of: Registries,
) -> None:
    registry = registry_of(LINEAR, DIGITS)
    with pytest.raises(InvalidInput, match="several models are served"):
        registry.resolve(None)


def test_a_default_model_that_is_not_served_is_a_config_error(registry_of: Registries) -> None:
    with pytest.raises(ConfigError, match="MODELPORT_DEFAULT_MODEL names 'digits'"):
        registry_of(LINEAR, default_model="digits")


def test_load_all_loads_every_configured_model(registry_of: Registries) -> None:
    registry = registry_of(LINEAR, DIGITS)
    assert registry.unavailable() == {"linear": "not loaded", "digits": "not loaded"}
    registry.load_all()
    assert registry.unavailable() == {}
    served = {name: (version, sha256) for name, version, sha256 in registry.active_versions()}
    assert set(served) == {"linear", "digits"}
    for model in registry:
        version, sha256 = served[model.name]
        assert model.runtime is not None
        assert (model.runtime.version, model.runtime.weights.sha256) == (version, sha256)
        assert model.runtime.weights.path == model.config.weights
        assert registry.state.db.pointers(model.name).active == version


def test_a_model_whose_weights_fail_is_unavailable_with_the_reason_and_the_others_serve(
    registry_of: Registries,
) -> None:
    registry = registry_of(LINEAR, BROKEN)
    registry.load_all()
    unavailable = registry.unavailable()
    assert list(unavailable) == ["broken"]
    assert "weights do not fit the model" in unavailable["broken"]
    assert registry.get("linear").runtime is not None
    assert [name for name, _, _ in registry.active_versions()] == ["linear"]


def test_while_following_a_model_whose_database_read_is_too_old_is_unavailable(
    registry_of: Registries,
) -> None:
    registry = registry_of(LINEAR, DIGITS, max_sync_age_s=30.0)
    registry.load_all()
    stale = registry.get("linear")
    stale.synced_at = time.monotonic() - 31
    assert registry.unavailable() == {}, "a process that does not follow reported a sync age"
    registry.following = True
    assert registry.unavailable() == {"linear": "the version database was last read 31 s ago"}
    stale.synced_at = time.monotonic()
    assert registry.unavailable() == {}


def test_while_following_a_model_that_never_read_the_database_is_unavailable(
    registry_of: Registries, tmp_path: Path
) -> None:
    unreachable = f"sqlite:///{tmp_path / 'no' / 'such' / 'folder' / 'versions.db'}"
    registry = registry_of(LINEAR, database_url=unreachable, max_sync_age_s=30.0)
    registry.load_all()  # the database is logged as unreachable; the bundled weights serve
    model = registry.get("linear")
    assert model.runtime is not None
    assert model.synced_at is None
    registry.following = True
    assert registry.unavailable() == {}, "unavailable before max_sync_age_s passed"
    registry.started_at -= 31
    assert registry.unavailable() == {"linear": "the version database was last read never"}


async def test_the_follow_loop_serves_what_another_registry_activated(
    registry_of: Registries, tmp_path: Path
) -> None:
    acting, following = registry_of(LINEAR, DIGITS), registry_of(LINEAR, DIGITS)
    acting.load_all()
    following.load_all()
    failures: list[str] = []
    loop = asyncio.create_task(following.follow(0.02, failures.append))
    try:
        v1 = await store_version(
            acting.get("linear"), scaled_linear_weights(tmp_path, 0.5), activate=True
        )
        await wait_until_async(
            lambda: following.get("linear").serves(v1), f"following serves {v1}", FOLLOW_WITHIN_S
        )
        await VersionManager(acting.get("linear")).rollback(ACTOR)
        bundled = acting.get("linear").runtime
        assert bundled is not None
        await wait_until_async(
            lambda: following.get("linear").serves(bundled.version),
            "following rolled back",
            FOLLOW_WITHIN_S,
        )
    finally:
        loop.cancel()
    with pytest.raises(asyncio.CancelledError):
        await loop
    assert failures == []
    assert following.unavailable() == {}
    assert following.active_versions() == acting.active_versions()


async def test_the_follow_loop_survives_an_unreadable_database_and_reports_then_recovers(
    registry_of: Registries, tmp_path: Path
) -> None:
    registry = registry_of(LINEAR, max_sync_age_s=0.1)
    registry.load_all()
    model = registry.get("linear")
    serving = model.runtime
    failures: list[str] = []
    database = tmp_path / "store" / SQLITE_FILE
    loop = asyncio.create_task(registry.follow(0.02, failures.append))
    try:
        rename_table(database, "pointers", "pointers_hidden")
        await wait_until_async(
            lambda: len(failures) >= 2, "the follow loop kept trying", FOLLOW_WITHIN_S
        )
        assert set(failures) == {"linear"}
        await wait_until_async(
            lambda: "linear" in registry.unavailable(), "the sync age was reported", FOLLOW_WITHIN_S
        )
        assert "the version database was last read" in registry.unavailable()["linear"]
        assert model.runtime is serving, "stopped serving while the database was unreadable"

        rename_table(database, "pointers_hidden", "pointers")
        await wait_until_async(
            lambda: registry.unavailable() == {}, "ready again once readable", FOLLOW_WITHIN_S
        )
        assert not loop.done()
    finally:
        loop.cancel()
    with pytest.raises(asyncio.CancelledError):
        await loop


def rename_table(database: Path, old: str, new: str) -> None:
    """Another process changing the schema under the replica: its reads of ``old`` fail."""
    connection = sqlite3.connect(database, isolation_level=None)
    try:
        connection.execute(f"ALTER TABLE {old} RENAME TO {new}")
    finally:
        connection.close()


async def test_a_model_that_cannot_follow_does_not_stop_the_others_following(
    registry_of: Registries, tmp_path: Path
) -> None:
    other = {**LINEAR, "name": "other"}
    acting, following = registry_of(LINEAR, other), registry_of(LINEAR, other)
    acting.load_all()
    following.load_all()
    weights = scaled_linear_weights(tmp_path, 0.5)
    v1 = await store_version(acting.get("linear"), weights, activate=True)
    assert await store_version(acting.get("other"), weights, activate=True) == v1
    connection = sqlite3.connect(tmp_path / "store" / SQLITE_FILE, isolation_level=None)
    try:  # linear's record of v1 becomes unreadable; other's stays intact
        connection.execute("UPDATE versions SET report = '{' WHERE model = 'linear'")
    finally:
        connection.close()
    failures: list[str] = []
    loop = asyncio.create_task(following.follow(0.02, failures.append))
    try:
        await wait_until_async(
            lambda: following.get("other").serves(v1), "other follows", FOLLOW_WITHIN_S
        )
        await wait_until_async(lambda: len(failures) >= 2, "linear failed twice", FOLLOW_WITHIN_S)
    finally:
        loop.cancel()
    with pytest.raises(asyncio.CancelledError):
        await loop
    assert set(failures) == {"linear"}
    assert not following.get("linear").serves(v1)
