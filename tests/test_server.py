"""Real server processes on 127.0.0.1: the digits accuracy over HTTP, restarts, the launchers."""

from __future__ import annotations

import signal
import socket
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import pytest

from app.__main__ import OPENMP_SPIN
from models.digits import HELDOUT
from tests.helpers import (
    ROOT,
    SAMPLE,
    ServerProcess,
    clean_env,
    free_port,
    run_server,
    uvicorn_factory,
    wait_until,
    worker_pids,
)

pytestmark = pytest.mark.process

BUNDLED_CONFIG = ROOT / "modelport.toml"


def test_digits_heldout_split_over_http_is_at_least_95_percent_accurate(tmp_path: Path) -> None:
    with np.load(HELDOUT, allow_pickle=False) as data:
        images, labels = data["images"], data["labels"]
    assert len(labels) >= 300
    predicted: list[int] = []
    with run_server(tmp_path, BUNDLED_CONFIG) as server, httpx.Client(base_url=server.url) as http:
        for start in range(0, len(images), 50):
            batch = images[start : start + 50].tolist()
            response = http.post("/v1/models/digits/predict", json={"inputs": batch})
            assert response.status_code == 200, response.text
            predicted += [output["label"] for output in response.json()["outputs"]]
    accuracy = float(np.mean(np.array(predicted) == labels))
    assert accuracy >= 0.95, f"held-out accuracy over HTTP: {accuracy:.4f}"


def test_restarted_server_serves_the_same_version_and_outputs(tmp_path: Path) -> None:
    answers = []
    for _ in range(2):
        with run_server(tmp_path, BUNDLED_CONFIG) as server:
            response = httpx.post(
                f"{server.url}/predict", json={"model": "linear", "inputs": [SAMPLE]}
            )
            answers.append((response.json()["version"], response.json()["outputs"]))
            # uvicorn re-raises SIGTERM after its graceful shutdown, so the status names it
            assert server.stop() in (0, -signal.SIGTERM)
            assert "Application shutdown complete" in server.output()
    assert answers[0] == answers[1]


def test_server_killed_with_sigkill_starts_again_and_serves(tmp_path: Path) -> None:
    with run_server(tmp_path, BUNDLED_CONFIG) as server:
        assert server.stop(signal.SIGKILL) == -signal.SIGKILL
    with run_server(tmp_path, BUNDLED_CONFIG) as server:
        response = httpx.post(f"{server.url}/v1/models/linear/predict", json={"inputs": [SAMPLE]})
        assert response.status_code == 200


def test_garbage_over_a_real_socket_never_stops_the_process(tmp_path: Path) -> None:
    with run_server(tmp_path, BUNDLED_CONFIG) as server:
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as raw:
            raw.sendall(b"\x00\xffNOT HTTP AT ALL\r\n\r\n")
            raw.recv(1024)
        oversized = httpx.post(f"{server.url}/predict", content=b"[" * (17 * 1024 * 1024))
        malformed = httpx.post(f"{server.url}/predict", content=b'{"inputs": [')
        ok = httpx.post(f"{server.url}/v1/models/linear/predict", json={"inputs": [SAMPLE]})
    assert oversized.status_code == 413
    assert malformed.status_code == 400
    assert ok.status_code == 200


def test_uvicorn_factory_serves_the_configured_models(tmp_path: Path) -> None:
    port = free_port()
    env = clean_env(MODELPORT_CONFIG=str(BUNDLED_CONFIG), MODELPORT_STORE_DIR=str(tmp_path))
    server = ServerProcess(
        uvicorn_factory("--port", str(port)), env, port, tmp_path / "uvicorn.log"
    )
    try:
        server.wait_ready()
        response = httpx.post(f"{server.url}/v1/models/linear/predict", json={"inputs": [SAMPLE]})
        assert response.status_code == 200
    finally:
        server.stop()


