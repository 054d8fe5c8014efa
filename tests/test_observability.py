"""Request ids, logs and Prometheus metrics."""

from __future__ import annotations

import json
import logging
import re
import secrets
import time
from pathlib import Path

import httpx
import pytest
import torch

from app.observability.logs import JsonFormatter, configure_logging, request_id
from app.observability.metrics import FLUSH_S, Metrics
from models.linear import MyModel
from tests.helpers import LINEAR, make_settings, run_server, serve_in_process, write_config

SAMPLE = [[0.5, -1.0, 2.0, 0.0, 1.5, -0.5, 0.25, 3.0, -2.0, 1.0]]
TOKEN = secrets.token_urlsafe(32)


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels`` (0 when none)."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.rsplit("}", 1)[0]))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def test_a_caller_request_id_is_echoed_and_one_is_made_otherwise(
    client: httpx.AsyncClient,
) -> None:
    given = await client.post(
        "/v1/models/linear/predict", json={"inputs": SAMPLE}, headers={"X-Request-ID": "abc-1"}
    )
    made = await client.get("/v1/models/linear")
    bad = await client.get("/health/live", headers={"X-Request-ID": "no spaces allowed"})
    assert given.headers["X-Request-ID"] == "abc-1"
    assert re.fullmatch(r"[0-9a-f]{16}", made.headers["X-Request-ID"])
    assert bad.headers["X-Request-ID"] != "no spaces allowed"


async def test_the_access_line_has_the_request_id_status_and_latency_and_skips_probes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async with serve_in_process(make_settings(tmp_path, LINEAR)) as client:
        await client.post(
            "/v1/models/nope/predict", json={"inputs": SAMPLE}, headers={"X-Request-ID": "req-7"}
        )
        await client.get("/health/ready", headers={"X-Request-ID": "probe-1"})
        await client.get("/metrics")
    lines = [line for line in capsys.readouterr().err.splitlines() if " app.access " in line]
    assert len(lines) == 1, f"health probes and scrapes are not traffic: {lines}"
    pattern = (
        r"\S+ \S+ INFO app\.access \[req-7\] "
        r'POST /v1/models/nope/predict 404 \d+\.\dms "127\.0\.0\.1"'
    )
    assert re.fullmatch(pattern, lines[0]), lines[0]


