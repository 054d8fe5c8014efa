"""Hot swap, restart and crash against real server processes sharing a real store directory."""

from __future__ import annotations

import contextlib
import hashlib
import json
import secrets
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from models.linear import MyModel
from tests.helpers import LINEAR, WEIGHTS, run_server, write_config

TOKEN = secrets.token_urlsafe(32)
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SAMPLE = [[0.5, -1.0, 2.0, 0.0, 1.5, -0.5, 0.25, 3.0, -2.0, 1.0]]


def linear_weights(path: Path, seed: int) -> tuple[bytes, list[list[float]]]:
    """Save seeded linear weights; return the bytes and their output on SAMPLE."""
    torch.manual_seed(seed)
    model = MyModel().eval()
    torch.save(model.state_dict(), path)
    with torch.inference_mode():
        return path.read_bytes(), model(torch.tensor(SAMPLE)).tolist()


def bundled_output() -> list[list[float]]:
    model = MyModel().eval()
    model.load_state_dict(torch.load(WEIGHTS / "linear.pth", weights_only=True))
    with torch.inference_mode():
        result: list[list[float]] = model(torch.tensor(SAMPLE)).tolist()
    return result


@pytest.fixture
def config(tmp_path: Path) -> Path:
    return write_config(tmp_path, LINEAR)


@pytest.fixture
def admin_env() -> dict[str, str]:
    return {"MODELPORT_ADMIN_TOKEN": TOKEN}


def upload(url: str, data: bytes, **params: str) -> dict[str, object]:
    response = httpx.put(
        f"{url}/v1/models/linear/weights", content=data, headers=AUTH, params=params, timeout=30
    )
    assert response.status_code in (200, 201), response.text
    body: dict[str, object] = response.json()
    return body


def blob(tmp_path: Path, digest: str) -> Path:
    """Where the folder blob store keeps the bytes of this sha256."""
    return tmp_path / "store" / "blobs" / digest[:2] / digest


def predict(url: str) -> tuple[str, list[list[float]]]:
    response = httpx.post(f"{url}/v1/models/linear/predict", json={"inputs": SAMPLE}, timeout=10)
    assert response.status_code == 200, response.text
    return response.json()["version"], response.json()["outputs"]


class LoadRunner:
    """Client threads predicting (and probing readiness) in a loop, recording every answer."""

    def __init__(self, url: str, clients: int) -> None:
        self.url = url
        self.answers: list[tuple[int, str | None, list[list[float]] | None]] = []
        self.not_ready = 0
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._predict_loop) for _ in range(clients)]
        self._threads.append(threading.Thread(target=self._ready_loop))

    def _predict_loop(self) -> None:
        with httpx.Client(base_url=self.url, timeout=10) as http:
            while not self._stop.is_set():
                try:
                    response = http.post("/v1/models/linear/predict", json={"inputs": SAMPLE})
                except httpx.HTTPError:
                    self.answers.append((0, None, None))
                    continue
                body = response.json() if response.status_code == 200 else {}
                self.answers.append(
                    (response.status_code, body.get("version"), body.get("outputs"))
                )
                if response.headers.get("X-Model-Version") != body.get("version"):
                    self.answers.append((-1, None, None))

    def _ready_loop(self) -> None:
        with httpx.Client(base_url=self.url, timeout=10) as http:
            while not self._stop.is_set():
                if http.get("/health/ready").status_code != 200:
                    self.not_ready += 1
                time.sleep(0.01)

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        for thread in self._threads:
            thread.start()
        try:
            yield
        finally:
            self._stop.set()
            for thread in self._threads:
                thread.join()


