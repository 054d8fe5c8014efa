"""Hostile input against a real server process, as an outsider with a 1 MB body (and, for
uploads, an admin token) would send it: each class of cheap attack gets a clear 4xx, the server
still answers readiness afterwards, and its peak resident memory during the attack stays under
a stated bound (the same bodies cost up to gigabytes, or the process, before)."""

from __future__ import annotations

import io
import json
import os
import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from safetensors.torch import save as save_safetensors

from app.serving.inference import JSON_COUNTED_FROM
from models.digits import EXAMPLE_ZERO
from tests.helpers import (
    API_TOKEN,
    AUTH,
    BUNDLED,
    DIGITS,
    LINEAR,
    SAMPLE,
    TOKEN,
    PeakRss,
    ServerProcess,
    linear_weights,
    make_settings,
    metric,
    run_server,
    saved,
    seeded_state_dict,
    serve_in_process,
    upload,
    write_config,
)

pytestmark = pytest.mark.process

BODY_BOUND_MIB = 48
"""Most the server's resident memory may grow while it refuses a body of up to 1 MB: Python
objects of the parsed JSON and at most a copy or two, never an array built from strings."""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The bundled models, default settings (no tokens)."""
    tmp = tmp_path_factory.mktemp("open")
    with run_server(tmp, write_config(tmp, LINEAR, DIGITS)) as running:
        yield running


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """``linear`` with admin and API tokens and a 1 MiB upload cap."""
    tmp = tmp_path_factory.mktemp("guarded")
    env = {
        "MODELPORT_ADMIN_TOKEN": TOKEN,
        "MODELPORT_API_TOKEN": API_TOKEN,
        "MODELPORT_MAX_UPLOAD_BYTES": str(1024 * 1024),
    }
    with run_server(tmp, write_config(tmp, LINEAR), env=env) as running:
        yield running


def post(
    server: ServerProcess, path: str, content: bytes, **headers: str | bytes
) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", content=content, headers=headers, timeout=60)


def assert_ready(server: ServerProcess) -> None:
    assert httpx.get(f"{server.url}/health/ready", timeout=10).status_code == 200


def string_bomb(size: int) -> list[object]:
    """One long string and as many empty ones as fit in ``size`` bytes of JSON: numpy's type
    discovery would make a unicode array of 4 x len(long) x count bytes (~1 GB at 254 KB)."""
    long = "x" * 3000
    return [[long, *[""] * ((size - len(long)) // 3)]]


def npy(array: np.ndarray) -> bytes:
    stream = io.BytesIO()
    np.save(stream, array)
    return stream.getvalue()


def npy_header(shape: tuple[int, ...], descr: str = "<f4") -> bytes:
    """A valid .npy header declaring ``shape``, with no data after it."""
    stream = io.BytesIO()
    header = {"descr": descr, "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(stream, header)  # type: ignore[no-untyped-call]
    return stream.getvalue()


def v2_request(data: object, shape: list[int]) -> bytes:
    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": shape, "data": data}]}
    return json.dumps(body).encode()


# --- 1. memory amplification from small JSON bodies -------------------------------------------


@pytest.mark.parametrize("size", [60_000, 254_000, 790_000])
@pytest.mark.parametrize("door", ["native", "v2"])
def test_strings_in_a_json_body_are_refused_before_any_array_is_built(
    server: ServerProcess, door: str, size: int
) -> None:
    """Below JSON_COUNTED_FROM the type pass refuses them; from it, already the count of the
    body's commas (more than 256 samples of ``linear`` take)."""
    values = string_bomb(size)
    with PeakRss(server.process.pid) as rss:
        if door == "native":
            body = json.dumps({"inputs": values}).encode()
            response = post(server, "/v1/models/linear/predict", body)
        else:
            body = v2_request(values, [1, len(values[0])])
            response = post(server, "/v2/models/linear/infer", body)
    assert len(body) >= size * 0.9
    assert response.status_code == (422 if door == "native" else 400)
    refusal = "received strings" if len(body) < JSON_COUNTED_FROM else "too many values"
    assert refusal in response.json()["error"]
    assert rss.growth_mib < BODY_BOUND_MIB
    assert_ready(server)