def test_two_workers_each_load_the_models_and_serve(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    with run_server(tmp_path, BUNDLED_CONFIG, "--workers", "2") as server:
        for _ in range(10):
            response = httpx.post(
                f"{server.url}/v1/models/linear/predict", json={"inputs": [SAMPLE]}
            )
            assert response.status_code == 200
        # readiness answered once the first worker was up; the second one loads too
        loaded = "model digits serving version"
        wait_until(lambda: server.output().count(loaded) >= 2, 60, "two workers", server=server)
        # their OpenMP threads sleep soon after a forward (app.__main__.OPENMP_SPIN)
        workers = worker_pids(server.process.pid)
        assert len(workers) == 2
        for pid in workers:
            assert f"GOMP_SPINCOUNT={OPENMP_SPIN}" in _environment(pid)


def test_an_operators_openmp_spin_is_kept(tmp_path: Path) -> None:
    with run_server(
        tmp_path, BUNDLED_CONFIG, "--workers", "2", env={"GOMP_SPINCOUNT": "7"}
    ) as server:
        wait_until(
            lambda: len(worker_pids(server.process.pid)) == 2, 60, "two workers", server=server
        )
        for pid in worker_pids(server.process.pid):
            assert "GOMP_SPINCOUNT=7" in _environment(pid)


def _environment(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/environ").read_bytes().decode().split("\0")


def test_launcher_flags_and_environment_choose_host_and_port(tmp_path: Path) -> None:
    port = free_port()
    env = clean_env(
        MODELPORT_PORT=str(port),
        MODELPORT_CONFIG=str(BUNDLED_CONFIG),
        MODELPORT_STORE_DIR=str(tmp_path),
    )
    server = ServerProcess([sys.executable, "-m", "app"], env, port, tmp_path / "env.log")
    try:
        server.wait_ready()
        assert "Uvicorn running on http://127.0.0.1:" in server.output()
    finally:
        server.stop()


def test_a_small_answer_reaches_the_client_in_one_tcp_segment(tmp_path: Path) -> None:
    """The launcher's protocol writes a small answer's head and body at once (uvicorn alone
    writes them apart: two segments, each paying the network path)."""
    segments = []
    with (
        run_server(tmp_path, BUNDLED_CONFIG) as server,
        socket.create_connection(("127.0.0.1", server.port), timeout=5) as raw,
    ):
        for _ in range(8):
            before = segments_received(raw)
            raw.sendall(PREDICT)
            read_until(raw, lambda data: data.endswith(b"]]}"))
            # what is counted is every segment of the answer: this pause lets a straggling
            # one arrive (its absence is the point, so there is no event to wait for)
            time.sleep(0.02)
            segments.append(segments_received(raw) - before)
    assert sorted(segments)[len(segments) // 2] == 1, segments


def test_head_pipelining_and_100_continue_work_with_the_one_write_protocol(
    tmp_path: Path,
) -> None:
    with run_server(tmp_path, BUNDLED_CONFIG) as server:
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as raw:
            raw.sendall(b"HEAD /health/live HTTP/1.1\r\nHost: x\r\n\r\n" + PREDICT + PREDICT)
            pipelined = read_until(raw, lambda data: data.count(b'"outputs"') == 2)
            raw.sendall(PREDICT.replace(b"\r\n\r\n", b"\r\nExpect: 100-continue\r\n\r\n", 1))
            continued = read_until(raw, lambda data: b'"outputs"' in data)
        openapi = httpx.get(f"{server.url}/openapi.json")  # a large answer
    head, _, after_head = pipelined.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 405")  # GET only; answered as a HEAD: no body
    assert b"content-length" in head
    assert after_head.startswith(b"HTTP/1.1 200")
    assert continued.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200")
    assert b"x-model-version" in continued.lower()
    assert openapi.status_code == 200
    assert len(openapi.content) > 32768
    assert openapi.json()["openapi"]


_BODY = b'{"inputs": [[0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0]]}'
PREDICT = (
    b"POST /v1/models/linear/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
    b"\r\nContent-Length: %d\r\n\r\n%s" % (len(_BODY), _BODY)
)


def segments_received(raw: socket.socket) -> int:
    """``tcpi_segs_in`` of Linux's ``struct tcp_info``."""
    info = raw.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    return int(struct.unpack_from("I", info, 140)[0])


def read_until(raw: socket.socket, done: Callable[[bytes], bool]) -> bytes:
    data = b""
    while not done(data):
        chunk = raw.recv(65536)
        assert chunk, f"connection closed after {data!r}"
        data += chunk
    return data