async def test_json_access_lines_are_json_objects(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = make_settings(tmp_path, LINEAR, log_format="json")
    async with serve_in_process(settings) as client:
        await client.post("/predict", json={"inputs": SAMPLE}, headers={"X-Request-ID": "j-1"})
    (line,) = [x for x in capsys.readouterr().err.splitlines() if '"app.access"' in x]
    entry = json.loads(line)
    assert entry["request_id"] == "j-1"
    assert entry["level"] == "INFO"
    assert entry["message"].startswith("POST /predict 200 ")


def test_json_log_lines_hold_the_request_id_and_never_the_token(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure_logging("info", "json")
    try:
        token = request_id.set("rid-42")
        logging.getLogger("app.test").info("loaded %s", "linear", extra={"model": "linear"})
        request_id.reset(token)
    finally:
        logging.getLogger().handlers.clear()
    entry = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert entry["request_id"] == "rid-42"
    assert entry["message"] == "loaded linear"
    assert entry["model"] == "linear"
    assert entry["level"] == "INFO"
    assert isinstance(JsonFormatter().format(logging.makeLogRecord({"msg": "x"})), str)


async def test_metrics_count_requests_by_model_version_endpoint_and_status(
    client: httpx.AsyncClient,
) -> None:
    version = (await client.get("/v1/models/linear")).json()["version"]
    for _ in range(3):
        await client.post("/v1/models/linear/predict", json={"inputs": SAMPLE})
    await client.post("/v1/models/linear/predict", json={"inputs": [[1, 2]]})
    await client.post("/predict", json={"model": "linear", "inputs": SAMPLE})
    for _ in range(5):
        await client.get("/health/ready")
        await client.get("/metrics")
    text = (await client.get("/metrics")).text
    endpoint = "/v1/models/{name}/predict"
    ok = metric(text, "modelport_requests_total", model="linear", endpoint=endpoint, status="200")
    assert ok == 3
    assert metric(text, "modelport_requests_total", version=version, endpoint=endpoint) == 3
    assert metric(text, "modelport_requests_total", model="linear", status="422") == 1
    assert metric(text, "modelport_requests_total", endpoint="/predict", status="200") == 1
    assert "/health/ready" not in text
    assert 'endpoint="/metrics"' not in text
    duration = "modelport_request_duration_seconds_count"
    assert metric(text, duration, model="linear", endpoint=endpoint) == 4
    assert metric(text, duration, model="linear", endpoint="/predict") == 1
    assert metric(text, duration, model="linear", endpoint="/v1/models/{name}") == 1
    assert metric(text, "modelport_queue_wait_seconds_count", model="linear") == 4
    assert metric(text, "modelport_compute_seconds_count", model="linear", version=version) >= 1
    assert metric(text, "modelport_batch_size_count", model="linear") >= 1
    assert metric(text, "modelport_batch_size_sum", model="linear") == 4
    assert metric(text, "modelport_queue_depth", model="linear") == 0
    sha = (await client.get("/v1/models/linear")).json()["weights"]["sha256"]
    assert metric(text, "modelport_active_version_info", model="linear", sha256=sha) == 1


async def test_metrics_count_uploads_and_refusals_by_reason(tmp_path: Path) -> None:
    torch.manual_seed(3)
    torch.save(MyModel().state_dict(), tmp_path / "new.pth")
    auth = {"Authorization": f"Bearer {TOKEN}"}
    async with serve_in_process(make_settings(tmp_path, LINEAR, admin_token=TOKEN)) as client:
        url = "/v1/models/linear/weights"
        await client.put(url, content=(tmp_path / "new.pth").read_bytes(), headers=auth)
        await client.put(url, content=b"not weights", headers=auth)
        await client.post("/v1/models/linear/rollback", headers=auth)
        await client.post("/v1/models/linear/rollback", headers={"Authorization": "Bearer x"})
        text = (await client.get("/metrics")).text
    total = "modelport_management_total"
    assert metric(text, total, action="upload", outcome="created") == 1
    assert metric(text, total, action="upload", outcome="refused:weights_unreadable") == 1
    assert metric(text, total, action="rollback", outcome="ok") == 1
    assert metric(text, total, model="linear", action="rollback", outcome="refused:forbidden") == 1


def test_metrics_add_up_across_worker_processes(tmp_path: Path) -> None:
    config = write_config(tmp_path, LINEAR)
    with run_server(tmp_path, config, "--workers", "2") as server:
        for _ in range(40):
            # a new connection each time, so that both workers take some
            httpx.post(f"{server.url}/v1/models/linear/predict", json={"inputs": SAMPLE})
        time.sleep(FLUSH_S + 0.3)  # each worker writes what it counted at least this often
        scrapes = [httpx.get(f"{server.url}/metrics").text for _ in range(6)]
    for text in scrapes:  # whichever worker answers, the count is the whole service's
        assert metric(text, "modelport_requests_total", model="linear", status="200") == 40


def test_deferred_observations_are_written_as_observe_and_inc_would() -> None:
    """The bulk write (one update per bucket touched) matches prometheus_client's own."""
    values = [0.0001, 0.0005, 0.0007, 0.003, 0.003, 0.2, 7.0, 99.0, 0.0]
    deferred, direct = Metrics(list, ["m"]), Metrics(list, ["m"])
    for value in values:
        deferred.deferred_histogram(deferred.request_seconds.labels("m", "/e")).observe(value)
        deferred.deferred_counter(deferred.requests.labels("m", "v", "/e", "200")).inc()
        direct.request_seconds.labels("m", "/e").observe(value)
        direct.requests.labels("m", "v", "/e", "200").inc()
    assert exposition(deferred) == exposition(direct)
    assert exposition(deferred) == exposition(direct)  # written once, not again


def exposition(metrics: Metrics) -> list[str]:
    """The scrape's lines, less the creation timestamps."""
    return [line for line in metrics.render()[0].decode().splitlines() if "_created" not in line]