def test_a_string_among_numbers_is_refused_however_it_is_quoted(server: ServerProcess) -> None:
    """The native path skips the type pass when the body's quotes are all keys' and the
    model's; strings hidden anywhere else still meet it."""
    bodies = [
        b'{"model": "linear", "inputs": [[1, 2, 3, 4, 5, 6, 7, 8, 9, "1e5"]]}',
        b'{"inputs": [[1, 2, 3, 4, 5, 6, 7, 8, 9, "\\u0031"]], "model": "linear"}',
        b'{"inputs": [["x", 2, 3, 4, 5, 6, 7, 8, 9, 0]], "model": "linear",'
        b' "inputs": [["y", 0, 0, 0, 0, 0, 0, 0, 0, 0]]}',
    ]
    for body in bodies:
        response = post(server, "/predict", body)
        assert response.status_code == 422, body
        assert "received strings" in response.json()["error"]


@pytest.mark.parametrize("path", ["/v1/models/linear/predict", "/v2/models/linear/infer"])
@pytest.mark.parametrize("non_finite", [False, True])
def test_json_nested_30000_deep_is_a_400(
    server: ServerProcess, path: str, non_finite: bool
) -> None:
    """Too deep for orjson; with a NaN in it, also too deep for the json fallback (a body
    under JSON_COUNTED_FROM: the parsers meet it)."""
    nested = b"[" * 30_000 + b"]" * 30_000
    body = b'{"inputs": [' + (b"NaN, " if non_finite else b"") + nested + b"]}"
    assert len(body) < JSON_COUNTED_FROM
    with PeakRss(server.process.pid) as rss:
        response = post(server, path, body)
    assert response.status_code == 400
    assert "malformed JSON" in response.json()["error"]
    assert rss.growth_mib < BODY_BOUND_MIB
    assert_ready(server)


HOSTILE_SHAPES = {
    "one-number arrays": b",".join([b"[0.5]"] * 170_000),
    "8-number arrays, one ragged": b",".join([b"[0.5,1,2,3,4,5,6,7]"] * 50_000) + b",[1]",
    "one long array": b"[" + b",".join([b"0.5"] * 250_000) + b"]",
    "nested 100000 deep": b"[" * 100_000 + b"]" * 100_000,
}


@pytest.mark.parametrize("values", HOSTILE_SHAPES.values(), ids=HOSTILE_SHAPES.keys())
@pytest.mark.parametrize("door", ["native", "named", "v2"])
def test_a_json_body_of_more_arrays_or_values_than_the_limit_takes_is_refused_unparsed(
    server: ServerProcess, door: str, values: bytes
) -> None:
    """A 1 MB body of small arrays parsed into lists held a worker's event loop ~50 ms (1.5 s
    at 16 MB): refused by counting its "[" and "," against what 256 samples of the model (of
    the largest model served, on /predict) are written with, before anything parses it."""
    if door == "v2":
        path = "/v2/models/linear/infer"
        body = v2_request("DATA", [1, 10]).replace(b'"DATA"', values)
    else:
        path = "/v1/models/linear/predict" if door == "named" else "/predict"
        model = b"" if door == "named" else b'"model": "linear", '
        body = b"{" + model + b'"inputs": [' + values + b"]}"
    with PeakRss(server.process.pid) as rss:
        response = post(server, path, body)
    assert response.status_code == (400 if door == "v2" else 422)
    error = response.json()["error"]
    assert re.match(r"too many (samples|values): the body holds \d+ (arrays|commas)", error)
    assert rss.growth_mib < BODY_BOUND_MIB
    assert_ready(server)


