"""Several replicas, one truth: three real server processes sharing one store directory follow
the version activated (or rolled back) on any of them, without failing a request."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from app.state.blobs import FolderBlobStore
from app.state.database import VersionDatabase
from tests.helpers import (
    BUNDLED,
    SAMPLE,
    TOKEN,
    PredictLoad,
    ServerProcess,
    Weights,
    all_serve,
    described,
    linear_weights,
    predict,
    replicas,
    rollback,
    upload,
    wait_until,
)

pytestmark = pytest.mark.process

BATCH = [SAMPLE, [1.0] * 10]
SYNC_INTERVAL_S = 0.5
FOLLOW_WITHIN_S = 5.0
"""The sync interval plus a generous margin for loading and checking the new version."""
REPLICA_ENV = {
    "MODELPORT_SYNC_INTERVAL_S": str(SYNC_INTERVAL_S),
    "MODELPORT_ADMIN_TOKEN": TOKEN,
}


def followed(servers: list[ServerProcess], version: str) -> float:
    """Seconds until every replica describes ``version`` as the one it serves."""
    return wait_until(all_serve(servers, version), FOLLOW_WITHIN_S, f"all serving {version}")


def traffic(servers: list[ServerProcess], clients_per_replica: int = 2) -> PredictLoad:
    """Clients predicting BATCH on every replica in a loop, and probing its readiness."""
    return PredictLoad(servers, clients_per_replica, batch=BATCH, probe_readiness=True)


def under_traffic(
    servers: list[ServerProcess], change: Callable[[], httpx.Response], version: str
) -> tuple[httpx.Response, float, PredictLoad]:
    """``change`` made while every replica serves traffic: its answer, the seconds until every
    replica serves ``version``, and the traffic (which every client saw before the change and
    after it, with that version)."""
    with traffic(servers).running() as load:
        load.wait_for()
        answer = change()
        followed_in = followed(servers, version)
        load.wait_for(version)
    return answer, followed_in, load


def serving(
    servers: list[ServerProcess],
) -> tuple[list[dict[str, Any]], list[tuple[str, list[list[float]]]]]:
    """What each replica describes as the version it serves, and its predict of BATCH."""
    return [described(server) for server in servers], [predict(s, BATCH) for s in servers]


def assert_all_serve(
    infos: list[dict[str, Any]], answers: list[tuple[str, list[list[float]]]], weights: Weights
) -> None:
    """Every replica describes ``weights`` as the version it serves, and predicts with it."""
    for info in infos:
        assert info["version"] == weights.version
        assert info["weights"]["sha256"] == weights.sha256
    for version, outputs in answers:
        assert version == weights.version
        assert np.allclose(outputs, weights.outputs(BATCH), atol=1e-6)


def test_a_version_uploaded_to_one_replica_is_served_by_all_within_the_interval(
    tmp_path: Path,
) -> None:
    new = linear_weights(11)
    with replicas(tmp_path, 3, **REPLICA_ENV) as servers:
        assert [described(s)["version"] for s in servers] == [BUNDLED.version] * 3
        uploaded, followed_in, load = under_traffic(
            servers, lambda: upload(servers[0], new.data), new.version
        )
        infos, answers = serving(servers)

    assert uploaded.status_code == 201, uploaded.text
    assert uploaded.json()["version"] == new.version
    assert followed_in < FOLLOW_WITHIN_S
    assert_all_serve(infos, answers, new)
    load.check(
        {BUNDLED.version: BUNDLED.outputs(BATCH), new.version: new.outputs(BATCH)},
        [BUNDLED.version, new.version],
    )
    for replica in (1, 2):  # the followers served the old version, then the new one
        assert {a.version for a in load.seen_by(replica)} == {BUNDLED.version, new.version}


def test_a_rollback_on_one_replica_is_followed_by_all(tmp_path: Path) -> None:
    new = linear_weights(12)
    with replicas(tmp_path, 3, **REPLICA_ENV) as servers:
        assert upload(servers[0], new.data).status_code == 201
        followed(servers, new.version)
        rolled_back, followed_in, load = under_traffic(
            servers, lambda: rollback(servers[1]), BUNDLED.version
        )
        infos, answers = serving(servers)

    assert rolled_back.status_code == 200, rolled_back.text
    assert rolled_back.json()["version"] == BUNDLED.version
    assert followed_in < FOLLOW_WITHIN_S
    assert_all_serve(infos, answers, BUNDLED)
    for info in infos:
        assert info["previous_version"] == new.version, "the rollback target differs"
    load.check(
        {BUNDLED.version: BUNDLED.outputs(BATCH), new.version: new.outputs(BATCH)},
        [new.version, BUNDLED.version],
    )


def race_uploads(
    first: ServerProcess, second: ServerProcess, weights: tuple[Weights, Weights]
) -> list[httpx.Response]:
    """Upload ``weights[0]`` to ``first`` and ``weights[1]`` to ``second`` at the same moment."""
    barrier = threading.Barrier(2)
    responses: dict[int, httpx.Response] = {}

    def send(index: int, server: ServerProcess) -> None:
        barrier.wait()
        responses[index] = upload(server, weights[index].data)

    threads = [threading.Thread(target=send, args=pair) for pair in enumerate((first, second))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return [responses[0], responses[1]]


def test_uploads_racing_on_two_replicas_keep_the_store_whole_and_the_replicas_agreeing(
    tmp_path: Path,
) -> None:
    rounds = [(linear_weights(20 + 2 * r), linear_weights(21 + 2 * r)) for r in range(3)]
    uploaded = [w for pair in rounds for w in pair]
    store = tmp_path / "store" / "linear"
    statuses, actives, follows, served_after = [], [], [], []
    with replicas(tmp_path, 3, **REPLICA_ENV) as servers, traffic(servers, 1).running() as load:
        for pair in rounds:
            responses = race_uploads(servers[0], servers[1], pair)
            statuses.append([r.status_code for r in responses])
            assert [r.json()["version"] for r in responses] == [w.version for w in pair]
            active = authoritative(servers[1])
            actives.append(active)
            follows.append(followed(servers, active["version"]))
            # and they stay there: what is checked is a stretch of two sync intervals, in
            # which no replica may turn back (there is no event to wait for)
            time.sleep(2 * SYNC_INTERVAL_S)
            served_after.append((authoritative(servers[0]), *serving(servers)))

    by_version = {w.version: w for w in uploaded}
    assert statuses == [[201, 201]] * len(rounds)
    for pair, active, followed_in, (active_after, infos, answers) in zip(
        rounds, actives, follows, served_after, strict=True
    ):
        assert active["version"] in {w.version for w in pair}, active
        assert followed_in < FOLLOW_WITHIN_S
        assert active_after == active
        assert_all_serve(infos, answers, by_version[active["version"]])
    load.check({w.version: w.outputs(BATCH) for w in [BUNDLED, *uploaded]}, order=None)

    assert list((store / "incoming").iterdir()) == [], "staged uploads were left behind"
    leftovers = [p.name for p in store.rglob("*") if p.name.endswith((".part", ".tmp"))]
    assert not leftovers, f"temporary files left in the store: {leftovers}"
    database = VersionDatabase.open(None, tmp_path / "store")
    records = {r.id: r for r in database.versions("linear") if r.source == "upload"}
    database.close()
    assert sorted(records) == sorted(w.version for w in uploaded)
    blobs = FolderBlobStore(tmp_path / "store" / "blobs")
    for weights in uploaded:
        record = records[weights.version]
        assert record.sha256 == weights.sha256
        assert record.size == len(weights.data)
        assert blobs.fetch(weights.sha256).read_bytes() == weights.data


def authoritative(server: ServerProcess) -> dict[str, str]:
    """The active version as the version database records it, asked of one replica."""
    return {"version": described(server)["active_version"]}
