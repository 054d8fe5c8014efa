"""Shared test support: the constants and weights every tier uses, config files on tmp_path, the
app in process, real server processes and load on them, and waiting on a condition (never a
sleep that hopes)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import inspect
import io
import os
import re
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import tomli_w
import torch
from asgi_lifespan import LifespanManager
from torch import nn

from app.config import Settings, load_service_config
from app.http.app import create_app
from app.observability.metrics import Metrics
from app.serving.catalog import ModelSpec, discover, get_spec
from app.serving.manager import VersionManager
from app.serving.model import ServedModel
from app.serving.registry import ModelRegistry
from app.state.database import Actor
from models.linear import MyModel
from models.sentiment import SentimentClassifier

ROOT = Path(__file__).resolve().parent.parent
WEIGHTS = ROOT / "weights"
LINEAR = {"name": "linear", "class": "linear", "weights": str(WEIGHTS / "linear.pth")}
DIGITS = {"name": "digits", "class": "digits", "weights": str(WEIGHTS / "digits.pth")}
ACTOR = Actor(request_id=None, client="test")
"""Who the in-process tests' management calls are recorded as."""
BROKEN = {"name": "broken", "class": "linear", "weights": str(WEIGHTS / "digits.pth")}
"""A model whose weights do not fit its class (digits' for linear): unavailable from the start."""
SAMPLE = [0.5, -1.0, 2.0, 0.0, 1.5, -0.5, 0.25, 3.0, -2.0, 1.0]
"""One input of ``linear`` (its registered example); every value is exact in FP16 and BF16."""
TOKEN = secrets.token_urlsafe(32)
"""The admin token (MODELPORT_ADMIN_TOKEN) of the servers the tests start."""
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ONE_CHAR_OFF = TOKEN[:-1] + ("y" if TOKEN.endswith("x") else "x")
"""A wrong admin token, as close to the right one as can be."""
API_TOKEN = secrets.token_urlsafe(32)
"""The API token (MODELPORT_API_TOKEN), where a test sets one."""
CPU = torch.device("cpu")


# --- weights ------------------------------------------------------------------------------------


def seeded_state_dict(seed: int, cls: type[nn.Module] = MyModel) -> dict[str, torch.Tensor]:
    """The state_dict of a new ``cls`` (linear's class unless named) with seeded random weights."""
    torch.manual_seed(seed)
    return dict(cls().state_dict())


def saved(obj: object) -> bytes:
    """The bytes ``torch.save`` writes for ``obj``."""
    stream = io.BytesIO()
    torch.save(obj, stream)
    return stream.getvalue()


@dataclass(frozen=True)
class Weights:
    """The bytes of a ``linear`` weights file, and what the service calls them."""

    data: bytes

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def version(self) -> str:
        return self.sha256[:12]

    def outputs(self, batch: Sequence[Sequence[float]] | np.ndarray) -> list[list[float]]:
        """What ``linear`` computes on ``batch`` with these weights, outside any server."""
        model = MyModel().eval()
        model.load_state_dict(torch.load(io.BytesIO(self.data), weights_only=True))
        with torch.inference_mode():
            result: list[list[float]] = model(
                torch.as_tensor(np.asarray(batch, np.float32))
            ).tolist()
        return result

    def write(self, path: Path) -> Path:
        path.write_bytes(self.data)
        return path


def linear_weights(seed: int) -> Weights:
    """A ``linear`` state_dict file with seeded random weights."""
    return Weights(saved(seeded_state_dict(seed)))


BUNDLED = Weights((WEIGHTS / "linear.pth").read_bytes())
"""The bundled ``linear`` weights: the version a fresh store serves."""


def scaled_linear_weights(directory: Path, scale: float) -> Path:
    """A ``linear`` state_dict file whose outputs are easy to tell apart: every weight (and the
    first bias) is ``scale``."""
    path = directory / f"linear-{scale}.pth"
    state = {"linear.weight": torch.full((2, 10), scale), "linear.bias": torch.tensor([scale, 0.0])}
    torch.save(state, path)
    return path


