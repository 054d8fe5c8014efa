"""Request ids, logs and Prometheus metrics."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from app.observability import logs
from app.observability.logs import (
    STDERR,
    StderrWriter,
    Tallied,
    configure_logging,
    request_id,
)
from app.observability.metrics import FLUSH_S, LATENCY_BUCKETS, Metrics
from tests.helpers import (
    API_TOKEN,
    AUTH,
    LINEAR,
    ONE_CHAR_OFF,
    ROOT,
    SAMPLE,
    TOKEN,
    clean_env,
    free_port,
    linear_weights,
    make_settings,
    metric,
    run_server,
    serve_in_process,
    wait_until,
    write_config,
)


async def test_a_caller_request_id_is_echoed_and_one_is_made_otherwise(
    client: httpx.AsyncClient,
) -> None:
    given = await client.post(
        "/v1/models/linear/predict", json={"inputs": [SAMPLE]}, headers={"X-Request-ID": "abc-1"}
    )
    made = await client.get("/v1/models/linear")
    bad = await client.get("/health/live", headers={"X-Request-ID": "no spaces allowed"})
    assert given.headers["X-Request-ID"] == "abc-1"
    assert re.fullmatch(r"[0-9a-f]{16}", made.headers["X-Request-ID"])
    assert bad.headers["X-Request-ID"] != "no spaces allowed"


@contextlib.contextmanager
def json_logs(level: str) -> Iterator[None]:
    """JSON log lines on stderr, from ``level`` up, for the block (then the root logger as it
    was)."""
    root = logging.getLogger()
    before = root.level
    configure_logging(level, "json")
    try:
        yield
    finally:
        STDERR.drain()
        root.handlers.clear()
        root.setLevel(before)


@pytest.mark.app
async def test_the_access_line_has_the_request_id_status_and_latency_and_skips_probes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async with serve_in_process(make_settings(tmp_path, LINEAR)) as client:
        await client.post(
            "/v1/models/nope/predict", json={"inputs": [SAMPLE]}, headers={"X-Request-ID": "req-7"}
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


@pytest.mark.app
@pytest.mark.parametrize("level", ["warning", "error"])
async def test_a_log_level_above_info_leaves_the_access_lines_out(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], level: str
) -> None:
    async with serve_in_process(make_settings(tmp_path, LINEAR, log_level=level)) as client:
        answer = await client.post("/v1/models/linear/predict", json={"inputs": [SAMPLE]})
        assert answer.status_code == 200
    assert " app.access " not in capsys.readouterr().err


@pytest.mark.app
async def test_json_access_lines_are_json_objects(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = make_settings(tmp_path, LINEAR, log_format="json")
    async with serve_in_process(settings) as client:
        await client.post("/predict", json={"inputs": [SAMPLE]}, headers={"X-Request-ID": "j-1"})
    (line,) = [x for x in capsys.readouterr().err.splitlines() if '"app.access"' in x]
    entry = json.loads(line)
    assert entry["request_id"] == "j-1"
    assert entry["level"] == "INFO"
    assert entry["message"].startswith("POST /predict 200 ")


def test_json_log_lines_hold_the_request_id_and_never_the_token(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Settings, or the token itself, logged as a message argument or an extra field: the
    line shows it masked."""
    settings = make_settings(tmp_path, LINEAR, admin_token=TOKEN)
    with json_logs("info"):
        rid = request_id.set("rid-42")
        logger = logging.getLogger("app.test")
        logger.info("loaded %s", "linear", extra={"model": "linear"})
        logger.info("settings %s, %r", settings, settings, extra={"token": settings.admin_token})
        request_id.reset(rid)
    err = capsys.readouterr().err
    entry, with_settings = (json.loads(line) for line in err.strip().splitlines()[-2:])
    assert entry["request_id"] == "rid-42"
    assert entry["message"] == "loaded linear"
    assert entry["model"] == "linear"
    assert entry["level"] == "INFO"
    assert with_settings["request_id"] == "rid-42"
    assert "admin_token" in with_settings["message"]
    assert with_settings["token"]
    assert TOKEN not in err


