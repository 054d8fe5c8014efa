"""Several replicas, one truth: three real server processes sharing one store directory follow
the version activated (or rolled back) on any of them, without failing a request."""

from __future__ import annotations

import contextlib
import hashlib
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch

from app.state.blobs import FolderBlobStore
from app.state.database import VersionDatabase
from models.linear import MyModel
from tests.helpers import WEIGHTS, ServerProcess, replicas

TOKEN = secrets.token_urlsafe(32)
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SAMPLE = [[0.5, -1.0, 2.0, 0.0, 1.5, -0.5, 0.25, 3.0, -2.0, 1.0], [1.0] * 10]
SYNC_INTERVAL_S = 0.5
FOLLOW_WITHIN_S = 5.0
"""The sync interval plus a generous margin for loading and checking the new version."""


@dataclass(frozen=True)
class Weights:
    """A linear state_dict file: its bytes, identity and output on SAMPLE."""

    data: bytes
    sha256: str
    outputs: list[list[float]]

    @property
    def version(self) -> str:
        return self.sha256[:12]


def weights_of(path: Path) -> Weights:
    model = MyModel().eval()
    model.load_state_dict(torch.load(path, weights_only=True))
    with torch.inference_mode():
        outputs: list[list[float]] = model(torch.tensor(SAMPLE)).tolist()
    data = path.read_bytes()
    return Weights(data, hashlib.sha256(data).hexdigest(), outputs)


def seeded(tmp_path: Path, seed: int) -> Weights:
    torch.manual_seed(seed)
    path = tmp_path / f"seed{seed}.pth"
    torch.save(MyModel().state_dict(), path)
    return weights_of(path)


REPLICA_ENV = {
    "MODELPORT_SYNC_INTERVAL_S": str(SYNC_INTERVAL_S),
    "MODELPORT_ADMIN_TOKEN": TOKEN,
}


def upload(server: ServerProcess, weights: Weights) -> httpx.Response:
    return httpx.put(
        f"{server.url}/v1/models/linear/weights", content=weights.data, headers=AUTH, timeout=30
    )


def served(server: ServerProcess) -> dict[str, Any]:
    info: dict[str, Any] = httpx.get(f"{server.url}/v1/models/linear", timeout=5).json()
    return info


def wait_until_all_serve(
    servers: list[ServerProcess], version: str, timeout: float = FOLLOW_WITHIN_S
) -> float:
    """Seconds until every replica describes ``version`` as the one it serves."""
    started = time.monotonic()
    while True:
        versions = [served(server)["version"] for server in servers]
        if all(v == version for v in versions):
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise AssertionError(f"replicas serve {versions}, not {version}, after {timeout}s")
        time.sleep(0.05)


def predict(server: ServerProcess) -> tuple[str, str, list[list[float]]]:
    response = httpx.post(
        f"{server.url}/v1/models/linear/predict", json={"inputs": SAMPLE}, timeout=10
    )
    assert response.status_code == 200, response.text
    body = response.json()
    return response.headers["X-Model-Version"], body["version"], body["outputs"]


@dataclass(frozen=True)
class Answer:
    replica: int
    status: int
    version: str | None = None
    header: str | None = None
    outputs: list[list[float]] | None = None