class RunsCodeWhenUnpickled:
    """Pickles as a call to os.system; unpickling it would create ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def spec_named(name: str) -> ModelSpec:
    """The registration of ``name``, after importing every module of ``models``."""
    discover()
    spec = get_spec(name)
    assert spec is not None, f"{name!r} is not registered"
    return spec


# --- settings and the app in process ------------------------------------------------------------


def write_config(directory: Path, *models: dict[str, Any]) -> Path:
    """Write a TOML file serving ``models`` and return its path."""
    path = directory / "modelport.toml"
    path.write_text(tomli_w.dumps({"models": list(models)}), encoding="utf-8")
    return path


def make_settings(directory: Path, *models: dict[str, Any], **overrides: Any) -> Settings:
    """Settings serving ``models`` (default: the bundled two) from a config in ``directory``."""
    config = write_config(directory, *(models or (LINEAR, DIGITS)))
    overrides.setdefault("store_dir", directory / "store")
    return Settings(config=config, **overrides)


def registry_for(directory: Path, *models: dict[str, Any], **overrides: Any) -> ModelRegistry:
    """A registry of ``models`` (default: the bundled two) from a config in ``directory``,
    checked but not loaded, with metrics of its own."""
    settings = make_settings(directory, *models, **overrides)
    configs = load_service_config(settings.config)
    return ModelRegistry.from_settings(settings, configs, Metrics(list, [c.name for c in configs]))


async def store_version(model: ServedModel, path: Path, *, activate: bool = False) -> str:
    """Store ``path`` as a version of ``model`` through its manager (validated, as an upload
    is); its version id."""
    data = await asyncio.to_thread(path.read_bytes)

    async def body() -> AsyncIterator[bytes]:
        yield data

    staged = await model.state.incoming.receive(model.name, body(), 1 << 20)
    outcome = await VersionManager(model).upload(staged, path.name, [], activate, ACTOR)
    return outcome.record.id


@contextlib.asynccontextmanager
async def serve_in_process(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """The real app with its lifespan run, behind an httpx client (no sockets)."""
    app = create_app(settings)
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://modelport") as client:
            yield client


def metric(text: str, name: str, *, missing: float | None = None, **labels: str) -> float:
    """The sum of the samples of ``name`` in a scrape whose labels include ``labels``. With
    none, ``missing`` when given; a failure otherwise, so that a series that vanished is never
    read as a zero."""
    found = []
    for line in text.splitlines():
        if not line.startswith((name + "{", name + " ")):
            continue
        held = dict(re.findall(r'(\w+)="([^"]*)"', line.rsplit("}", 1)[0]))
        if all(held.get(k) == v for k, v in labels.items()):
            found.append(float(line.rsplit(" ", 1)[1]))
    if not found and missing is not None:
        return missing
    assert found, f"no sample of {name} with {labels} in the scrape"
    return sum(found)


# --- waiting on a condition ---------------------------------------------------------------------


def wait_until(
    condition: Callable[[], object],
    timeout: float,
    what: str = "the condition",
    *,
    every: float = 0.02,
    server: ServerProcess | None = None,
) -> float:
    """Poll ``condition`` until it holds; the seconds that took. Fails after ``timeout``
    seconds saying ``what`` did not happen (with ``server``'s output, and at once should that
    process exit)."""
    started = time.monotonic()
    while not condition():
        log = f":\n{server.output()}" if server is not None else ""
        if server is not None and server.process.poll() is not None:
            raise AssertionError(f"{what}: the process exited {server.process.returncode}{log}")
        if time.monotonic() - started > timeout:
            raise AssertionError(f"{what}: not after {timeout}s{log}")
        time.sleep(every)  # the polling interval
    return time.monotonic() - started


async def wait_until_async(
    condition: Callable[[], object | Awaitable[object]],
    what: str = "the condition",
    seconds: float = 10.0,
) -> None:
    """As :func:`wait_until`, in a test's event loop (which runs the tasks under test
    meanwhile); ``condition`` may be a coroutine function."""

    async def held() -> object:
        result = condition()
        return await result if inspect.isawaitable(result) else result

    try:
        async with asyncio.timeout(seconds):
            # ASYNC110: what is waited for (a gauge, a thread's progress) sets no Event to await
            while not await held():  # noqa: ASYNC110
                await asyncio.sleep(0.005)  # the polling interval, in which the others run
    except TimeoutError:
        raise AssertionError(f"{what}: not after {seconds}s") from None


# --- real server processes ----------------------------------------------------------------------


def clean_env(**variables: str) -> dict[str, str]:
    """This process's environment without MODELPORT_* variables, plus ``variables``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELPORT_")}
    # no gRPC door unless a test asks for one (MODELPORT_GRPC_PORT): one process at a time can
    # hold its default port, 8001, and the test servers run side by side
    env["MODELPORT_GRPC_PORT"] = "0"
    return env | variables