@pytest.mark.app
async def test_no_log_line_holds_a_token_that_a_request_carried(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Management with the admin token, refusals of a token one character off, predictions
    and a scrape with the API token, at the debug level: the access and audit lines name each
    request, and never a credential."""
    settings = make_settings(
        tmp_path,
        LINEAR,
        admin_token=TOKEN,
        api_token=API_TOKEN,
        log_format="json",
        log_level="debug",
    )
    api, wrong = (
        {"Authorization": f"Bearer {API_TOKEN}"},
        {"Authorization": f"Bearer {ONE_CHAR_OFF}"},
    )
    weights, predict = "/v1/models/linear/weights", "/v1/models/linear/predict"
    with json_logs(settings.log_level):  # as the launcher sets them up
        async with serve_in_process(settings) as client:
            answers = {
                "upload": await client.put(weights, content=linear_weights(3).data, headers=AUTH),
                "refused-upload": await client.put(weights, content=b"not weights", headers=AUTH),
                "wrong-rollback": await client.post("/v1/models/linear/rollback", headers=wrong),
                "predict": await client.post(predict, json={"inputs": [SAMPLE]}, headers=api),
                "wrong-predict": await client.post(
                    predict, json={"inputs": [SAMPLE]}, headers=wrong
                ),
                "scrape": await client.get("/metrics", headers=api),
            }
    err = capsys.readouterr().err
    statuses = {name: answer.status_code for name, answer in answers.items()}
    assert statuses == {
        "upload": 201,
        "refused-upload": 422,
        "wrong-rollback": 403,
        "predict": 200,
        "wrong-predict": 403,
        "scrape": 200,
    }
    entries = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    logged = {(entry["logger"], entry["request_id"]) for entry in entries}
    for name in ("upload", "refused-upload", "wrong-rollback"):
        assert ("app.audit", answers[name].headers["X-Request-ID"]) in logged, name
    for name in ("predict", "wrong-predict"):
        assert ("app.access", answers[name].headers["X-Request-ID"]) in logged, name
    for secret in (TOKEN, API_TOKEN, ONE_CHAR_OFF):
        assert secret not in err


async def test_metrics_count_requests_by_model_version_endpoint_and_status(
    client: httpx.AsyncClient,
) -> None:
    version = (await client.get("/v1/models/linear")).json()["version"]
    for _ in range(3):
        await client.post("/v1/models/linear/predict", json={"inputs": [SAMPLE]})
    await client.post("/v1/models/linear/predict", json={"inputs": [[1, 2]]})
    await client.post("/predict", json={"model": "linear", "inputs": [SAMPLE]})
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


@pytest.mark.app
async def test_metrics_count_uploads_and_refusals_by_reason(tmp_path: Path) -> None:
    async with serve_in_process(make_settings(tmp_path, LINEAR, admin_token=TOKEN)) as client:
        url = "/v1/models/linear/weights"
        await client.put(url, content=linear_weights(3).data, headers=AUTH)
        await client.put(url, content=b"not weights", headers=AUTH)
        await client.post("/v1/models/linear/rollback", headers=AUTH)
        await client.post("/v1/models/linear/rollback", headers={"Authorization": "Bearer x"})
        text = (await client.get("/metrics")).text
    total = "modelport_management_total"
    assert metric(text, total, action="upload", outcome="created") == 1
    assert metric(text, total, action="upload", outcome="refused:weights_unreadable") == 1
    assert metric(text, total, action="rollback", outcome="ok") == 1
    assert metric(text, total, model="linear", action="rollback", outcome="refused:forbidden") == 1


@pytest.mark.process
def test_metrics_add_up_across_worker_processes(tmp_path: Path) -> None:
    config = write_config(tmp_path, LINEAR)
    (tmp_path / "tmp").mkdir()  # where the launcher makes the workers' metrics folder
    with run_server(
        tmp_path, config, "--workers", "2", env={"TMPDIR": str(tmp_path / "tmp")}
    ) as server:
        for _ in range(40):
            # a new connection each time, so that both workers take some
            httpx.post(f"{server.url}/v1/models/linear/predict", json={"inputs": [SAMPLE]})
        [folder] = (tmp_path / "tmp").glob("modelport-metrics-*")

        def written() -> float:
            """The count in the workers' files: what each wrote by itself (a scrape would make
            the worker answering it write first)."""
            registry = CollectorRegistry()
            MultiProcessCollector(registry, path=str(folder))
            text = generate_latest(registry).decode()
            return metric(text, "modelport_requests_total", missing=0, model="linear", status="200")

        # each worker writes what it counted at least every FLUSH_S
        wait_until(lambda: written() == 40, FLUSH_S + 0.3, "both workers' counts written")
        scrapes = [httpx.get(f"{server.url}/metrics").text for _ in range(6)]
    latency = "modelport_request_duration_seconds"
    for text in scrapes:  # whichever worker answers, the count is the whole service's
        assert metric(text, "modelport_requests_total", model="linear", status="200") == 40
        assert metric(text, f"{latency}_count", model="linear") == 40
        assert metric(text, f"{latency}_bucket", model="linear", le="+Inf") == 40
        assert 0 < metric(text, f"{latency}_bucket", model="linear", le="1.0") <= 40


def test_deferred_observations_are_written_as_observe_and_inc_would() -> None:
    """The bulk write (one update per bucket touched) scrapes as prometheus_client's own
    Histogram and Counter would, however many times it is scraped."""
    values = [0.0001, 0.0005, 0.0007, 0.003, 0.003, 0.2, 7.0, 99.0, 0.0]
    deferred, direct = Metrics(list, ["m"]), CollectorRegistry()
    histogram = Histogram(
        "modelport_request_duration_seconds",
        "Time from the request's arrival to its answer.",
        ["model", "endpoint"],
        buckets=LATENCY_BUCKETS,
        registry=direct,
    )
    counter = Counter(
        "modelport_requests",
        "Requests by model, version, endpoint and status (health and metrics excluded).",
        ["model", "version", "endpoint", "status"],
        registry=direct,
    )
    for value in values:
        deferred.request_seconds.labels("m", "/e").observe(value)
        deferred.deferred_counter(deferred.requests.labels("m", "v", "/e", "200")).inc()
        histogram.labels("m", "/e").observe(value)
        counter.labels("m", "v", "/e", "200").inc()
    expected = families(generate_latest(direct), "modelport_request_duration_seconds")
    assert len(expected) == 2 + len(LATENCY_BUCKETS) + 3  # HELP, TYPE, buckets, +Inf, count, sum
    for _ in range(2):  # written once, not again
        scrape = deferred.render()[0]
        assert families(scrape, "modelport_request_duration_seconds") == expected
        assert families(scrape, "modelport_requests") == families(
            generate_latest(direct), "modelport_requests"
        )


def families(exposition: bytes, name: str) -> list[str]:
    """The lines of the family ``name`` (HELP, TYPE, samples), less the creation timestamps."""
    found = []
    for line in exposition.decode().splitlines():
        metric_name = line.split()[2] if line.startswith("#") else re.split(r"[{ ]", line)[0]
        if metric_name == name or metric_name.startswith(f"{name}_"):
            found.append(line)
    return [line for line in found if "_created" not in line]


@pytest.mark.app
async def test_with_request_ids_off_only_a_caller_id_is_answered_and_logged(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = make_settings(tmp_path, LINEAR, request_ids=False)
    async with serve_in_process(settings) as client:
        given = await client.post(
            "/v1/models/linear/predict", json={"inputs": [SAMPLE]}, headers={"X-Request-ID": "ab-1"}
        )
        plain = await client.post("/v1/models/linear/predict", json={"inputs": [SAMPLE]})
        route = await client.get("/v1/models/linear")
    assert given.headers["X-Request-ID"] == "ab-1"
    assert "X-Request-ID" not in plain.headers
    assert "X-Request-ID" not in route.headers
    assert plain.status_code == route.status_code == 200
    lines = [line for line in capsys.readouterr().err.splitlines() if "app.access" in line]
    assert any("[ab-1] POST /v1/models/linear/predict 200" in line for line in lines)
    assert any("[-] POST /v1/models/linear/predict 200" in line for line in lines)


@pytest.mark.app
async def test_with_request_metrics_off_requests_are_not_counted_but_batches_are(
    tmp_path: Path,
) -> None:
    settings = make_settings(tmp_path, LINEAR, request_metrics=False)
    async with serve_in_process(settings) as client:
        for _ in range(3):
            assert (await client.post("/predict", json={"inputs": [SAMPLE]})).status_code == 200
        text = (await client.get("/metrics")).text
    assert metric(text, "modelport_requests_total", missing=0) == 0
    assert metric(text, "modelport_request_duration_seconds_count", missing=0) == 0
    assert metric(text, "modelport_batch_size_sum", model="linear") == 3


@pytest.mark.process
def test_a_stderr_nobody_reads_never_holds_up_serving(tmp_path: Path) -> None:
    """The server's stderr is a pipe nobody empties (a log collector stalled): once the pipe's
    64 KiB are full, the access lines wait in the process, requests are still answered, and
    every line arrives once the pipe is read again."""
    port = free_port()
    config = write_config(tmp_path, LINEAR)
    args = [sys.executable, "-m", "app", "--port", str(port), "--config", str(config)]
    env = clean_env(MODELPORT_STORE_DIR=str(tmp_path / "store"))
    server = subprocess.Popen(
        args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        url = f"http://127.0.0.1:{port}"

        def ready() -> bool:
            with contextlib.suppress(httpx.HTTPError):
                return httpx.get(f"{url}/health/ready", timeout=2).status_code == 200
            return False

        wait_until(ready, 60, "ready")
        requests = 2_000  # ~190 KiB of access lines: three times what the pipe holds
        with httpx.Client(base_url=url, timeout=10) as client:
            for _ in range(requests):
                answer = client.post("/v1/models/linear/predict", json={"inputs": [SAMPLE]})
                assert answer.status_code == 200
        server.terminate()
        _, err = server.communicate(timeout=30)
    finally:
        server.kill()
        server.wait()
    assert err.count(b" INFO app.access ") == requests


@pytest.mark.unit
async def test_a_warning_clients_cause_is_logged_once_an_interval_and_the_rest_counted(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Logged one line each, 3,000 of them (heads timed out together) held the event loop,
    and every request with it, 0.2-0.5 s."""
    monkeypatch.setattr(Tallied, "INTERVAL_S", 0.2)
    tally = Tallied(logging.getLogger("tests.tallied"), "heads timed out")
    with caplog.at_level(logging.WARNING, "tests.tallied"):
        for number in range(5):
            tally.warning("head %d timed out", number)
        await asyncio.sleep(0.3)
        tally.warning("head %d timed out", 5)
        await asyncio.sleep(0.3)  # one alone: no count to tell
    assert caplog.messages == [
        "head 0 timed out",
        "4 more heads timed out in the last 0.2 s",
        "head 5 timed out",
    ]


