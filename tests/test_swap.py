"""Hot swap, restart and crash against real server processes sharing a real store directory."""

from __future__ import annotations

import contextlib
import json
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tests.helpers import (
    AUTH,
    BUNDLED,
    LINEAR,
    SAMPLE,
    TOKEN,
    PredictLoad,
    ServerProcess,
    activate,
    linear_weights,
    predict,
    rollback,
    run_server,
    upload,
    wait_until,
    write_config,
)

pytestmark = pytest.mark.process


@pytest.fixture
def config(tmp_path: Path) -> Path:
    return write_config(tmp_path, LINEAR)


@pytest.fixture
def admin_env() -> dict[str, str]:
    return {"MODELPORT_ADMIN_TOKEN": TOKEN}


def stored(server: ServerProcess, data: bytes, **params: str) -> dict[str, Any]:
    """Upload ``data`` to ``linear``; the answer's body, once it says the version is stored."""
    response = upload(server, data, **params)
    assert response.status_code in (200, 201), response.text
    body: dict[str, Any] = response.json()
    return body


def blob(tmp_path: Path, digest: str) -> Path:
    """Where the folder blob store keeps the bytes of this sha256."""
    return tmp_path / "store" / "blobs" / digest[:2] / digest


def test_swaps_under_concurrent_load_fail_nothing_and_never_mix_weights(
    tmp_path: Path, config: Path, admin_env: dict[str, str]
) -> None:
    one, two, three = (linear_weights(seed) for seed in (1, 2, 3))
    # after each move, every client sees what it did before the next one
    with (
        run_server(tmp_path, config, env=admin_env) as server,
        PredictLoad([server], 6, probe_readiness=True).running() as load,
    ):
        load.wait_for(BUNDLED.version)
        assert stored(server, one.data)["version"] == one.version
        load.wait_for(one.version)
        assert stored(server, two.data, activate="false")["version"] == two.version
        load.wait_for(one.version)
        assert activate(server, two.version).status_code == 200
        load.wait_for(two.version)
        assert rollback(server).status_code == 200
        load.wait_for(one.version)
        assert stored(server, three.data)["version"] == three.version
        serving, previous = three.version, one.version
        for _ in range(5):
            load.wait_for(serving)
            back = rollback(server)
            assert back.status_code == 200, back.text
            serving, previous = previous, serving
            assert back.json()["version"] == serving
        assert activate(server, BUNDLED.version).status_code == 200
        load.wait_for(BUNDLED.version)

    expected = {w.version: w.outputs([SAMPLE]) for w in (BUNDLED, one, two, three)}
    load.check(expected, least=100)
    assert {answer.version for answer in load.every()} == set(expected)


def test_restart_serves_the_version_that_was_active_and_keeps_the_rollback_target(
    tmp_path: Path, config: Path, admin_env: dict[str, str]
) -> None:
    one = linear_weights(1)
    with run_server(tmp_path, config, env=admin_env) as server:
        bundled_version, _ = predict(server)
        version = stored(server, one.data)["version"]
    with run_server(tmp_path, config, env=admin_env) as server:
        served, outputs = predict(server)
        info = httpx.get(f"{server.url}/v1/models/linear").json()
        rolled_back = rollback(server)
        after_rollback, _ = predict(server)
    assert served == version
    assert np.allclose(outputs, one.outputs([SAMPLE]), atol=1e-6)
    assert info["previous_version"] == bundled_version
    assert info["fallback"] is None
    assert rolled_back.status_code == 200
    assert after_rollback == bundled_version


@pytest.mark.parametrize("damage", ["missing", "corrupt"])
def test_a_damaged_active_version_falls_back_to_the_newest_valid_one_loudly(
    tmp_path: Path, config: Path, admin_env: dict[str, str], damage: str
) -> None:
    older, newer = linear_weights(1), linear_weights(2)
    with run_server(tmp_path, config, env=admin_env) as server:
        v1 = stored(server, older.data)["version"]
        second = stored(server, newer.data)
        v2 = str(second["version"])
    weights = blob(tmp_path, str(second["sha256"]))
    if damage == "missing":
        weights.unlink()
    else:
        weights.chmod(0o644)
        weights.write_bytes(weights.read_bytes()[:100])
    with run_server(tmp_path, config, env=admin_env) as server:
        served, outputs = predict(server)
        info = httpx.get(f"{server.url}/v1/models/linear").json()
        ready = httpx.get(f"{server.url}/health/ready").status_code
        log = server.output()
    assert served == v1
    assert np.allclose(outputs, older.outputs([SAMPLE]), atol=1e-6)
    assert v2 in info["fallback"]
    assert ready == 200
    assert "INSTEAD OF the active one" in log
    assert f"the active version {v2}" in log
    assert "ERROR" in log