def socket_inodes(pid: int) -> list[int]:
    """The inode of each socket process ``pid`` holds, one per file descriptor (none once the
    process is gone; a descriptor closed while they are listed is left out)."""
    inodes = []
    with contextlib.suppress(OSError):
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.append(int(target[len("socket:[") : -1]))
    return inodes


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def uvicorn_factory(*extra: str) -> list[str]:
    """The command line of ``uvicorn --factory`` on the app factory."""
    return [sys.executable, "-m", "uvicorn", "--factory", "app.http.app:create_app", *extra]


class ServerProcess:
    """``python -m app`` (or any command) as a real process on 127.0.0.1."""

    def __init__(self, args: list[str], env: dict[str, str], port: int, log: Path) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self._path = log
        self._log = log.open("wb")
        self.process = subprocess.Popen(
            args, cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT
        )

    def answers(self, path: str, status: int = 200) -> bool:
        """Whether ``GET path`` answers ``status`` now."""
        with contextlib.suppress(httpx.HTTPError):
            return httpx.get(f"{self.url}{path}", timeout=2).status_code == status
        return False

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Block until ``/health/ready`` answers 200; fail with the server's log otherwise."""
        wait_until(lambda: self.answers("/health/ready"), timeout, "ready", every=0.1, server=self)

    def output(self) -> str:
        """Everything the process wrote so far."""
        return self._path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        """Signal the process and wait for it; returns its exit status."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode


@contextlib.contextmanager
def run_server(
    tmp_path: Path, config: Path, *extra: str, env: dict[str, str] | None = None
) -> Iterator[ServerProcess]:
    """Start ``python -m app`` on a free port serving ``config``; stop it afterwards."""
    port = free_port()
    server_env = clean_env(MODELPORT_STORE_DIR=str(tmp_path / "store"))
    server_env.update(env or {})
    args = [sys.executable, "-m", "app", "--port", str(port), "--config", str(config), *extra]
    server = ServerProcess(args, server_env, port, tmp_path / f"server-{port}.log")
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def replicas(tmp_path: Path, count: int, **variables: str) -> Iterator[list[ServerProcess]]:
    """``count`` server processes serving ``linear`` on their own ports and sharing one store
    folder (blobs, and the SQLite database unless ``variables`` name another), started
    together; all stopped on the way out, at once, so that each drains in parallel."""
    config = write_config(tmp_path, LINEAR)
    env = clean_env(
        MODELPORT_STORE_DIR=str(tmp_path / "store"), MODELPORT_ACCESS_LOG="false", **variables
    )
    servers: list[ServerProcess] = []
    try:
        for _ in range(count):
            port = free_port()
            args = [sys.executable, "-m", "app", "--port", str(port), "--config", str(config)]
            servers.append(ServerProcess(args, env, port, tmp_path / f"replica-{port}.log"))
        for server in servers:
            server.wait_ready()
        yield servers
    finally:
        for server in servers:
            if server.process.poll() is None:
                server.process.send_signal(signal.SIGTERM)
        for server in servers:
            with contextlib.suppress(subprocess.TimeoutExpired):
                server.process.wait(20)
            server.stop()


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    """A memory figure of a live process from ``/proc/PID/status`` (VmRSS, VmHWM...), in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise AssertionError(f"/proc/{pid}/status has no {field}")


def worker_pids(launcher: int) -> list[int]:
    """The live worker processes that the launcher ``launcher`` started (not multiprocessing's
    resource tracker)."""
    workers = []
    with contextlib.suppress(OSError):  # the launcher, or a thread of it, went away
        for task in Path(f"/proc/{launcher}/task").iterdir():
            for child in (task / "children").read_text().split():
                with contextlib.suppress(OSError):
                    if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
                        workers.append(int(child))
    return workers