def test_swaps_under_concurrent_load_fail_nothing_and_never_mix_weights(
    tmp_path: Path, config: Path, admin_env: dict[str, str]
) -> None:
    expected = {}
    files = {}
    for seed in (1, 2, 3):
        files[seed], _ = linear_weights(tmp_path / f"v{seed}.pth", seed)
    with run_server(tmp_path, config, env=admin_env) as server:
        bundled_version, _ = predict(server.url)
        expected[bundled_version] = bundled_output()
        load = LoadRunner(server.url, clients=6)
        with load.running():
            time.sleep(0.5)
            v1 = str(upload(server.url, files[1])["version"])
            time.sleep(0.3)
            v2 = str(upload(server.url, files[2], activate="false")["version"])
            time.sleep(0.3)
            assert (
                httpx.post(
                    f"{server.url}/v1/models/linear/versions/{v2}/activate", headers=AUTH
                ).status_code
                == 200
            )
            time.sleep(0.3)
            assert (
                httpx.post(f"{server.url}/v1/models/linear/rollback", headers=AUTH).status_code
                == 200
            )
            time.sleep(0.3)
            v3 = str(upload(server.url, files[3])["version"])
            for _ in range(5):
                time.sleep(0.2)
                assert (
                    httpx.post(f"{server.url}/v1/models/linear/rollback", headers=AUTH).status_code
                    == 200
                )
            assert (
                httpx.post(
                    f"{server.url}/v1/models/linear/versions/{bundled_version}/activate",
                    headers=AUTH,
                ).status_code
                == 200
            )
            time.sleep(0.5)
    for seed, version in ((1, v1), (2, v2), (3, v3)):
        torch.manual_seed(seed)
        model = MyModel().eval()
        with torch.inference_mode():
            expected[version] = model(torch.tensor(SAMPLE)).tolist()

    failures = [a for a in load.answers if a[0] != 200]
    assert not failures, f"{len(failures)} of {len(load.answers)} requests failed: {failures[:5]}"
    assert load.not_ready == 0
    seen = {version for _, version, _ in load.answers}
    assert seen <= set(expected)
    assert len(seen) >= 3, f"the swaps were not observed under load: {seen}"
    for _, version, outputs in load.answers:
        assert np.allclose(outputs, expected[str(version)], atol=1e-6), f"mixed weights: {version}"
    assert len(load.answers) > 100


def test_restart_serves_the_version_that_was_active_and_keeps_the_rollback_target(
    tmp_path: Path, config: Path, admin_env: dict[str, str]
) -> None:
    data, output = linear_weights(tmp_path / "v1.pth", seed=1)
    with run_server(tmp_path, config, env=admin_env) as server:
        bundled_version, _ = predict(server.url)
        version = upload(server.url, data)["version"]
    with run_server(tmp_path, config, env=admin_env) as server:
        served, outputs = predict(server.url)
        info = httpx.get(f"{server.url}/v1/models/linear").json()
        rollback = httpx.post(f"{server.url}/v1/models/linear/rollback", headers=AUTH)
        after_rollback, _ = predict(server.url)
    assert served == version
    assert np.allclose(outputs, output, atol=1e-6)
    assert info["previous_version"] == bundled_version
    assert info["fallback"] is None
    assert rollback.status_code == 200
    assert after_rollback == bundled_version


@pytest.mark.parametrize("damage", ["missing", "corrupt"])
def test_a_damaged_active_version_falls_back_to_the_newest_valid_one_loudly(
    tmp_path: Path, config: Path, admin_env: dict[str, str], damage: str
) -> None:
    older, older_output = linear_weights(tmp_path / "v1.pth", seed=1)
    newer, _ = linear_weights(tmp_path / "v2.pth", seed=2)
    with run_server(tmp_path, config, env=admin_env) as server:
        v1 = upload(server.url, older)["version"]
        second = upload(server.url, newer)
        v2 = str(second["version"])
    weights = blob(tmp_path, str(second["sha256"]))
    if damage == "missing":
        weights.unlink()
    else:
        weights.chmod(0o644)
        weights.write_bytes(weights.read_bytes()[:100])
    with run_server(tmp_path, config, env=admin_env) as server:
        served, outputs = predict(server.url)
        info = httpx.get(f"{server.url}/v1/models/linear").json()
        ready = httpx.get(f"{server.url}/health/ready").status_code
        log = server.output()
    assert served == v1
    assert np.allclose(outputs, older_output, atol=1e-6)
    assert v2 in info["fallback"]
    assert ready == 200
    assert "INSTEAD OF the active one" in log
    assert f"the active version {v2}" in log
    assert "ERROR" in log