@pytest.mark.parametrize("door", ["native", "v2"])
def test_a_json_body_of_as_many_samples_as_the_limit_takes_is_served(
    server: ServerProcess, door: str
) -> None:
    """The counts refuse no body the model could take: 256 samples of ``linear``, written
    wide (indented), serve."""
    samples = np.tile(np.array(SAMPLE, np.float32), (256, 1))
    if door == "native":
        text = json.dumps({"inputs": samples.tolist()}, indent=12).encode()
        response = post(server, "/v1/models/linear/predict", text)
    else:
        text = json.dumps(json.loads(v2_request(samples.tolist(), [256, 10])), indent=12).encode()
        response = post(server, "/v2/models/linear/infer", text)
    assert len(text) >= JSON_COUNTED_FROM
    assert response.status_code == 200, response.text
    outputs = response.json()["outputs"]
    served = outputs if door == "native" else np.reshape(outputs[0]["data"], (256, 2))
    assert np.allclose(served, BUNDLED.outputs(samples.tolist()), atol=1e-5)


def test_nesting_deeper_than_the_cap_is_refused_by_the_type_pass(server: ServerProcess) -> None:
    body = v2_request("DATA", [1]).replace(b'"DATA"', b"[" * 1000 + b"1" + b"]" * 1000)
    response = post(server, "/v2/models/linear/infer", body)
    assert response.status_code == 400
    assert "nested deeper than 32" in response.json()["error"]


# --- 4. bad headers and declared shapes: 4xx, never 500 ---------------------------------------

RAW = "application/octet-stream"
SHAPE_CASES = {
    "65 dimensions": ",".join(["1"] * 65),
    "a product past int64": "4294967296,4294967296,4294967296",
    "a superscript digit": "1,\u00b2",
    "an underscore": "1_0",
    "a sign": "1,-10",
    "20 digits": "1,99999999999999999999",
}


@pytest.mark.parametrize("shape", list(SHAPE_CASES.values()), ids=list(SHAPE_CASES))
def test_a_bad_tensor_shape_header_is_a_400(server: ServerProcess, shape: str) -> None:
    response = post(
        server,
        "/v1/models/linear/predict",
        b"\0" * 4,
        **{
            "Content-Type": RAW,
            "X-Tensor-Dtype": "float32",
            "X-Tensor-Shape": shape.encode("latin-1"),
        },
    )
    assert response.status_code == 400
    assert "X-Tensor-Shape" in response.json()["error"] or "needs 3169" in response.json()["error"]
    assert_ready(server)


@pytest.mark.parametrize("value", ["\u00b2", "\u0661\u0662", "1_0", "-1"])
def test_a_header_length_not_in_ascii_digits_is_a_400(server: ServerProcess, value: str) -> None:
    response = post(
        server,
        "/v2/models/linear/infer",
        v2_request([SAMPLE], [1, 10]),
        **{"Inference-Header-Content-Length": value.encode("latin-1", "replace")},
    )
    assert response.status_code == 400
    assert "Inference-Header-Content-Length" in response.json()["error"]
    assert_ready(server)


@pytest.mark.parametrize(
    "body",
    [
        npy_header((10**6, 10**6)),
        npy_header((1,) * 40),
        npy_header((1, 10), "|O") + b"\0" * 80,
        npy(np.zeros((1, 10), np.float32))[:-4],
        npy(np.zeros((1, 10), np.float32)) + b"\0" * 4,
        b"\x93NUMPY\x03\x00" + b"\0" * 64,
    ],
    ids=["1e12 elements", "40 dims", "objects", "short", "long", "version 3"],
)
def test_an_npy_header_that_does_not_fit_its_bytes_is_a_400(
    server: ServerProcess, body: bytes
) -> None:
    with PeakRss(server.process.pid) as rss:
        response = post(
            server, "/v1/models/linear/predict", body, **{"Content-Type": "application/x-npy"}
        )
    assert response.status_code == 400
    assert ".npy" in response.json()["error"]
    assert rss.growth_mib < 8
    assert_ready(server)


