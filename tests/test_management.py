"""The weight-management HTTP API in process: upload, versions, activate, rollback, delete, auth."""

from __future__ import annotations

import hashlib
import random
import struct
import zipfile
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from safetensors.torch import save as save_safetensors
from torch import nn

from models.digits import EXAMPLE_ZERO, DigitsCNN
from models.linear import MyModel
from tests.helpers import (
    API_TOKEN,
    AUTH,
    BUNDLED,
    ONE_CHAR_OFF,
    SAMPLE,
    TOKEN,
    WEIGHTS,
    RunsCodeWhenUnpickled,
    Weights,
    linear_weights,
    make_settings,
    saved,
    seeded_state_dict,
    serve_in_process,
)

pytestmark = pytest.mark.app

SAMPLES = [
    SAMPLE,
    [float(i) for i in range(10)],
    [-3.0, 0.1, 0.0, 7.5, -0.25, 1.0, 2.0, -1.0, 4.0, 0.5],
]
WEIGHTS_URL = "/v1/models/linear/weights"


# --- weight files built from real models -------------------------------------------------------


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def marker_of(tmp_path: Path) -> Path:
    return tmp_path / "pwned"


def whole_pickled_model(_: Path) -> bytes:
    return saved(MyModel())


def code_running_pickle(tmp_path: Path) -> bytes:
    return saved(RunsCodeWhenUnpickled(marker_of(tmp_path)))


