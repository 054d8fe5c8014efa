"""Graceful shutdown of a real server process under load: on SIGTERM readiness turns 503, new
work is refused, everything accepted before the signal finishes, then the process exits 0."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch

from models.bench import CNN
from tests.helpers import (
    LINEAR,
    ServerProcess,
    metric,
    run_server,
    saved,
    seeded_state_dict,
    wait_until,
    write_config,
)

pytestmark = pytest.mark.process

SAMPLE_SHAPE = (3, 64, 64)
BODY_SENT = "http11.send_request_body.complete"
"""The httpcore trace event once a request's whole body is on the wire."""


@pytest.fixture
def cnn_weights(tmp_path: Path) -> Path:
    """Seeded bench-cnn weights: about 5 ms of forward per sample on one torch thread."""
    path = tmp_path / "cnn.pth"
    path.write_bytes(saved(seeded_state_dict(7, CNN)))
    return path


@pytest.fixture
def cnn_config(tmp_path: Path, cnn_weights: Path) -> Path:
    return write_config(
        tmp_path, {"name": "cnn", "class": "bench-cnn", "weights": str(cnn_weights)}
    )


def server_env(grace_s: float) -> dict[str, str]:
    return {
        "MODELPORT_TORCH_THREADS": "1",
        "MODELPORT_MAX_BODY_BYTES": str(64 * 1024 * 1024),
        "MODELPORT_SHUTDOWN_GRACE_S": str(grace_s),
        "MODELPORT_ACCESS_LOG": "false",
    }


def batches(count: int, samples: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.standard_normal((samples, *SAMPLE_SHAPE), dtype=np.float32) for _ in range(count)]


def raw_predict(url: str, batch: np.ndarray, timeout: float = 5, **kwargs: Any) -> httpx.Response:
    """One predict of raw float32 bytes on a new connection."""
    headers = {
        "Content-Type": "application/octet-stream",
        "X-Tensor-Shape": ",".join(str(d) for d in batch.shape),
        "X-Tensor-Dtype": "float32",
    }
    with httpx.Client(timeout=timeout) as http:
        return http.post(
            f"{url}/v1/models/cnn/predict", content=batch.tobytes(), headers=headers, **kwargs
        )


def expected_outputs(weights: Path, inputs: list[np.ndarray]) -> list[np.ndarray]:
    """The same weights' forward, in this process."""
    model = CNN().eval()
    model.load_state_dict(torch.load(weights, weights_only=True))
    with torch.inference_mode():
        return [model(torch.from_numpy(batch)).numpy() for batch in inputs]