@pytest.mark.parametrize(
    "shape", [[1] * 65, [2**63, 2**63], [2**64]], ids=["65 dims", "product", "past uint64"]
)
def test_a_v2_shape_that_cannot_be_is_a_400(server: ServerProcess, shape: list[int]) -> None:
    response = post(server, "/v2/models/linear/infer", v2_request([SAMPLE], shape))
    assert response.status_code == 400
    assert_ready(server)


def test_an_npy_body_still_serves(server: ServerProcess) -> None:
    """The header is read by hand now; a real .npy (Fortran order included) still works."""
    array = np.asfortranarray(np.array([SAMPLE, SAMPLE[::-1]], dtype=np.float64))
    response = post(
        server, "/v1/models/linear/predict", npy(array), **{"Content-Type": "application/x-npy"}
    )
    assert response.status_code == 200
    assert np.allclose(response.json()["outputs"], BUNDLED.outputs(array), atol=1e-6)


# --- 2. metric label cardinality --------------------------------------------------------------


def test_model_names_from_urls_never_become_metric_series(server: ServerProcess) -> None:
    with httpx.Client(base_url=server.url, timeout=10) as client:
        client.get("/v1/models/nothing")  # the fixed label's series, once
        client.post("/v1/models/nothing/predict", json={"inputs": [SAMPLE]})
        client.put("/v1/models/nothing/weights", content=b"x")
        client.get("/v2/models/nothing")
        before = client.get("/metrics").text
        names = [uuid.uuid4().hex for _ in range(400)]
        for name in names:
            assert client.get(f"/v1/models/{name}").status_code == 404
            assert (
                client.post(f"/v1/models/{name}/predict", json={"inputs": [SAMPLE]}).status_code
                == 404
            )
            assert client.put(f"/v1/models/{name}/weights", content=b"x").status_code == 403
            assert client.get(f"/v2/models/{name}").status_code == 404
        after = client.get("/metrics").text
    assert not any(name in after for name in names)
    assert 'model="_other"' in after
    assert series(after) == series(before)


def series(exposition: str) -> set[str]:
    """The series of a scrape: each sample's name and labels, without its value."""
    return {line.rsplit(" ", 1)[0] for line in exposition.splitlines() if not line.startswith("#")}


# --- 5. upload validation that cannot be made expensive ---------------------------------------


def test_an_expanded_tensor_the_model_does_not_take_costs_nothing(guarded: ServerProcess) -> None:
    """A 2 KB file whose extra key is a 1 x 1 float expanded to 40000 x 40000 (6.4 GB once
    materialised): the keys are matched first, so it is refused before any value is read."""
    weights = seeded_state_dict(1) | {"extra": torch.zeros(1).expand(40_000, 40_000)}
    data = saved(weights)
    with PeakRss(guarded.process.pid) as rss:
        response = upload(guarded, data)
    assert len(data) < 4096
    assert response.status_code == 422
    assert response.json()["code"] == "weights_incompatible"
    assert "unexpected keys: extra" in response.json()["error"]
    assert rss.growth_mib < BODY_BOUND_MIB
    assert_ready(guarded)


@pytest.mark.parametrize(
    "tensor",
    [
        torch.zeros(1).expand(2, 10),
        torch.zeros(20).as_strided((2, 10), (1, 1)),
        torch.empty(2, 10, device="meta"),
    ],
    ids=["expanded", "overlapping", "meta"],
)
def test_a_tensor_bigger_than_its_bytes_is_refused_naming_its_key_and_audited(
    guarded: ServerProcess, tensor: torch.Tensor
) -> None:
    response = upload(guarded, saved(seeded_state_dict(2) | {"linear.weight": tensor}))
    assert response.status_code == 422
    assert response.json()["code"] == "unsafe_tensor"
    assert "'linear.weight'" in response.json()["error"]
    assert re.search(r"upload model=linear .* outcome=refused:unsafe_tensor", guarded.output())
    assert_ready(guarded)