@pytest.mark.unit
async def test_a_record_logged_on_the_event_loop_waits_for_stderr_only_when_it_must_be_written(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Off the loop a record waits for stderr (up to RECORD_WAIT_S: here, stalled, it times
    out); on the loop's thread, where every connection would wait with it, only one that must
    be written before the call returns (an audit line) does."""
    writer = StderrWriter()
    monkeypatch.setattr(logs, "STDERR", writer)
    reading, writing = os.pipe()
    stalled = os.fdopen(writing, "w")
    monkeypatch.setattr(sys, "stderr", stalled)
    log = logging.getLogger("tests.waits")
    log.addHandler(logs._StderrHandler())
    log.propagate = False
    try:
        writer.write("x" * (1 << 17) + "\n")  # more than the pipe holds: the writer blocks
        log.warning("on the loop")
        assert not writer._stalled  # it did not wait
        log.warning("an audit line", extra=logs.WRITTEN)
        assert writer._stalled  # it waited, and timed out
        writer._stalled = False
        await asyncio.to_thread(log.warning, "off the loop")
        assert writer._stalled
    finally:
        log.handlers.clear()
        log.propagate = True
        while select.select([reading], [], [], 0.5)[0] and os.read(reading, 1 << 16):
            pass  # the writer's thread writes it all, and is free again
        assert writer.drain()
        stalled.close()
        os.close(reading)


def test_text_beyond_what_may_wait_is_dropped_and_counted_once_stderr_reads_again() -> None:
    """Lines handed over while stderr blocks are held up to HELD_BYTES (those being written
    included); the rest are dropped, and a line says how many once stderr takes text again."""
    reading, writing = os.pipe()
    stalled = os.fdopen(writing, "w")
    writer = StderrWriter()
    writer.HELD_BYTES = 80_000
    line = "x" * 99 + "\n"
    before = sys.stderr
    sys.stderr = stalled
    received = b""
    try:
        writer.write(line * 700)  # more than the pipe holds (64 KiB): the writing thread blocks
        writer.write(line * 10)  # held: 71,000 bytes in all
        writer.write(line * 100)  # dropped: 81,000 would be held
        writer.write(line * 2)
        deadline = time.monotonic() + 30
        while received.count(b"\n") < 713 and time.monotonic() < deadline:
            if select.select([reading], [], [], 1.0)[0]:
                received += os.read(reading, 1 << 16)  # the collector reads again
        assert writer.drain()
    finally:
        sys.stderr = before
        stalled.close()
        os.close(reading)
    lines = received.decode().splitlines()
    notice = "WARNING app.logs: 100 log line(s) dropped: stderr was not read"
    # after the lines queued before the drop, or after all of them where the writing thread
    # took its first text only once the drop was counted
    assert lines.index(notice) in (710, 712)
    lines.remove(notice)
    assert lines == ["x" * 99] * 712


FORGED = "2026-12-06 07:00:00,000 WARNING app.security [-] forged"


@pytest.mark.process
def test_a_path_with_control_characters_cannot_forge_log_lines(tmp_path: Path) -> None:
    """A client's path percent-encodes a newline and a log line after it, a carriage return
    and a terminal's escape: the server decodes them, and wrote them raw into the text log."""
    config = write_config(tmp_path, LINEAR)
    hostile = [
        "/v1/models/x%0A" + FORGED.replace(" ", "%20") + "/predict",
        "/nothing%0D%1B%5B31mred%E2%80%A8",
    ]
    with run_server(tmp_path, config) as server:
        for path in hostile:
            assert httpx.post(f"{server.url}{path}", json={}).status_code == 404
        wait_until(lambda: server.output().count("/nothing") == 1, 10, "the access lines")
        output = server.output()
    lines = output.splitlines()
    assert not any(line.startswith(FORGED) for line in lines)
    assert any(f"POST /v1/models/x\\n{FORGED}/predict 404 " in line for line in lines)
    assert any("/nothing\\r\\x1b[31mred\\u2028 404" in line for line in lines)
    assert "\x1b" not in output
    assert "\r" not in output


def test_a_log_record_of_a_client_s_text_stays_one_line_with_its_traceback_after_it(
    capfd: pytest.CaptureFixture[str],
) -> None:
    configure_logging("info")
    try:
        raise ValueError("bad\nvalue")
    except ValueError:
        logging.getLogger("app.test").exception("refused %r then %s", "a\nb", "c\nd\x1b")
    STDERR.drain()
    err = capfd.readouterr().err
    first, *traceback = err.splitlines()
    assert first.endswith("app.test [-] refused 'a\\nb' then c\\nd\\x1b")
    assert traceback[0] == "Traceback (most recent call last):"