class InFlight:
    """One client thread per batch, each sending its predict at once and recording the answer
    (a response, or the transport error that ended it)."""

    def __init__(self, url: str, inputs: list[np.ndarray]) -> None:
        self.url = url
        self.inputs = inputs
        self.answers: dict[int, httpx.Response | httpx.HTTPError] = {}
        self._sent = 0
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._send, args=(index,), daemon=True)
            for index in range(len(inputs))
        ]

    def _trace(self, event: str, _: dict[str, Any]) -> None:
        if event == BODY_SENT:
            with self._lock:
                self._sent += 1

    def _send(self, index: int) -> None:
        try:
            answer: httpx.Response | httpx.HTTPError = raw_predict(
                self.url, self.inputs[index], timeout=60, extensions={"trace": self._trace}
            )
        except httpx.HTTPError as exc:
            answer = exc
        with self._lock:
            self.answers[index] = answer

    @property
    def all_sent(self) -> bool:
        with self._lock:
            return self._sent == len(self.inputs)

    @property
    def finished(self) -> int:
        with self._lock:
            return len(self.answers)

    def join(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    @contextlib.contextmanager
    def running(self) -> Iterator[InFlight]:
        for thread in self._threads:
            thread.start()
        try:
            yield self
        finally:
            self.join(60)


def queue_depth(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=5).text
    return metric(text, "modelport_queue_depth", missing=0.0, model="cnn")


def wait_until_queued(url: str, load: InFlight, workers: int, timeout: float = 10.0) -> None:
    """Until every request has been received: all bodies sent, and all but the ones in a
    forward (one per worker) or already answered are waiting in the queue."""

    def received() -> bool:
        if not load.all_sent:
            return False
        depth = queue_depth(url)
        return depth >= 1 and depth + load.finished + workers >= len(load.inputs)

    wait_until(received, timeout, f"requests in flight ({load.finished} finished)")


def sigterm(server: ServerProcess) -> float:
    server.process.send_signal(signal.SIGTERM)
    return time.monotonic()


def wait_exit(server: ServerProcess, timeout: float) -> int | None:
    with contextlib.suppress(subprocess.TimeoutExpired):
        return server.process.wait(timeout)
    return None


def assert_refused_as_draining(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text
    assert response.json()["code"] == "draining"
    assert int(response.headers["Retry-After"]) >= 1


def assert_drained(
    load: InFlight, weights: Path, status: int | None, exited_after: float, grace_s: float, log: str
) -> None:
    """The process exited 0 within the grace period, and every request sent before the
    signal was answered, with its right outputs."""
    assert status == 0, log
    assert exited_after < grace_s
    assert sorted(load.answers) == list(range(len(load.inputs)))
    expected = expected_outputs(weights, load.inputs)
    for index, answer in load.answers.items():
        assert isinstance(answer, httpx.Response), f"request {index} lost: {answer!r}"
        assert answer.status_code == 200, f"request {index}: {answer.status_code} {answer.text}"
        outputs = np.asarray(answer.json()["outputs"], dtype=np.float32)
        assert np.allclose(outputs, expected[index], atol=1e-4), f"request {index}: wrong outputs"


def test_sigterm_under_load_turns_unready_refuses_new_work_and_finishes_every_accepted_request(
    tmp_path: Path, cnn_config: Path, cnn_weights: Path
) -> None:
    grace_s = 20.0
    inputs = batches(8, 64)  # about 0.3 s of forward each, one after the other
    with run_server(tmp_path, cnn_config, env=server_env(grace_s)) as server:
        with InFlight(server.url, inputs).running() as load:
            wait_until_queued(server.url, load, workers=1)
            finished_before = load.finished
            signalled = sigterm(server)
            ready = httpx.get(f"{server.url}/health/ready", timeout=5)
            refused = raw_predict(server.url, inputs[0][:1])
            finished_during_checks = load.finished
            load.join(30)
        status = wait_exit(server, grace_s)
        exited_after = time.monotonic() - signalled
        log = server.output()

    assert finished_before < len(inputs) - 2
    assert ready.status_code == 503, ready.text
    assert ready.json()["draining"] is True
    assert ready.json()["ready"] is False
    assert_refused_as_draining(refused)
    assert finished_during_checks < len(inputs), "the checks ran after the work had finished"
    assert_drained(load, cnn_weights, status, exited_after, grace_s, log)


def test_sigterm_to_the_supervisor_drains_every_worker_and_exits_zero(
    tmp_path: Path, cnn_config: Path, cnn_weights: Path
) -> None:
    grace_s = 20.0
    # 3,200 samples, 3-8 s of forward on 2 workers: the checks run meanwhile (with half as
    # many, a fast spell of the machine once finished them all before the last check, and the
    # workers, done, had closed: its predict found no server)
    inputs = batches(20, 160)
    with run_server(tmp_path, cnn_config, "--workers", "2", env=server_env(grace_s)) as server:
        started = "Application startup complete"
        wait_until(lambda: server.output().count(started) >= 2, 60, "two workers", server=server)
        with InFlight(server.url, inputs).running() as load:
            wait_until_queued(server.url, load, workers=2)
            signalled = sigterm(server)
            # the supervisor passes the signal on from its next check, within a fraction of a second
            readiness: list[httpx.Response] = []

            def unready(probes: int) -> bool:
                """The last ``probes`` readiness answers, each on a new connection (to either
                worker), were all 503."""
                readiness.append(httpx.get(f"{server.url}/health/ready", timeout=5))
                return all(r.status_code == 503 for r in readiness[-probes:])

            wait_until(lambda: unready(1), 2, "a worker draining")
            unready_after = time.monotonic() - signalled
            # and both: 8 new connections in a row all miss a worker that still serves with a
            # chance of 1 in 256
            wait_until(lambda: unready(8) and len(readiness) >= 8, 5, "both workers draining")
            refused = [raw_predict(server.url, inputs[0][:1]) for _ in range(4)]
            again = httpx.get(f"{server.url}/health/ready", timeout=5)
            finished_during_checks = load.finished
            load.join(30)
        status = wait_exit(server, grace_s)
        exited_after = time.monotonic() - signalled
        log = server.output()

    assert readiness[-1].status_code == 503, readiness[-1].text
    assert readiness[-1].json()["draining"] is True
    assert unready_after < 1.0
    assert again.status_code == 503
    assert again.json()["draining"] is True
    for response in refused:
        assert_refused_as_draining(response)
    assert finished_during_checks < len(inputs), "the checks ran after the work had finished"
    assert_drained(load, cnn_weights, status, exited_after, grace_s, log)


def test_work_beyond_a_short_grace_period_does_not_hold_the_process_past_it(
    tmp_path: Path, cnn_config: Path, cnn_weights: Path
) -> None:
    grace_s = 3.0
    # 5,120 samples, 10-25 s of forward at 2-5 ms a sample: far more than the grace period
    # allows (22 batches, ~5.6 s at the fastest, all fit in it once)
    inputs = batches(40, 128)
    with run_server(tmp_path, cnn_config, env=server_env(grace_s)) as server:
        with InFlight(server.url, inputs).running() as load:
            wait_until_queued(server.url, load, workers=1)
            signalled = sigterm(server)
            ready = httpx.get(f"{server.url}/health/ready", timeout=5)
            status = wait_exit(server, grace_s + 15)
            exited_after = time.monotonic() - signalled
            load.join(10)
        log = server.output()

    assert ready.status_code == 503
    assert status == 0, log
    # the grace period, then at most the forward in progress and the process's own teardown
    assert exited_after < grace_s + 2.5, f"exited {exited_after:.1f} s after SIGTERM:\n{log}"
    assert sorted(load.answers) == list(range(len(inputs))), "a client was left hanging"
    completed = [
        i for i, a in load.answers.items() if isinstance(a, httpx.Response) and a.status_code == 200
    ]
    assert completed, "nothing finished within the grace period"
    assert len(completed) < len(inputs), "all the work fit in the grace period after all"
    for index, answer in load.answers.items():  # cut off at the deadline: told to retry
        if index not in completed:
            assert isinstance(answer, httpx.Response), f"request {index}: {answer!r}"
            assert_refused_as_draining(answer)
    assert "Exception in ASGI application" not in log
    checked = sorted(completed)[:: max(1, len(completed) - 1)]  # the first and the last
    expected = dict(
        zip(checked, expected_outputs(cnn_weights, [inputs[i] for i in checked]), strict=True)
    )
    for index in checked:
        answer = load.answers[index]
        assert isinstance(answer, httpx.Response)
        assert np.allclose(answer.json()["outputs"], expected[index], atol=1e-4)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_burst_of_signals_never_leaves_the_launcher_hanging(tmp_path: Path, workers: str) -> None:
    """A signal landing while the handler of the first one runs (pkill together with a
    `timeout` that passes its own SIGTERM on, or a double ^C) left the process waiting forever on
    the lock that handler held; the handlers now take none. The race is rare, so this burst is a
    smoke test: the launcher must exit, whatever the timing."""
    config = write_config(tmp_path, LINEAR)
    with run_server(tmp_path, config, "--workers", workers) as server:
        with contextlib.suppress(ProcessLookupError):
            for _ in range(5000):  # ~0.5 s: some land while the first handler runs
                os.kill(server.process.pid, signal.SIGTERM)
                time.sleep(0.0001)  # the burst's pace (what is tested), not a wait
        status = wait_exit(server, 20)
        log = server.output()
    assert status is not None, f"still running 20 s after the signals:\n{log}"
    assert status in (0, -signal.SIGTERM), log  # a second SIGTERM means: stop now


def test_a_second_sigterm_ends_the_server_with_its_last_log_lines_written(tmp_path: Path) -> None:
    """The second SIGTERM means: stop now. uvicorn raises it again once it has shut down, and
    the process ends there, with no exit hook run: lines still queued for stderr were lost."""
    config = write_config(tmp_path, LINEAR)
    token = "t" * 32
    env = {"MODELPORT_ADMIN_TOKEN": token, "MODELPORT_SHUTDOWN_GRACE_S": "2"}
    head = (
        f"PUT /v1/models/linear/weights HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}"
        "\r\nContent-Length: 1000\r\n\r\n"
    )
    with (
        run_server(tmp_path, config, "--workers", "1", env=env) as server,
        socket.create_connection(("127.0.0.1", server.port)) as upload,
    ):
        upload.sendall(head.encode() + b"x" * 10)  # an upload in flight: the drain waits for it
        time.sleep(0.5)
        os.kill(server.process.pid, signal.SIGTERM)
        time.sleep(0.5)  # draining
        os.kill(server.process.pid, signal.SIGTERM)
        status = wait_exit(server, 20)
        log = server.output()
    assert status == -signal.SIGTERM, log
    assert "Finished server process" in log.splitlines()[-1], log