def test_every_management_failure_is_audited_even_for_a_model_that_does_not_exist(
    guarded: ServerProcess,
) -> None:
    name = uuid.uuid4().hex
    response = httpx.put(f"{guarded.url}/v1/models/{name}/weights", content=b"x", headers=AUTH)
    assert response.status_code == 404
    assert re.search(rf"upload model={name} .*outcome=refused:model_not_found", guarded.output())
    metrics = httpx.get(f"{guarded.url}/metrics", headers=AUTH).text
    assert name not in metrics
    assert 'modelport_management_total{action="upload",model="_other"' in metrics


# --- 7. caps count every byte; metrics and readiness -------------------------------------------


def test_non_file_parts_of_a_chunked_multipart_upload_count_toward_the_cap(
    guarded: ServerProcess,
) -> None:
    boundary = "hostile"

    def body() -> Iterator[bytes]:
        yield f'--{boundary}\r\nContent-Disposition: form-data; name="junk"\r\n\r\n'.encode()
        for _ in range(30):  # 30 MiB of junk against a 1 MiB cap
            yield b"j" * (1024 * 1024)
        yield f"\r\n--{boundary}--\r\n".encode()

    response = httpx.put(
        f"{guarded.url}/v1/models/linear/weights",
        content=body(),
        headers=AUTH | {"Content-Type": f"multipart/form-data; boundary={boundary}"},
        timeout=60,
    )
    assert response.status_code == 413
    assert_ready(guarded)


def test_metrics_need_the_api_token_when_one_is_set(guarded: ServerProcess) -> None:
    assert httpx.get(f"{guarded.url}/metrics").status_code == 401
    assert httpx.get(f"{guarded.url}/metrics", headers=AUTH).status_code == 200  # admin works too


def test_metrics_can_be_opened_to_scrapers_without_credentials(tmp_path: Path) -> None:
    env = {"MODELPORT_API_TOKEN": TOKEN, "MODELPORT_METRICS_PUBLIC": "true"}
    with run_server(tmp_path, write_config(tmp_path, LINEAR), env=env) as running:
        assert httpx.get(f"{running.url}/metrics").status_code == 200
        assert httpx.post(f"{running.url}/predict", json={"inputs": [SAMPLE]}).status_code == 401


def test_metadata_and_readiness_never_run_a_model(server: ServerProcess) -> None:
    def forward_passes() -> float:
        text = httpx.get(f"{server.url}/metrics").text
        return metric(text, "modelport_batch_size_count", model="digits")

    def predict_digits() -> None:
        body = {"inputs": [EXAMPLE_ZERO]}
        url = f"{server.url}/v1/models/digits/predict"
        assert httpx.post(url, json=body).status_code == 200

    predict_digits()  # a forward, so that the count exists (and a control: it counts forwards)
    before = forward_passes()
    for _ in range(5):
        assert httpx.get(f"{server.url}/v2/models/digits").status_code == 200
        assert httpx.get(f"{server.url}/v2/models/digits/ready").status_code == 200
    metadata = httpx.get(f"{server.url}/v2/models/digits").json()
    assert forward_passes() == before
    assert metadata["outputs"] == [{"name": "output", "datatype": "FP32", "shape": [-1, 10]}]
    predict_digits()
    assert forward_passes() == before + 1


# --- 6. faults answered with a reason ---------------------------------------------------------