class Traffic:
    """Client threads predicting against every replica in a loop (and probing readiness),
    recording every answer in order."""

    def __init__(self, servers: list[ServerProcess], clients_per_replica: int = 2) -> None:
        self.servers = servers
        self.answers: list[list[Answer]] = []
        self.not_ready: list[tuple[int, int]] = []
        self._stop = threading.Event()
        self._threads = []
        for replica in range(len(servers)):
            for _ in range(clients_per_replica):
                answers: list[Answer] = []
                self.answers.append(answers)
                self._threads.append(
                    threading.Thread(target=self._predict_loop, args=(replica, answers))
                )
            self._threads.append(threading.Thread(target=self._ready_loop, args=(replica,)))

    def _predict_loop(self, replica: int, answers: list[Answer]) -> None:
        with httpx.Client(base_url=self.servers[replica].url, timeout=10) as http:
            while not self._stop.is_set():
                try:
                    response = http.post("/v1/models/linear/predict", json={"inputs": SAMPLE})
                except httpx.HTTPError:
                    answers.append(Answer(replica, 0))
                    continue
                if response.status_code != 200:
                    answers.append(Answer(replica, response.status_code))
                    continue
                body = response.json()
                header = response.headers.get("X-Model-Version")
                answers.append(Answer(replica, 200, body["version"], header, body["outputs"]))

    def _ready_loop(self, replica: int) -> None:
        with httpx.Client(base_url=self.servers[replica].url, timeout=10) as http:
            while not self._stop.is_set():
                status = http.get("/health/ready").status_code
                if status != 200:
                    self.not_ready.append((replica, status))
                time.sleep(0.02)

    def seen_by(self, replica: int) -> list[Answer]:
        return [a for answers in self.answers for a in answers if a.replica == replica]

    @contextlib.contextmanager
    def running(self) -> Iterator[Traffic]:
        for thread in self._threads:
            thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            for thread in self._threads:
                thread.join()

    def check(self, expected: dict[str, list[list[float]]], order: list[str] | None) -> None:
        """No request failed, every answer came from a known version with exactly its outputs,
        and each client saw the versions change only forward through ``order`` (when given)."""
        every = [a for answers in self.answers for a in answers]
        failed = [a for a in every if a.status != 200]
        assert not failed, f"{len(failed)} of {len(every)} requests failed: {failed[:5]}"
        assert not self.not_ready, f"readiness dropped: {self.not_ready[:5]}"
        for replica in range(len(self.servers)):
            assert len(self.seen_by(replica)) > 20, f"replica {replica} saw little traffic"
        for answer in every:
            assert answer.header == answer.version, answer
            assert answer.version in expected, f"unknown version {answer.version}"
            assert np.allclose(answer.outputs, expected[answer.version], atol=1e-6), (
                f"replica {answer.replica}: outputs are not those of {answer.version}"
            )
        for answers in self.answers if order is not None else []:
            positions = [order.index(str(a.version)) for a in answers]
            assert positions == sorted(positions), "a replica went back to an older version"


@pytest.fixture
def bundled() -> Weights:
    return weights_of(WEIGHTS / "linear.pth")


def test_a_version_uploaded_to_one_replica_is_served_by_all_within_the_interval(
    tmp_path: Path, bundled: Weights
) -> None:
    new = seeded(tmp_path, 11)
    with replicas(tmp_path, 3, **REPLICA_ENV) as servers:
        assert [served(s)["version"] for s in servers] == [bundled.version] * 3
        with Traffic(servers).running() as traffic:
            time.sleep(0.3)
            uploaded = upload(servers[0], new)
            followed_in = wait_until_all_serve(servers, new.version)
            time.sleep(0.3)
        infos = [served(server) for server in servers]
        answers = [predict(server) for server in servers]

    assert uploaded.status_code == 201, uploaded.text
    assert uploaded.json()["version"] == new.version
    assert followed_in < FOLLOW_WITHIN_S
    for info in infos:
        assert info["version"] == new.version
        assert info["weights"]["sha256"] == new.sha256
    for header, version, outputs in answers:
        assert header == version == new.version
        assert np.allclose(outputs, new.outputs, atol=1e-6)
    traffic.check(
        {bundled.version: bundled.outputs, new.version: new.outputs},
        [bundled.version, new.version],
    )
    for replica in (1, 2):  # the followers served the old version, then the new one
        assert {a.version for a in traffic.seen_by(replica)} == {bundled.version, new.version}


