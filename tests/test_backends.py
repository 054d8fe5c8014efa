"""A version's whole life through a real server process, on every pair of backends: SQLite and
a blob folder (one host), PostgreSQL and a blob folder, PostgreSQL and S3 (many hosts); then a
restart, which must find exactly what was acknowledged."""

from __future__ import annotations

import uuid
from pathlib import Path

import httpx
import pytest

from tests.helpers import (
    AUTH,
    LINEAR,
    SAMPLE,
    TOKEN,
    activate,
    linear_weights,
    rollback,
    run_server,
    upload,
    write_config,
)
from tests.services import PostgresServer, S3Server

pytestmark = pytest.mark.process

BUCKET = "modelport-tests"


@pytest.fixture(scope="module")
def s3(s3: S3Server) -> S3Server:
    """The run's S3 server, with this module's bucket."""
    s3.client().create_bucket(Bucket=BUCKET)
    return s3


@pytest.fixture(params=["sqlite+folder", "postgresql+folder", "postgresql+s3"])
def backends(request: pytest.FixtureRequest) -> dict[str, str]:
    """The environment that puts the service on this pair of backends."""
    env = {"MODELPORT_ADMIN_TOKEN": TOKEN, "MODELPORT_SYNC_INTERVAL_S": "0.2"}
    database, blobs = str(request.param).split("+")
    if database == "postgresql":
        server: PostgresServer = request.getfixturevalue("postgres")
        env["MODELPORT_DATABASE_URL"] = server.new_database()
    if blobs == "s3":
        s3: S3Server = request.getfixturevalue("s3")
        env |= s3.environment() | {"MODELPORT_BLOB_URL": f"s3://{BUCKET}/{uuid.uuid4().hex}"}
    return env


def test_uploads_moves_and_deletes_are_what_a_restart_finds(
    tmp_path: Path, backends: dict[str, str]
) -> None:
    config = write_config(tmp_path, LINEAR)
    with (
        run_server(tmp_path, config, env=backends) as server,
        httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as client,
    ):
        bundled = client.get("/v1/models/linear").json()["version"]
        one = upload(server, linear_weights(1).data).json()["version"]
        two = upload(server, linear_weights(2).data, activate="false").json()["version"]
        assert activate(server, two).status_code == 200
        assert rollback(server).json()["version"] == one
        refused = client.delete(f"/v1/models/linear/versions/{two}")  # the rollback target
        assert refused.status_code == 409
        three = upload(server, linear_weights(3).data).json()["version"]
        assert client.delete(f"/v1/models/linear/versions/{two}").status_code == 204
        history = client.get("/v1/models/linear/history").json()["entries"]
    moves = [(e["action"], e["from_version"], e["to_version"]) for e in reversed(history)]
    assert moves == [
        ("upload", None, one),
        ("activate", bundled, one),
        ("upload", None, two),
        ("activate", one, two),
        ("rollback", two, one),
        ("upload", None, three),
        ("activate", one, three),
        ("delete", two, None),
    ]
    with (
        run_server(tmp_path, config, env=backends) as server,
        httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as client,
    ):
        info = client.get("/v1/models/linear").json()
        listing = client.get("/v1/models/linear/versions").json()
        served = client.post("/predict", json={"inputs": [SAMPLE]}).headers["X-Model-Version"]
        back = rollback(server).json()["version"]
    assert info["version"] == info["active_version"] == three
    assert info["previous_version"] == one
    assert info["fallback"] is None
    assert sorted(v["version"] for v in listing["versions"]) == sorted([bundled, one, three])
    assert (listing["active"], listing["previous"]) == (three, one)
    assert served == three
    assert back == one