class PeakRss:
    """How far a process's resident memory rose above its level at the start of the block,
    at its peak: the kernel's high-water mark (VmHWM), reset on entry through clear_refs."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.growth_mib = 0.0
        self._start = 0

    def __enter__(self) -> PeakRss:
        Path(f"/proc/{self.pid}/clear_refs").write_text("5")  # VmHWM := VmRSS now
        self._start = rss_kib(self.pid)
        return self

    def __exit__(self, *_: object) -> None:
        self.growth_mib = (rss_kib(self.pid, "VmHWM") - self._start) / 1024


# --- calls to a real server ---------------------------------------------------------------------


def described(server: ServerProcess, model: str = "linear") -> dict[str, Any]:
    """GET /v1/models/{model}: ``version`` serves here, ``active_version`` is the database's."""
    info: dict[str, Any] = httpx.get(f"{server.url}/v1/models/{model}", timeout=10).json()
    return info


def all_serve(servers: list[ServerProcess], version: str) -> Callable[[], bool]:
    """Whether every one of ``servers`` serves ``version`` of ``linear`` now."""
    return lambda: all(described(server)["version"] == version for server in servers)


def predict(
    server: ServerProcess, batch: list[list[float]] | None = None
) -> tuple[str, list[list[float]]]:
    """(version, outputs) of ``linear`` on ``batch`` (one SAMPLE unless given), checking that
    the answer is a 200 whose version header and body agree."""
    inputs = [SAMPLE] if batch is None else batch
    response = httpx.post(
        f"{server.url}/v1/models/linear/predict", json={"inputs": inputs}, timeout=10
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert response.headers["X-Model-Version"] == body["version"], response.headers
    return body["version"], body["outputs"]


def upload(server: ServerProcess, data: bytes, **params: str) -> httpx.Response:
    """PUT ``data`` as weights of ``linear``, with the admin token."""
    return httpx.put(
        f"{server.url}/v1/models/linear/weights",
        content=data,
        headers=AUTH,
        params=params,
        timeout=60,
    )


def activate(server: ServerProcess, version: str) -> httpx.Response:
    """Activate ``version`` of ``linear``, with the admin token."""
    url = f"{server.url}/v1/models/linear/versions/{version}/activate"
    return httpx.post(url, headers=AUTH, timeout=30)


def rollback(server: ServerProcess) -> httpx.Response:
    """Roll ``linear`` back to its previous version, with the admin token."""
    return httpx.post(f"{server.url}/v1/models/linear/rollback", headers=AUTH, timeout=30)


# --- load on real servers -----------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    """One predict as a load client saw it (status 0: the connection failed)."""

    server: int
    status: int
    version: str | None = None
    header: str | None = None
    outputs: list[list[float]] | None = None


class PredictLoad:
    """Client threads predicting ``linear`` on every server in a loop, each recording its
    answers in order; with ``probe_readiness``, a thread per server also records every
    readiness answer that is not 200."""

    def __init__(
        self,
        servers: list[ServerProcess],
        clients_per_server: int = 1,
        *,
        batch: list[list[float]] | None = None,
        probe_readiness: bool = False,
        pause_s: float = 0.0,
    ) -> None:
        self.servers = servers
        self.batch = [SAMPLE] if batch is None else batch
        self.pause_s = pause_s
        self.answers: list[list[Answer]] = []
        """Each client's answers, in order."""
        self.not_ready: list[tuple[int, int]] = []
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        for server in range(len(servers)):
            for _ in range(clients_per_server):
                answers: list[Answer] = []
                self.answers.append(answers)
                self._threads.append(
                    threading.Thread(target=self._predict_loop, args=(server, answers))
                )
            if probe_readiness:
                self._threads.append(threading.Thread(target=self._ready_loop, args=(server,)))

    def _predict_loop(self, server: int, answers: list[Answer]) -> None:
        with httpx.Client(base_url=self.servers[server].url, timeout=10) as http:
            while not self._stop.is_set():
                try:
                    response = http.post("/v1/models/linear/predict", json={"inputs": self.batch})
                except httpx.HTTPError:
                    answers.append(Answer(server, 0))
                    continue
                if response.status_code != 200:
                    answers.append(Answer(server, response.status_code))
                    continue
                body, header = response.json(), response.headers.get("X-Model-Version")
                answers.append(Answer(server, 200, body["version"], header, body["outputs"]))
                if self.pause_s:
                    time.sleep(self.pause_s)  # the load's pace, not a wait for anything

    def _ready_loop(self, server: int) -> None:
        with httpx.Client(base_url=self.servers[server].url, timeout=10) as http:
            while not self._stop.is_set():
                status = http.get("/health/ready").status_code
                if status != 200:
                    self.not_ready.append((server, status))
                time.sleep(0.02)  # the probes' pace, not a wait for anything

    def every(self) -> list[Answer]:
        return [answer for answers in self.answers for answer in answers]

    def failures(self) -> list[Answer]:
        return [answer for answer in self.every() if answer.status != 200]

    def seen_by(self, server: int) -> list[Answer]:
        return [answer for answer in self.every() if answer.server == server]

    def wait_for(self, version: str | None = None, timeout: float = 30.0) -> None:
        """Until every client has answered again since now (with ``version``, when given)."""
        marks = [len(answers) for answers in self.answers]

        def answered() -> bool:
            return all(
                any(version in (None, a.version) for a in answers[mark:])
                for answers, mark in zip(self.answers, marks, strict=True)
            )

        wait_until(answered, timeout, f"every client answered by version {version}")

    @contextlib.contextmanager
    def running(self) -> Iterator[PredictLoad]:
        for thread in self._threads:
            thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            for thread in self._threads:
                thread.join()

    def check(
        self,
        expected: Mapping[str, list[list[float]]],
        order: list[str] | None = None,
        least: int = 20,
    ) -> None:
        """No request failed and readiness never dropped; each server answered more than
        ``least`` times; every answer's version header agrees with its body and carries one of
        the ``expected`` versions, with exactly its outputs; and, given an ``order``, each client
        saw the versions change only forward through it."""
        every = self.every()
        failed = self.failures()
        assert not failed, f"{len(failed)} of {len(every)} requests failed: {failed[:5]}"
        assert not self.not_ready, f"readiness dropped: {self.not_ready[:5]}"
        for server in range(len(self.servers)):
            assert len(self.seen_by(server)) > least, f"server {server} saw little traffic"
        for answer in every:
            version, outputs = str(answer.version), answer.outputs
            assert answer.header == answer.version, answer
            assert version in expected, f"unknown version {version}"
            assert outputs is not None
            assert np.allclose(outputs, expected[version], atol=1e-6), (
                f"server {answer.server}: outputs are not those of {version}"
            )
        if order is not None:
            for answers in self.answers:
                positions = [order.index(str(a.version)) for a in answers]
                assert positions == sorted(positions), "a client saw an older version again"


def label_rows(output: torch.Tensor) -> list[dict[str, float]]:
    """A postprocess for tests: one label per row; a batch holding a row of 14 (twice 7) has
    none, so that a test can make the postprocess of one request fail."""
    if (output == 14).any():
        raise ValueError("no label for 14")
    return [{"sum": float(row.sum())} for row in output]


# --- the bundled model of several inputs and outputs ------------------------------------------

SENTIMENT = {"name": "sentiment", "class": "sentiment", "weights": str(WEIGHTS / "sentiment.pth")}
"""The bundled model of two inputs (input_ids, attention_mask) and two outputs (logits,
embedding)."""
_RNG = np.random.default_rng(1)
TOKENS = {
    "input_ids": _RNG.integers(0, 100, (200, 8)).astype(np.uint8),
    "attention_mask": (_RNG.random((200, 8)) < 0.7).astype(np.uint8),
}
"""A batch of sentiment's inputs by name: as uint8 (which the server widens to int64) one .npz
of it fits MAX_BODY_BYTES (3.7 kB), its JSON (8.7 kB) does not."""


def sentiment_outputs(inputs: dict[str, Any]) -> dict[str, np.ndarray]:
    """The bundled sentiment model's raw outputs on ``inputs`` (by name), outside any server."""
    model = SentimentClassifier().eval()
    model.load_state_dict(torch.load(WEIGHTS / "sentiment.pth", weights_only=True))
    tensors = {
        name: torch.as_tensor(np.asarray(value), dtype=torch.int64)
        for name, value in inputs.items()
    }
    with torch.inference_mode():
        outputs: dict[str, torch.Tensor] = model(**tensors)
    return {name: output.numpy() for name, output in outputs.items()}


def first(count: int) -> dict[str, np.ndarray]:
    """The first ``count`` samples of each input of TOKENS."""
    return {name: value[:count] for name, value in TOKENS.items()}