def test_a_full_disk_during_an_upload_answers_507_audited_and_keeps_nothing(
    tmp_path: Path, small_disk: Path
) -> None:
    env = {"MODELPORT_ADMIN_TOKEN": TOKEN, "MODELPORT_STORE_DIR": str(small_disk)}
    with run_server(tmp_path, write_config(tmp_path, LINEAR), env=env) as running:
        response = upload(running, os.urandom(2 * 1024 * 1024))
        predict = httpx.post(f"{running.url}/predict", json={"inputs": [SAMPLE]})
        assert response.status_code == 507
        assert response.json()["code"] == "insufficient_storage"
        assert "No space left on device" in response.json()["error"]
        assert re.search(
            r"upload model=linear .*outcome=refused:insufficient_storage", running.output()
        )
        assert predict.status_code == 200
        assert sorted(p.name for p in (small_disk / "linear").rglob("*") if p.is_file()) == []


async def test_a_disk_that_fills_between_receiving_and_storing_answers_507_and_keeps_nothing(
    tmp_path: Path, small_disk: Path
) -> None:
    """The upload is received whole, then its blob cannot be written: no blob, no record, no
    staged bytes, and the active version serves on. (On the staged file's own file system the
    blob is a hard link of it and needs no room: here the blobs are on another, full one, so
    the blob is a copy.)"""
    data = save_safetensors(seeded_state_dict(5), metadata={"pad": "x" * 300_000})  # 300 KB
    store = tmp_path / "store"
    store.mkdir()
    (store / "blobs").symlink_to(small_disk)
    settings = make_settings(tmp_path, LINEAR, admin_token=TOKEN, store_dir=store)
    async with serve_in_process(settings) as client:
        before = (await client.get("/v1/models/linear/versions")).json()
        blobs_before = sorted(p.name for p in (store / "blobs").glob("*/*"))
        free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
        (small_disk / "filler").write_bytes(b"\0" * (free - len(data) // 2))
        response = await client.put("/v1/models/linear/weights", content=data, headers=AUTH)
        after = (await client.get("/v1/models/linear/versions")).json()
        served = await client.post("/predict", json={"inputs": [SAMPLE]})
    assert response.status_code == 507, response.text
    assert response.json()["code"] == "insufficient_storage"
    assert after == before
    assert sorted(p.name for p in (store / "blobs").glob("*/*")) == blobs_before
    assert list((store / "linear" / "incoming").iterdir()) == []
    assert served.status_code == 200


def test_weights_changed_on_disk_are_refused_at_load_with_a_loud_error(tmp_path: Path) -> None:
    env = {"MODELPORT_ADMIN_TOKEN": TOKEN}
    config = write_config(tmp_path, LINEAR)
    with run_server(tmp_path, config, env=env) as first:
        uploaded = upload(first, linear_weights(3).data).json()
    version, digest = uploaded["version"], uploaded["sha256"]
    stored = tmp_path / "store" / "blobs" / digest[:2] / digest
    stored.chmod(0o644)
    stored.write_bytes(linear_weights(4).data)  # other valid weights under the old name
    with run_server(tmp_path, config, env=env) as second:
        served = httpx.post(f"{second.url}/predict", json={"inputs": [SAMPLE]}).json()["version"]
        again = httpx.post(
            f"{second.url}/v1/models/linear/versions/{version}/activate", headers=AUTH
        )
        log = second.output()
    assert served != version
    assert re.search(rf"ERROR .*INSTEAD OF .*{version}.*has changed", log)
    assert again.status_code == 422
    assert again.json()["code"] == "blob_corrupt"


# --- 8. logs ----------------------------------------------------------------------------------


def test_json_log_lines_carry_no_terminal_escape_codes(tmp_path: Path) -> None:
    env = {"MODELPORT_LOG_FORMAT": "json"}
    with run_server(tmp_path, write_config(tmp_path, LINEAR), env=env) as running:
        httpx.get(f"{running.url}/v1/models/linear")
    lines = [json.loads(line) for line in running.output().splitlines() if line.startswith("{")]
    assert any("Uvicorn running" in line["message"] for line in lines)
    assert all("color_message" not in line for line in lines)
    assert "\x1b" not in running.output()