def test_a_damaged_database_falls_back_to_the_bundled_weights_and_never_crash_loops(
    tmp_path: Path, config: Path, admin_env: dict[str, str]
) -> None:
    data, _ = linear_weights(tmp_path / "v1.pth", seed=1)
    with run_server(tmp_path, config, env=admin_env) as server:
        bundled_version, _ = predict(server.url)
        upload(server.url, data)
    database = tmp_path / "store" / "modelport.db"
    database.write_bytes(b"not a database" * 1000)
    for leftover in database.parent.glob("modelport.db-*"):
        leftover.unlink()
    with run_server(tmp_path, config, env=admin_env) as server:
        served, outputs = predict(server.url)
        info = httpx.get(f"{server.url}/v1/models/linear").json()
        log = server.output()
    assert served == bundled_version
    assert np.allclose(outputs, bundled_output(), atol=1e-6)
    assert "version database" in info["fallback"]
    assert info["active_version"] is None  # the database's view: unknown while it is broken
    assert "ERROR" in log


def test_every_stored_version_damaged_falls_back_to_the_bundled_weights(
    tmp_path: Path, config: Path, admin_env: dict[str, str]
) -> None:
    data, _ = linear_weights(tmp_path / "v1.pth", seed=1)
    with run_server(tmp_path, config, env=admin_env) as server:
        bundled_version, _ = predict(server.url)
        digest = str(upload(server.url, data)["sha256"])
    blob(tmp_path, digest).chmod(0o644)
    blob(tmp_path, digest).write_bytes(b"")
    with run_server(tmp_path, config, env=admin_env) as server:
        served, outputs = predict(server.url)
    assert served == bundled_version
    assert np.allclose(outputs, bundled_output(), atol=1e-6)


def test_sigkill_during_an_upload_leaves_no_partial_version_and_the_active_one_intact(
    tmp_path: Path, config: Path, admin_env: dict[str, str]
) -> None:
    active, _ = linear_weights(tmp_path / "v1.pth", seed=1)
    incoming = tmp_path / "store" / "linear" / "incoming"
    with run_server(tmp_path, config, env=admin_env) as server:
        version = upload(server.url, active)["version"]
        started = threading.Event()

        def slow_body() -> Iterator[bytes]:
            yield b"PK\x03\x04" + b"\0" * 65536
            started.set()
            time.sleep(30)  # the server dies while waiting for the rest
            yield b"never sent"

        def send() -> None:
            with contextlib.suppress(httpx.HTTPError):
                httpx.put(
                    f"{server.url}/v1/models/linear/weights",
                    content=slow_body(),
                    headers=AUTH,
                    timeout=60,
                )

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        assert started.wait(10)
        deadline = time.monotonic() + 10
        while not list(incoming.glob("*.part")) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert list(incoming.glob("*.part")), "the upload never reached the store"
        assert server.stop(signal.SIGKILL) == -signal.SIGKILL
    blobs = tmp_path / "store" / "blobs"
    blobs_before = sorted(p.name for p in blobs.glob("*/*"))
    with run_server(tmp_path, config, env=admin_env) as server:
        served, _ = predict(server.url)
        listed = httpx.get(f"{server.url}/v1/models/linear/versions").json()
    assert served == version
    assert list(incoming.iterdir()) == []
    assert sorted(p.name for p in blobs.glob("*/*")) == blobs_before
    assert [v["version"] for v in listed["versions"] if v["source"] == "upload"] == [version]


def test_a_store_folder_of_the_release_before_is_imported_at_first_start(
    tmp_path: Path, config: Path, admin_env: dict[str, str]
) -> None:
    data, output = linear_weights(tmp_path / "v1.pth", seed=1)
    digest = hashlib.sha256(data).hexdigest()
    versions = tmp_path / "store" / "linear" / "versions"
    versions.mkdir(parents=True)
    record = {"id": digest[:12], "sha256": digest, "size": len(data), "format": "torch"}
    record |= {"created_at": "2026-11-01T00:00:00+00:00", "filename": "v1.pth"}
    record |= {"source": "upload", "report": {"smoke_test": "passed"}}
    (versions / f"{digest[:12]}.weights").write_bytes(data)
    (versions / f"{digest[:12]}.json").write_text(json.dumps(record))
    (tmp_path / "store" / "linear" / "active.json").write_text(json.dumps({"version": digest[:12]}))
    for _ in range(2):  # the second start finds it imported
        with run_server(tmp_path, config, env=admin_env) as server:
            served, outputs = predict(server.url)
            history = httpx.get(f"{server.url}/v1/models/linear/history", headers=AUTH).json()
        assert served == digest[:12]
        assert np.allclose(outputs, output, atol=1e-6)
        assert [e["action"] for e in history["entries"]] == ["import", "import"]