def truncated_torch_file(_: Path) -> bytes:
    data = linear_weights(3).data
    return data[: len(data) // 2]


def random_bytes(_: Path) -> bytes:
    return random.Random(20240601).randbytes(2048)


def digits_weights(_: Path) -> bytes:
    return saved(seeded_state_dict(3, DigitsCNN))


def wrong_shapes(_: Path) -> bytes:
    torch.manual_seed(3)
    wrong = nn.Linear(10, 3)
    return saved({"linear.weight": wrong.weight.detach(), "linear.bias": wrong.bias.detach()})


def uncastable_dtype(_: Path) -> bytes:
    state_dict = seeded_state_dict(3)
    state_dict["linear.weight"] = torch.ones(2, 10, dtype=torch.complex64)
    return saved(state_dict)


def nan_weights(_: Path) -> bytes:
    state_dict = seeded_state_dict(3)
    state_dict["linear.bias"][1] = float("nan")
    return saved(state_dict)


def zip_bomb(tmp_path: Path) -> bytes:
    """A real torch.save archive rewritten with compressed (deflated) entries."""
    original = linear_weights(3).write(tmp_path / "stored.pth")
    path = tmp_path / "deflated.pth"
    with zipfile.ZipFile(original) as source, zipfile.ZipFile(path, "w") as target:
        for entry in source.infolist():
            target.writestr(entry.filename, source.read(entry), zipfile.ZIP_DEFLATED)
    return path.read_bytes()


def linear_safetensors(seed: int) -> bytes:
    return save_safetensors(seeded_state_dict(seed))


def corrupt_safetensors(_: Path) -> bytes:
    data = linear_safetensors(3)
    header_len = struct.unpack("<Q", data[:8])[0]
    header = b"{" + b"\x00garbage, not json" + b" " * (header_len - 19)
    assert len(header) == header_len
    return data[:8] + header + data[8 + header_len :]


def untrained_digits(_: Path) -> bytes:
    return saved(seeded_state_dict(0, DigitsCNN))


# --- calling the API ---------------------------------------------------------------------------


async def predict(client: httpx.AsyncClient, model: str = "linear") -> tuple[str, Any]:
    """(version, outputs) of a predict call, checking that header and body agree."""
    inputs = SAMPLES if model == "linear" else [EXAMPLE_ZERO]
    response = await client.post(f"/v1/models/{model}/predict", json={"inputs": inputs})
    assert response.status_code == 200, response.text
    body = response.json()
    assert response.headers["X-Model-Version"] == body["version"]
    return body["version"], body["outputs"]


async def upload(client: httpx.AsyncClient, data: bytes, **params: str) -> dict[str, Any]:
    """Upload raw weights to linear and expect a new version."""
    response = await client.put(WEIGHTS_URL, content=data, headers=AUTH, params=params)
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


BUNDLED_BLOBS = {sha256((WEIGHTS / name).read_bytes()) for name in ("linear.pth", "digits.pth")}


def stored_files(store: Path, model: str = "linear") -> list[str]:
    """Every blob but the bundled weights', and every file in the model's incoming folder."""
    blobs = [p for p in (store / "blobs").glob("*/*") if p.name not in BUNDLED_BLOBS]
    incoming = list((store / model / "incoming").glob("*"))
    return sorted(str(path.relative_to(store)) for path in blobs + incoming)


def blob(digest: str) -> str:
    """Where the folder blob store keeps the bytes of this sha256, under the store."""
    return f"blobs/{digest[:2]}/{digest}"


def names_in(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir())


def assert_error_body(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()
    assert {"error", "code"} <= set(body) <= {"error", "code", "detail"}
    assert isinstance(body["error"], str)
    assert body["error"]
    assert body["code"] == code
    return body


def assert_close(found: list[list[float]], expected: list[list[float]]) -> None:
    assert len(found) == len(expected)
    for row, want in zip(found, expected, strict=True):
        assert row == pytest.approx(want, rel=1e-6, abs=1e-6)


@pytest.fixture
def store(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture
async def admin(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    """The real app serving linear and digits, with management enabled."""
    async with serve_in_process(make_settings(tmp_path, admin_token=TOKEN)) as client:
        yield client


# --- uploads that become versions --------------------------------------------------------------


async def test_raw_upload_becomes_the_active_version_and_predict_serves_it(
    admin: httpx.AsyncClient, tmp_path: Path, store: Path
) -> None:
    data = linear_weights(1).data
    digest = sha256(data)

    response = await admin.put(WEIGHTS_URL, content=data, headers=AUTH)

    assert response.status_code == 201, response.text
    body = response.json()
    assert body["model"] == "linear"
    assert body["version"] == digest[:12]
    assert body["sha256"] == digest
    assert body["size"] == len(data)
    assert body["format"] == "torch"
    assert body["source"] == "upload"
    assert body["active"] is True
    assert body["previous"] is False
    assert body["created"] is True
    assert body["report"]["smoke_test"] == "passed"
    assert body["report"]["strict"] is True
    assert body["report"]["missing_keys"] == []
    version = body["version"]
    assert stored_files(store) == [blob(digest)]
    assert (store / blob(digest)).read_bytes() == data
    served, outputs = await predict(admin)
    assert served == version
    assert_close(outputs, Weights(data).outputs(SAMPLES))


async def test_multipart_upload_in_the_file_field_records_its_filename(
    admin: httpx.AsyncClient, tmp_path: Path
) -> None:
    data = linear_weights(1).data

    response = await admin.put(WEIGHTS_URL, files={"file": ("new.pth", data)}, headers=AUTH)

    assert response.status_code == 201, response.text
    body = response.json()
    assert body["filename"] == "new.pth"
    assert body["sha256"] == sha256(data)
    assert body["size"] == len(data)
    versions = (await admin.get("/v1/models/linear/versions")).json()["versions"]
    assert versions[-1]["filename"] == "new.pth"
    served, outputs = await predict(admin)
    assert served == body["version"]
    assert_close(outputs, Weights(data).outputs(SAMPLES))


async def test_safetensors_upload_becomes_a_version_in_safetensors_format(
    admin: httpx.AsyncClient, tmp_path: Path
) -> None:
    data = linear_safetensors(1)

    body = await upload(admin, data)

    assert body["format"] == "safetensors"
    assert body["version"] == sha256(data)[:12]
    served, outputs = await predict(admin)
    assert served == body["version"]
    assert_close(outputs, linear_weights(1).outputs(SAMPLES))


@pytest.mark.parametrize("sent", ["../../etc/passwd", "..\\..\\evil.pth", "/abs/new.pth"])
async def test_uploaded_filename_is_kept_as_metadata_without_its_path(
    admin: httpx.AsyncClient, tmp_path: Path, store: Path, sent: str
) -> None:
    data = linear_weights(1).data

    response = await admin.put(WEIGHTS_URL, files={"file": (sent, data)}, headers=AUTH)

    assert response.status_code == 201, response.text
    recorded = response.json()["filename"]
    assert "/" not in recorded
    assert "\\" not in recorded
    assert recorded == sent.replace("\\", "/").rsplit("/", 1)[-1]
    assert stored_files(store) == [blob(response.json()["sha256"])]
    assert names_in(tmp_path) == ["modelport.toml", "store"]


@pytest.mark.parametrize("where", ["header", "query"])
async def test_upload_with_the_right_expected_sha256_is_accepted(
    admin: httpx.AsyncClient, tmp_path: Path, where: str
) -> None:
    data = linear_weights(1).data
    digest = sha256(data).upper() if where == "header" else sha256(data)
    headers = AUTH | {"X-Content-SHA256": digest} if where == "header" else AUTH
    params = {"sha256": digest} if where == "query" else {}

    response = await admin.put(WEIGHTS_URL, content=data, headers=headers, params=params)

    assert response.status_code == 201, response.text


async def test_identical_bytes_again_answer_200_with_the_same_version_and_store_nothing_new(
    admin: httpx.AsyncClient, tmp_path: Path, store: Path
) -> None:
    data = linear_weights(1).data
    first = await upload(admin, data)
    files = stored_files(store)

    response = await admin.put(WEIGHTS_URL, content=data, headers=AUTH)

    assert response.status_code == 200, response.text
    again = response.json()
    assert again["created"] is False
    assert again["version"] == first["version"]
    assert again["active"] is True
    assert stored_files(store) == files == [blob(first["sha256"])]


async def test_identical_bytes_again_put_back_a_blob_the_store_lost_and_serve_it(
    admin: httpx.AsyncClient, store: Path
) -> None:
    """A version whose blob is gone (lost, or dropped by another replica's delete of that
    version since the upload read it): uploading its bytes again stores them again, and the
    version activates; it was refused 422 ``blob_missing``, or activated with no blob for the
    other replicas to load."""
    data = linear_weights(1).data
    staged = await upload(admin, data, activate="false")
    (store / blob(staged["sha256"])).unlink()

    response = await admin.put(WEIGHTS_URL, content=data, headers=AUTH)

    assert response.status_code == 200, response.text
    assert (response.json()["version"], response.json()["active"]) == (staged["version"], True)
    assert (store / blob(staged["sha256"])).read_bytes() == data
    served, outputs = await predict(admin)
    assert served == staged["version"]
    assert_close(outputs, Weights(data).outputs(SAMPLES))


async def test_staged_upload_does_not_serve_until_activated(
    admin: httpx.AsyncClient, tmp_path: Path
) -> None:
    before, _ = await predict(admin)
    data = linear_weights(1).data

    staged = await upload(admin, data, activate="false")

    assert staged["created"] is True
    assert staged["active"] is False
    assert (await predict(admin))[0] == before == BUNDLED.version
    version = staged["version"]

    response = await admin.post(f"/v1/models/linear/versions/{version}/activate", headers=AUTH)

    assert response.status_code == 200, response.text
    assert response.json()["version"] == version
    assert response.json()["active"] is True
    served, outputs = await predict(admin)
    assert served == version
    assert_close(outputs, Weights(data).outputs(SAMPLES))
    info = (await admin.get("/v1/models/linear")).json()
    assert (info["version"], info["previous_version"]) == (version, BUNDLED.version)


async def test_rollback_returns_to_the_previous_version_and_twice_toggles(
    admin: httpx.AsyncClient, tmp_path: Path
) -> None:
    one = await upload(admin, linear_weights(1).data)
    two = await upload(admin, linear_weights(2).data)
    assert (await predict(admin))[0] == two["version"]

    back = await admin.post("/v1/models/linear/rollback", headers=AUTH)

    assert back.status_code == 200, back.text
    assert back.json()["version"] == one["version"]
    assert back.json()["active"] is True
    served, outputs = await predict(admin)
    assert served == one["version"]
    assert_close(outputs, linear_weights(1).outputs(SAMPLES))
    info = (await admin.get("/v1/models/linear")).json()
    assert (info["version"], info["previous_version"]) == (one["version"], two["version"])

    forth = await admin.post("/v1/models/linear/rollback", headers=AUTH)

    assert forth.status_code == 200, forth.text
    assert forth.json()["version"] == two["version"]
    assert (await predict(admin))[0] == two["version"]
    info = (await admin.get("/v1/models/linear")).json()
    assert (info["version"], info["previous_version"]) == (two["version"], one["version"])


async def test_rollback_with_no_previous_version_is_a_conflict(admin: httpx.AsyncClient) -> None:
    response = await admin.post("/v1/models/linear/rollback", headers=AUTH)

    body = assert_error_body(response, 409, "version_conflict")
    assert "no previous version" in body["error"]
    assert (await predict(admin))[0] == BUNDLED.version


async def test_versions_list_the_bundled_weights_and_uploads_with_active_and_previous(
    admin: httpx.AsyncClient, tmp_path: Path
) -> None:
    listing = (await admin.get("/v1/models/linear/versions")).json()
    assert listing["model"] == "linear"
    assert (listing["active"], listing["previous"]) == (BUNDLED.version, None)
    [bundled] = listing["versions"]
    assert bundled["version"] == BUNDLED.version
    assert bundled["source"] == "bundled"
    assert bundled["filename"] == "linear.pth"
    assert (bundled["active"], bundled["previous"]) == (True, False)

    one = await upload(admin, linear_weights(1).data)
    two = await upload(admin, linear_weights(2).data, activate="false")

    listing = (await admin.get("/v1/models/linear/versions")).json()
    assert (listing["active"], listing["previous"]) == (one["version"], BUNDLED.version)
    flags = {v["version"]: (v["source"], v["active"], v["previous"]) for v in listing["versions"]}
    assert [v["version"] for v in listing["versions"]] == [
        BUNDLED.version,
        one["version"],
        two["version"],
    ]
    assert flags == {
        BUNDLED.version: ("bundled", False, True),
        one["version"]: ("upload", True, False),
        two["version"]: ("upload", False, False),
    }
    info = (await admin.get("/v1/models/linear")).json()
    assert (info["version"], info["previous_version"]) == (one["version"], BUNDLED.version)


# --- deleting versions -------------------------------------------------------------------------


async def test_deleting_a_version_that_does_not_serve_removes_its_files(
    admin: httpx.AsyncClient, tmp_path: Path, store: Path
) -> None:
    active = await upload(admin, linear_weights(1).data)
    staged = await upload(admin, linear_weights(2).data, activate="false")
    version = staged["version"]

    response = await admin.delete(f"/v1/models/linear/versions/{version}", headers=AUTH)

    assert response.status_code == 204, response.text
    assert response.content == b""
    assert not any(version in name for name in stored_files(store))
    listed = (await admin.get("/v1/models/linear/versions")).json()["versions"]
    assert version not in {v["version"] for v in listed}
    assert (await predict(admin))[0] == active["version"]
    again = await admin.delete(f"/v1/models/linear/versions/{version}", headers=AUTH)
    assert_error_body(again, 404, "version_not_found")


async def test_deleting_the_previous_version_is_a_conflict_and_rollback_still_works(
    admin: httpx.AsyncClient, tmp_path: Path, store: Path
) -> None:
    one = await upload(admin, linear_weights(1).data)
    two = await upload(admin, linear_weights(2).data)
    files = stored_files(store)

    response = await admin.delete(f"/v1/models/linear/versions/{one['version']}", headers=AUTH)

    body = assert_error_body(response, 409, "version_conflict")
    assert "rollback target" in body["error"]
    assert stored_files(store) == files
    info = (await admin.get("/v1/models/linear")).json()
    assert (info["version"], info["previous_version"]) == (two["version"], one["version"])
    rollback = await admin.post("/v1/models/linear/rollback", headers=AUTH)
    assert rollback.json()["version"] == one["version"]


async def test_deleting_the_active_version_is_a_conflict(
    admin: httpx.AsyncClient, tmp_path: Path, store: Path
) -> None:
    active = await upload(admin, linear_weights(1).data)
    files = stored_files(store)

    response = await admin.delete(f"/v1/models/linear/versions/{active['version']}", headers=AUTH)

    body = assert_error_body(response, 409, "version_conflict")
    assert "active" in body["error"]
    assert stored_files(store) == files
    assert (await predict(admin))[0] == active["version"]


async def test_deleting_the_bundled_weights_is_a_conflict(
    admin: httpx.AsyncClient, tmp_path: Path
) -> None:
    await upload(admin, linear_weights(1).data)
    await upload(admin, linear_weights(2).data)
    listing = (await admin.get("/v1/models/linear/versions")).json()
    assert BUNDLED.version not in (listing["active"], listing["previous"])

    response = await admin.delete(f"/v1/models/linear/versions/{BUNDLED.version}", headers=AUTH)

    body = assert_error_body(response, 409, "version_conflict")
    assert "bundled" in body["error"]
    assert (WEIGHTS / "linear.pth").exists()
    listed = (await admin.get("/v1/models/linear/versions")).json()["versions"]
    assert listed[0]["version"] == BUNDLED.version


@pytest.mark.parametrize(
    ("method", "url", "status", "code"),
    [
        ("DELETE", "/v1/models/linear/versions/0123456789ab", 404, "version_not_found"),
        ("POST", "/v1/models/linear/versions/0123456789ab/activate", 404, "version_not_found"),
        ("DELETE", "/v1/models/linear/versions/zzz", 422, "invalid_request"),
        ("POST", "/v1/models/linear/versions/zzz/activate", 422, "invalid_request"),
        ("DELETE", "/v1/models/linear/versions/0123456789AB", 422, "invalid_request"),
        ("DELETE", "/v1/models/linear/versions/..%2F..%2Fetc", 404, "not_found"),
        ("DELETE", "/v1/models/nope/versions/0123456789ab", 404, "model_not_found"),
        ("POST", "/v1/models/nope/versions/0123456789ab/activate", 404, "model_not_found"),
        ("POST", "/v1/models/nope/rollback", 404, "model_not_found"),
        ("PUT", "/v1/models/nope/weights", 404, "model_not_found"),
        ("GET", "/v1/models/nope/versions", 404, "model_not_found"),
    ],
)
async def test_unknown_or_malformed_versions_and_models_are_refused(
    admin: httpx.AsyncClient, tmp_path: Path, method: str, url: str, status: int, code: str
) -> None:
    content = linear_weights(1).data if method == "PUT" else None

    response = await admin.request(method, url, headers=AUTH, content=content)

    assert_error_body(response, status, code)
    assert (await predict(admin))[0] == BUNDLED.version


# --- retention ---------------------------------------------------------------------------------


async def test_retention_keeps_the_newest_versions(tmp_path: Path, store: Path) -> None:
    settings = make_settings(tmp_path, admin_token=TOKEN, keep_versions=2)
    async with serve_in_process(settings) as client:
        uploads = [await upload(client, linear_weights(seed).data) for seed in range(1, 5)]
        listing = (await client.get("/v1/models/linear/versions")).json()

    kept = [u["version"] for u in uploads[2:]]
    assert stored_files(store) == sorted(blob(u["sha256"]) for u in uploads[2:])
    assert [v["version"] for v in listing["versions"]] == [BUNDLED.version, *kept]
    assert (listing["active"], listing["previous"]) == (kept[1], kept[0])


async def test_retention_never_removes_the_active_version(tmp_path: Path, store: Path) -> None:
    settings = make_settings(tmp_path, admin_token=TOKEN, keep_versions=2)
    async with serve_in_process(settings) as client:
        active = await upload(client, linear_weights(1).data)
        staged = [
            await upload(client, linear_weights(seed).data, activate="false")
            for seed in range(2, 5)
        ]
        served, outputs = await predict(client)

    remaining = {name.split("/")[-1][:12] for name in stored_files(store)}
    assert active["version"] in remaining
    assert {staged[-2]["version"], staged[-1]["version"]} <= remaining
    assert staged[0]["version"] not in remaining
    assert served == active["version"]
    assert_close(outputs, linear_weights(1).outputs(SAMPLES))


# --- refused uploads ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Refusal:
    """An upload that must be refused, and how."""

    body: Callable[[Path], bytes]
    status: int
    code: str
    fragments: tuple[str, ...] = ()
    model: str = "linear"
    headers: dict[str, str] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)
    multipart_field: str | None = None


WRONG_DIGEST = "0" * 64
REFUSALS = {
    "whole-pickled-model": Refusal(
        whole_pickled_model,
        422,
        "pickled_object_refused",
        ("whole pickled model", "torch.save(model.state_dict(), path)"),
    ),
    "pickle-running-code": Refusal(
        code_running_pickle, 422, "pickled_object_refused", ("nothing in it was executed",)
    ),
    "truncated": Refusal(
        truncated_torch_file, 422, "weights_unreadable", ("truncated or corrupt torch file",)
    ),
    "empty-body": Refusal(lambda _: b"", 422, "weights_unreadable", ("empty",)),
    "random-bytes": Refusal(
        random_bytes, 422, "weights_unreadable", ("not a torch.save or safetensors file",)
    ),
    "another-models-state-dict": Refusal(
        digits_weights,
        422,
        "weights_incompatible",
        ("missing keys: linear.weight, linear.bias", "unexpected keys: features.0.weight"),
    ),
    "wrong-shapes": Refusal(
        wrong_shapes,
        422,
        "weights_incompatible",
        ("linear.weight: expected float32[2, 10], found float32[3, 10]",),
    ),
    "uncastable-dtype": Refusal(
        uncastable_dtype,
        422,
        "weights_incompatible",
        ("linear.weight: expected float32[2, 10], found complex64[2, 10]",),
    ),
    "nan-weights": Refusal(nan_weights, 422, "non_finite_weights", ("linear.bias",)),
    "zip-bomb": Refusal(zip_bomb, 422, "weights_unreadable", ("zip bomb",)),
    "corrupt-safetensors-header": Refusal(
        corrupt_safetensors, 422, "weights_unreadable", ("corrupt safetensors file",)
    ),
    "digits-below-acceptance": Refusal(
        untrained_digits,
        422,
        "acceptance_failed",
        ("held-out accuracy", "below the required 0.9000"),
        model="digits",
    ),
    "sha256-mismatch-header": Refusal(
        lambda _: linear_weights(1).data,
        400,
        "digest_mismatch",
        (WRONG_DIGEST,),
        headers={"X-Content-SHA256": WRONG_DIGEST},
    ),
    "sha256-mismatch-query": Refusal(
        lambda _: linear_weights(1).data,
        400,
        "digest_mismatch",
        (WRONG_DIGEST,),
        params={"sha256": WRONG_DIGEST},
    ),
    "multipart-without-file-field": Refusal(
        lambda _: linear_weights(1).data,
        422,
        "invalid_input",
        ("no 'file' field",),
        multipart_field="weights",
    ),
}


async def snapshot(client: httpx.AsyncClient, model: str) -> tuple[str, Any, Any]:
    version, outputs = await predict(client, model)
    info = (await client.get(f"/v1/models/{model}")).json()
    return version, outputs, (info["version"], info["previous_version"])


async def assert_nothing_changed(
    client: httpx.AsyncClient, store: Path, model: str, before: tuple[Any, ...], files: list[str]
) -> None:
    assert await snapshot(client, model) == before
    assert stored_files(store, model) == files
    ready = await client.get("/health/ready")
    assert ready.status_code == 200, ready.text
    assert ready.json()["ready"] is True


@pytest.mark.parametrize("case", REFUSALS.values(), ids=REFUSALS.keys())
async def test_refused_upload_answers_one_error_body_stores_nothing_and_keeps_serving(
    admin: httpx.AsyncClient, tmp_path: Path, store: Path, case: Refusal
) -> None:
    if case.model == "linear":
        await upload(admin, linear_weights(2).data)  # an uploaded version serves
    before = await snapshot(admin, case.model)
    files = stored_files(store, case.model)
    data = case.body(tmp_path)
    headers = AUTH | case.headers
    request: dict[str, Any] = {"content": data}
    if case.multipart_field is not None:
        request = {"files": {case.multipart_field: ("weights.pth", data)}}

    response = await admin.put(
        f"/v1/models/{case.model}/weights", headers=headers, params=case.params, **request
    )

    body = assert_error_body(response, case.status, case.code)
    for fragment in case.fragments:
        assert fragment in body["error"]
    assert "\n" not in body["error"]
    assert not marker_of(tmp_path).exists()
    await assert_nothing_changed(admin, store, case.model, before, files)


async def test_weights_of_another_model_list_the_missing_and_unexpected_keys(
    admin: httpx.AsyncClient, tmp_path: Path
) -> None:
    response = await admin.put(WEIGHTS_URL, content=digits_weights(tmp_path), headers=AUTH)

    detail = assert_error_body(response, 422, "weights_incompatible")["detail"]
    assert detail["missing_keys"] == ["linear.weight", "linear.bias"]
    assert "features.0.weight" in detail["unexpected_keys"]
    assert "classifier.3.bias" in detail["unexpected_keys"]


async def test_wrong_shapes_name_the_expected_and_found_shapes_in_the_detail(
    admin: httpx.AsyncClient, tmp_path: Path
) -> None:
    response = await admin.put(WEIGHTS_URL, content=wrong_shapes(tmp_path), headers=AUTH)

    detail = assert_error_body(response, 422, "weights_incompatible")["detail"]
    assert detail["mismatched"][0] == {
        "key": "linear.weight",
        "expected_shape": [2, 10],
        "found_shape": [3, 10],
        "expected_dtype": "float32",
        "found_dtype": "float32",
    }


async def test_digits_weights_below_the_acceptance_bar_report_the_measured_score(
    admin: httpx.AsyncClient, tmp_path: Path
) -> None:
    response = await admin.put(
        "/v1/models/digits/weights", content=untrained_digits(tmp_path), headers=AUTH
    )

    body = assert_error_body(response, 422, "acceptance_failed")
    acceptance = body["detail"]["acceptance"]
    assert set(acceptance) == {"metric", "score", "threshold"}
    assert acceptance["metric"] == "held-out accuracy"
    assert acceptance["threshold"] == 0.9
    assert 0.0 <= acceptance["score"] < 0.9
    assert f"{acceptance['score']:.4f}" in body["error"]


async def test_pickle_crafted_to_run_code_never_runs(
    admin: httpx.AsyncClient, tmp_path: Path
) -> None:
    data = code_running_pickle(tmp_path)

    response = await admin.put(WEIGHTS_URL, content=data, headers=AUTH)
    multipart = await admin.put(WEIGHTS_URL, files={"file": ("evil.pth", data)}, headers=AUTH)

    assert_error_body(response, 422, "pickled_object_refused")
    assert_error_body(multipart, 422, "pickled_object_refused")
    assert not marker_of(tmp_path).exists()


async def chunked(data: bytes, size: int = 256) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


@pytest.mark.parametrize("streamed", [False, True], ids=["content-length", "streamed"])
async def test_upload_over_max_upload_bytes_is_413_and_stores_nothing(
    tmp_path: Path, store: Path, streamed: bool
) -> None:
    data = linear_weights(1).data
    assert len(data) > 1000
    settings = make_settings(tmp_path, admin_token=TOKEN, max_upload_bytes=1000)
    async with serve_in_process(settings) as client:
        before = await snapshot(client, "linear")
        content: bytes | AsyncIterator[bytes] = chunked(data) if streamed else data

        response = await client.put(WEIGHTS_URL, content=content, headers=AUTH)

        body = assert_error_body(response, 413, "payload_too_large")
        assert "limit of 1000" in body["error"]
        # Without a Content-Length the cap must trip while streaming, not on the header.
        declared = f"upload of {len(data)} bytes"
        assert (declared not in body["error"]) if streamed else (declared in body["error"])
        await assert_nothing_changed(client, store, "linear", before, [])


# --- authentication ----------------------------------------------------------------------------

MANAGEMENT = [
    ("PUT", WEIGHTS_URL),
    ("POST", f"/v1/models/linear/versions/{BUNDLED.version}/activate"),
    ("POST", "/v1/models/linear/rollback"),
    ("DELETE", "/v1/models/linear/versions/0123456789ab"),
]


@pytest.mark.parametrize(("method", "url"), MANAGEMENT)
async def test_without_an_admin_token_configured_management_is_disabled(
    tmp_path: Path, store: Path, method: str, url: str
) -> None:
    async with serve_in_process(make_settings(tmp_path)) as client:
        content = linear_weights(1).data if method == "PUT" else None

        response = await client.request(method, url, headers=AUTH, content=content)
        bare = await client.request(method, url, content=content)
        versions = await client.get("/v1/models/linear/versions")

        for answer in (response, bare):
            body = assert_error_body(answer, 403, "management_disabled")
            assert "MODELPORT_ADMIN_TOKEN" in body["error"]
        assert versions.status_code == 200
        assert stored_files(store) == []
        assert (await predict(client))[0] == BUNDLED.version


@pytest.mark.parametrize(("method", "url"), MANAGEMENT)
@pytest.mark.parametrize(
    ("authorization", "status", "code"),
    [
        (None, 401, "unauthorized"),
        ("Token x", 401, "unauthorized"),
        ("Bearer", 401, "unauthorized"),
        ("Bearer ", 401, "unauthorized"),
        (f"Basic {TOKEN}", 401, "unauthorized"),
        ("Bearer wrong-token-of-the-wrong-length", 403, "forbidden"),
        (f"Bearer {ONE_CHAR_OFF}", 403, "forbidden"),
        (f"Bearer {API_TOKEN}", 403, "forbidden"),
    ],
    ids=[
        "missing",
        "other-scheme",
        "bearer-alone",
        "bearer-empty",
        "basic",
        "wrong",
        "one-char-off",
        "api-token",
    ],
)
async def test_management_refuses_missing_malformed_and_wrong_credentials(
    admin: httpx.AsyncClient,
    tmp_path: Path,
    store: Path,
    method: str,
    url: str,
    authorization: str | None,
    status: int,
    code: str,
) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    content = linear_weights(1).data if method == "PUT" else None

    response = await admin.request(method, url, headers=headers, content=content)

    body = assert_error_body(response, status, code)
    assert TOKEN not in body["error"]
    if status == 401:
        assert response.headers["WWW-Authenticate"] == "Bearer"
    assert stored_files(store) == []
    assert (await predict(admin))[0] == BUNDLED.version


async def test_version_list_is_open_without_an_api_token(admin: httpx.AsyncClient) -> None:
    response = await admin.get("/v1/models/linear/versions")

    assert response.status_code == 200
    assert response.json()["active"] == BUNDLED.version


@pytest.mark.parametrize(
    ("method", "url", "json"),
    [
        ("POST", "/v1/models/linear/predict", {"inputs": SAMPLES}),
        ("POST", "/predict", {"model": "linear", "inputs": SAMPLES}),
        ("GET", "/v1/models", None),
        ("GET", "/v1/models/linear", None),
        ("GET", "/v1/models/linear/versions", None),
    ],
)
async def test_api_token_guards_predict_and_metadata_but_not_health(
    tmp_path: Path, method: str, url: str, json: Any
) -> None:
    settings = make_settings(tmp_path, admin_token=TOKEN, api_token=API_TOKEN)
    async with serve_in_process(settings) as client:
        missing = await client.request(method, url, json=json)
        wrong = await client.request(method, url, json=json, headers={"Authorization": "Bearer x"})
        with_api = await client.request(
            method, url, json=json, headers={"Authorization": f"Bearer {API_TOKEN}"}
        )
        with_admin = await client.request(method, url, json=json, headers=AUTH)
        live = await client.get("/health/live")
        ready = await client.get("/health/ready")

    assert_error_body(missing, 401, "unauthorized")
    assert missing.headers["WWW-Authenticate"] == "Bearer"
    assert_error_body(wrong, 403, "forbidden")
    assert with_api.status_code == 200, with_api.text
    assert with_admin.status_code == 200, with_admin.text
    assert live.status_code == 200
    assert ready.status_code == 200