def test_a_rollback_on_one_replica_is_followed_by_all(tmp_path: Path, bundled: Weights) -> None:
    new = seeded(tmp_path, 12)
    with replicas(tmp_path, 3, **REPLICA_ENV) as servers:
        assert upload(servers[0], new).status_code == 201
        wait_until_all_serve(servers, new.version)
        with Traffic(servers).running() as traffic:
            time.sleep(0.3)
            rollback = httpx.post(
                f"{servers[1].url}/v1/models/linear/rollback", headers=AUTH, timeout=30
            )
            followed_in = wait_until_all_serve(servers, bundled.version)
            time.sleep(0.3)
        infos = [served(server) for server in servers]
        answers = [predict(server) for server in servers]

    assert rollback.status_code == 200, rollback.text
    assert rollback.json()["version"] == bundled.version
    assert followed_in < FOLLOW_WITHIN_S
    for info in infos:
        assert info["version"] == bundled.version
        assert info["weights"]["sha256"] == bundled.sha256
        assert info["previous_version"] == new.version, "the rollback target differs"
    for header, version, outputs in answers:
        assert header == version == bundled.version
        assert np.allclose(outputs, bundled.outputs, atol=1e-6)
    traffic.check(
        {bundled.version: bundled.outputs, new.version: new.outputs},
        [new.version, bundled.version],
    )


def race_uploads(
    first: ServerProcess, second: ServerProcess, weights: tuple[Weights, Weights]
) -> list[httpx.Response]:
    """Upload ``weights[0]`` to ``first`` and ``weights[1]`` to ``second`` at the same moment."""
    barrier = threading.Barrier(2)
    responses: dict[int, httpx.Response] = {}

    def send(index: int, server: ServerProcess) -> None:
        barrier.wait()
        responses[index] = upload(server, weights[index])

    threads = [threading.Thread(target=send, args=pair) for pair in enumerate((first, second))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return [responses[0], responses[1]]


def test_uploads_racing_on_two_replicas_keep_the_store_whole_and_the_replicas_agreeing(
    tmp_path: Path, bundled: Weights
) -> None:
    rounds = [(seeded(tmp_path, 20 + 2 * r), seeded(tmp_path, 21 + 2 * r)) for r in range(3)]
    uploaded = [w for pair in rounds for w in pair]
    store = tmp_path / "store" / "linear"
    statuses, actives, follows, served_after = [], [], [], []
    with replicas(tmp_path, 3, **REPLICA_ENV) as servers, Traffic(servers, 1).running() as traffic:
        for pair in rounds:
            responses = race_uploads(servers[0], servers[1], pair)
            statuses.append([r.status_code for r in responses])
            assert [r.json()["version"] for r in responses] == [w.version for w in pair]
            active = authoritative(servers[1])
            actives.append(active)
            follows.append(wait_until_all_serve(servers, active["version"]))
            time.sleep(2 * SYNC_INTERVAL_S)  # and they stay there
            served_after.append(
                (
                    authoritative(servers[0]),
                    [served(server) for server in servers],
                    [predict(server) for server in servers],
                )
            )

    by_version = {w.version: w for w in uploaded}
    assert statuses == [[201, 201]] * len(rounds)
    for pair, active, followed_in, (active_after, infos, answers) in zip(
        rounds, actives, follows, served_after, strict=True
    ):
        assert active["version"] in {w.version for w in pair}, active
        assert followed_in < FOLLOW_WITHIN_S
        assert active_after == active
        winner = by_version[active["version"]]
        for info in infos:
            assert info["version"] == winner.version
            assert info["weights"]["sha256"] == winner.sha256
        for header, version, outputs in answers:
            assert header == version == winner.version
            assert np.allclose(outputs, winner.outputs, atol=1e-6)
    traffic.check({w.version: w.outputs for w in [bundled, *uploaded]}, order=None)

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
    info = httpx.get(f"{server.url}/v1/models/linear", timeout=10).json()
    return {"version": info["active_version"]}