def test_a_damaged_database_falls_back_to_the_bundled_weights_and_never_crash_loops(
    tmp_path: Path, config: Path, admin_env: dict[str, str]
) -> None:
    with run_server(tmp_path, config, env=admin_env) as server:
        bundled_version, _ = predict(server)
        stored(server, linear_weights(1).data)
    database = tmp_path / "store" / "modelport.db"
    database.write_bytes(b"not a database" * 1000)
    for leftover in database.parent.glob("modelport.db-*"):
        leftover.unlink()
    with run_server(tmp_path, config, env=admin_env) as server:
        served, outputs = predict(server)
        info = httpx.get(f"{server.url}/v1/models/linear").json()
        log = server.output()
    assert served == bundled_version
    assert np.allclose(outputs, BUNDLED.outputs([SAMPLE]), atol=1e-6)
    assert "version database" in info["fallback"]
    assert info["active_version"] is None  # the database's view: unknown while it is broken
    assert "ERROR" in log


def test_every_stored_version_damaged_falls_back_to_the_bundled_weights(
    tmp_path: Path, config: Path, admin_env: dict[str, str]
) -> None:
    with run_server(tmp_path, config, env=admin_env) as server:
        bundled_version, _ = predict(server)
        digest = str(stored(server, linear_weights(1).data)["sha256"])
    blob(tmp_path, digest).chmod(0o644)
    blob(tmp_path, digest).write_bytes(b"")
    with run_server(tmp_path, config, env=admin_env) as server:
        served, outputs = predict(server)
    assert served == bundled_version
    assert np.allclose(outputs, BUNDLED.outputs([SAMPLE]), atol=1e-6)


def test_sigkill_during_an_upload_leaves_no_partial_version_and_the_active_one_intact(
    tmp_path: Path, config: Path, admin_env: dict[str, str]
) -> None:
    incoming = tmp_path / "store" / "linear" / "incoming"
    with run_server(tmp_path, config, env=admin_env) as server:
        version = stored(server, linear_weights(1).data)["version"]
        started, killed = threading.Event(), threading.Event()

        def slow_body() -> Iterator[bytes]:
            yield b"PK\x03\x04" + b"\0" * 65536
            started.set()
            killed.wait(30)  # a client that stalls mid-body: the server dies meanwhile
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
        wait_until(lambda: list(incoming.glob("*.part")), 10, "the upload reaching the store")
        assert server.stop(signal.SIGKILL) == -signal.SIGKILL
        killed.set()
    blobs = tmp_path / "store" / "blobs"
    blobs_before = sorted(p.name for p in blobs.glob("*/*"))
    with run_server(tmp_path, config, env=admin_env) as server:
        served, _ = predict(server)
        listed = httpx.get(f"{server.url}/v1/models/linear/versions").json()
    assert served == version
    assert list(incoming.iterdir()) == []
    assert sorted(p.name for p in blobs.glob("*/*")) == blobs_before
    assert [v["version"] for v in listed["versions"] if v["source"] == "upload"] == [version]


def test_a_store_folder_of_the_release_before_is_imported_at_first_start(
    tmp_path: Path, config: Path, admin_env: dict[str, str]
) -> None:
    one = linear_weights(1)
    data, digest = one.data, one.sha256
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
            served, outputs = predict(server)
            history = httpx.get(f"{server.url}/v1/models/linear/history", headers=AUTH).json()
        assert served == digest[:12]
        assert np.allclose(outputs, one.outputs([SAMPLE]), atol=1e-6)
        assert [e["action"] for e in history["entries"]] == ["import", "import"]
