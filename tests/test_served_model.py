"""ServedModel's versions on their own: startup, activation and rollback, fallback, following the
database, and versioned inference, over a real SQLite database and blob folder on tmp_path.

A "replica" is a ServedModel with a VersionState of its own (its own database connection) over
the store folder that the others share, as two server processes would have.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from app.config import ServedModelConfig
from app.errors import ModelUnavailable, VersionNotFound
from app.observability.metrics import Metrics
from app.serving.batching import BatchPolicy
from app.serving.catalog import INPUT_NAME
from app.serving.manager import VersionManager
from app.serving.model import ServedModel
from app.state.blobs import FolderBlobStore
from app.state.database import Pointers, VersionDatabase
from app.state.incoming import IncomingFolder
from app.state.versions import VersionState
from models.linear import MyModel
from tests.helpers import (
    ACTOR,
    CPU,
    WEIGHTS,
    scaled_linear_weights,
    spec_named,
    store_version,
)

pytestmark = pytest.mark.unit

BUNDLED = WEIGHTS / "linear.pth"
SAMPLE = np.array(
    [[0.5, -1.0, 2.0, 0.0, 1.5, -0.5, 0.25, 3.0, -2.0, 1.0], [1.0] * 10], dtype=np.float32
)
BATCH = {INPUT_NAME: SAMPLE}
"""SAMPLE as the batcher takes it: by input name."""

Replica = Callable[..., ServedModel]


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def version_of(path: Path) -> str:
    return sha256_of(path)[:12]


def outputs_of(path: Path, inputs: np.ndarray = SAMPLE) -> np.ndarray:
    """What the linear model with the weights of ``path`` answers, computed here."""
    model = MyModel().eval()
    model.load_state_dict(torch.load(path, weights_only=True))
    with torch.inference_mode():
        return model(torch.from_numpy(inputs)).numpy()


def blob_of(store: Path, path: Path) -> Path:
    """Where the folder blob store keeps the bytes of ``path``."""
    digest = sha256_of(path)
    return store / "blobs" / digest[:2] / digest


def damage(blob: Path) -> None:
    blob.chmod(0o644)
    blob.write_bytes(blob.read_bytes()[:100])


@pytest.fixture
def store(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def replica(store: Path) -> Iterator[Replica]:
    """Makes replicas of the model ``linear`` sharing ``store``; stops and closes them after."""
    made: list[ServedModel] = []

    def make(bundled: Path = BUNDLED) -> ServedModel:
        store.mkdir(exist_ok=True)
        database = VersionDatabase.open(None, store)
        database.migrate()
        state = VersionState(database, FolderBlobStore(store / "blobs"), IncomingFolder(store))
        config = ServedModelConfig.model_validate(
            {"name": "linear", "class": "linear", "weights": bundled}
        )
        model = ServedModel(
            config,
            spec_named("linear"),
            CPU,
            state,
            BatchPolicy(),
            Metrics(list, ["linear"]),
            torch_threads=1,
        )
        made.append(model)
        return model

    try:
        yield make
    finally:
        for model in made:
            model.batcher.stop()
            model.state.db.close()


def test_a_first_start_serves_the_bundled_weights_and_records_them_as_active(
    replica: Replica, store: Path
) -> None:
    model = replica()
    model.load()
    bundled = version_of(BUNDLED)
    assert model.runtime is not None
    assert model.runtime.version == bundled
    assert (model.error, model.fallback, model.previous) == (None, None, None)
    assert model.state.db.pointers("linear") == Pointers(bundled, None)
    assert [(r.id, r.source) for r in model.versions()] == [(bundled, "bundled")]
    assert blob_of(store, BUNDLED).is_file(), "replicas without the file could not load it"
    assert np.allclose(model.runtime.forward(SAMPLE).numpy(), outputs_of(BUNDLED))


async def test_activation_swaps_the_runtime_and_rollback_returns_to_the_one_kept_loaded(
    replica: Replica, tmp_path: Path
) -> None:
    model = replica()
    model.load()
    model.batcher.start()
    bundled = model.runtime
    assert bundled is not None
    new = scaled_linear_weights(tmp_path, 0.5)

    v1 = await store_version(model, new, activate=True)
    assert model.runtime is not None
    assert model.runtime.version == v1
    assert model.previous is bundled
    _, outputs = await model.batcher.submit(BATCH)
    assert np.allclose(outputs, outputs_of(new))

    record, pointers = await VersionManager(model).rollback(ACTOR)
    assert record.id == bundled.version
    assert pointers == Pointers(bundled.version, v1)
    assert model.runtime is bundled, "rollback rebuilt a runtime it held loaded"
    assert model.previous is not None
    assert model.previous.version == v1
    _, outputs = await model.batcher.submit(BATCH)
    assert np.allclose(outputs, outputs_of(BUNDLED))


async def test_an_upload_that_is_not_activated_leaves_the_serving_version_alone(
    replica: Replica, tmp_path: Path
) -> None:
    model = replica()
    model.load()
    serving = model.runtime
    v1 = await store_version(model, scaled_linear_weights(tmp_path, 0.5))
    assert model.runtime is serving
    assert model.state.db.pointers("linear").active == version_of(BUNDLED)
    assert v1 in [r.id for r in model.versions()]


async def test_a_restart_serves_the_active_version_with_the_previous_one_loaded(
    replica: Replica, tmp_path: Path
) -> None:
    first = replica()
    first.load()
    v1 = await store_version(first, scaled_linear_weights(tmp_path, 0.5), activate=True)

    restarted = replica()
    restarted.load()
    assert restarted.runtime is not None
    assert restarted.runtime.version == v1
    assert restarted.previous is not None
    assert restarted.previous.version == version_of(BUNDLED)
    assert restarted.fallback is None


async def test_an_active_version_that_cannot_load_falls_back_to_the_newest_loadable_one(
    replica: Replica, tmp_path: Path, store: Path
) -> None:
    first = replica()
    first.load()
    weights = [scaled_linear_weights(tmp_path, scale) for scale in (0.25, 0.5, 0.75)]
    v1 = await store_version(first, weights[0])
    v2 = await store_version(first, weights[1])
    v3 = await store_version(first, weights[2], activate=True)
    damage(blob_of(store, weights[2]))

    restarted = replica()
    restarted.load()
    assert restarted.runtime is not None
    assert restarted.runtime.version == v2, "not the newest stored version that loads"
    assert restarted.fallback is not None
    assert f"the active version {v3}" in restarted.fallback
    assert restarted.state.db.pointers("linear").active == v3, "a fallback moved the database"

    damage(blob_of(store, weights[1]))
    damage(blob_of(store, weights[0]))
    last = replica()
    last.load()
    assert last.runtime is not None
    assert last.runtime.version == version_of(BUNDLED)
    assert last.fallback is not None
    assert v3 in last.fallback
    assert v1 != v2


def test_nothing_loadable_leaves_the_model_unavailable_with_the_reason(replica: Replica) -> None:
    model = replica(bundled=WEIGHTS / "digits.pth")
    model.load()
    assert model.runtime is None
    assert model.error is not None
    assert "weights do not fit the model" in model.error
    with pytest.raises(ModelUnavailable, match="weights do not fit the model"):
        model.active()


async def test_follow_serves_what_another_replica_activated_and_rolled_back(
    replica: Replica, tmp_path: Path
) -> None:
    acting, following = replica(), replica()
    acting.load()
    following.load()
    following.batcher.start()
    held = following.runtime
    new = scaled_linear_weights(tmp_path, 0.5)

    v1 = await store_version(acting, new, activate=True)
    assert following.runtime is held, "followed before reading the database"
    synced = following.synced_at
    await following.follow()
    assert following.synced_at is not None
    assert synced is not None
    assert following.synced_at > synced
    assert following.runtime is not None
    assert following.runtime.version == v1
    assert following.previous is held
    _, outputs = await following.batcher.submit(BATCH)
    assert np.allclose(outputs, outputs_of(new))

    await VersionManager(acting).rollback(ACTOR)
    await following.follow()
    assert following.runtime is held, "the previous version it held was loaded again"
    _, outputs = await following.batcher.submit(BATCH)
    assert np.allclose(outputs, outputs_of(BUNDLED))


async def test_follow_keeps_serving_when_the_new_active_version_cannot_load_and_waits_to_retry(
    replica: Replica, tmp_path: Path, store: Path
) -> None:
    acting, following = replica(), replica()
    acting.load()
    following.load()
    held = following.runtime
    new = scaled_linear_weights(tmp_path, 0.5)
    v1 = await store_version(acting, new, activate=True)
    blob = blob_of(store, new)
    intact = blob.read_bytes()
    damage(blob)

    await following.follow()
    assert following.runtime is held
    assert following.fallback is not None
    assert f"the active version {v1}" in following.fallback

    blob.write_bytes(intact)  # repaired: still not retried until RETRY_FAILED_VERSION_S passed
    await following.follow()
    assert following.runtime is held


async def test_versioned_inference_loads_stored_versions_on_demand_and_keeps_the_last_two(
    replica: Replica, tmp_path: Path
) -> None:
    model = replica()
    model.load()
    model.batcher.start()
    active = model.runtime
    assert active is not None
    weights = [scaled_linear_weights(tmp_path, scale) for scale in (0.25, 0.5, 0.75)]
    v1, v2, v3 = [await store_version(model, path) for path in weights]

    assert await model.runtime_for(active.version) is active
    first = await model.runtime_for(v1)
    assert first.version == v1
    served_by, outputs = await model.batcher.submit(BATCH, runtime=await model.runtime_for(v1))
    assert served_by is first
    assert np.allclose(outputs, outputs_of(weights[0]))
    served_by, outputs = await model.batcher.submit(BATCH)
    assert served_by is active
    assert np.allclose(outputs, outputs_of(BUNDLED))

    second, third = await model.runtime_for(v2), await model.runtime_for(v3)
    assert await model.runtime_for(v3) is third, "a version loaded on demand was not kept"
    assert model.loaded(v2) is second
    assert model.loaded(v1) is None, "more than the last two versions kept loaded"
    assert model.runtime is active
    again = await model.runtime_for(v1)
    assert again is not first
    assert np.allclose(again.forward(SAMPLE).numpy(), outputs_of(weights[0]))


async def test_a_version_that_never_existed_answers_version_not_found(replica: Replica) -> None:
    model = replica()
    model.load()
    with pytest.raises(VersionNotFound, match="0123456789ab"):
        await model.runtime_for("0123456789ab")


async def test_a_version_deleted_by_another_replica_answers_version_not_found(
    replica: Replica, tmp_path: Path
) -> None:
    acting, other = replica(), replica()
    acting.load()
    other.load()
    v1 = await store_version(acting, scaled_linear_weights(tmp_path, 0.5))
    assert (await acting.runtime_for(v1)).version == v1
    read_before = other.record(v1)

    await VersionManager(acting).delete(v1, ACTOR)
    with pytest.raises(VersionNotFound):
        await acting.runtime_for(v1)  # its own loaded copy was forgotten
    with pytest.raises(VersionNotFound):
        await other.runtime_for(v1)
    with pytest.raises(VersionNotFound):
        await other.runtime_of(read_before)  # read before the delete, blob gone since


async def test_a_version_another_replica_deleted_is_forgotten_at_the_next_follow(
    replica: Replica, tmp_path: Path
) -> None:
    acting, other = replica(), replica()
    acting.load()
    other.load()
    v1 = await store_version(acting, scaled_linear_weights(tmp_path, 0.5))
    assert (await other.runtime_for(v1)).version == v1  # loaded on demand there

    await VersionManager(acting).delete(v1, ACTOR)
    await other.follow()
    with pytest.raises(VersionNotFound):
        await other.runtime_for(v1)


async def test_follow_past_a_missed_activation_keeps_only_the_rollback_target_loaded(
    replica: Replica, tmp_path: Path
) -> None:
    acting, following = replica(), replica()
    acting.load()
    following.load()
    v1 = await store_version(acting, scaled_linear_weights(tmp_path, 0.25), activate=True)
    v2 = await store_version(acting, scaled_linear_weights(tmp_path, 0.5), activate=True)

    await following.follow()  # one read: v1 came and went meanwhile
    assert following.runtime is not None
    assert following.runtime.version == v2
    # the database names v1 as the rollback target; the bundled runtime served before is not it
    assert following.previous is None or following.previous.version == v1

    await VersionManager(acting).rollback(ACTOR)
    await following.follow()
    assert following.runtime.version == v1
    assert following.previous is not None
    assert following.previous.version == v2
