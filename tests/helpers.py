"""Shared test helpers: config files on tmp_path, in-process clients, real server processes."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import tomli_w
from asgi_lifespan import LifespanManager

from app.config import Settings
from app.http.app import create_app
from app.serving.catalog import ModelSpec, discover, get_spec

ROOT = Path(__file__).resolve().parent.parent
WEIGHTS = ROOT / "weights"
LINEAR = {"name": "linear", "class": "linear", "weights": str(WEIGHTS / "linear.pth")}
DIGITS = {"name": "digits", "class": "digits", "weights": str(WEIGHTS / "digits.pth")}


def spec_named(name: str) -> ModelSpec:
    """The registration of ``name``, after importing every module of ``models``."""
    discover()
    spec = get_spec(name)
    assert spec is not None, f"{name!r} is not registered"
    return spec


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


@contextlib.asynccontextmanager
async def serve_in_process(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """The real app with its lifespan run, behind an httpx client (no sockets)."""
    app = create_app(settings)
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://modelport") as client:
            yield client


def clean_env(**variables: str) -> dict[str, str]:
    """This process's environment without MODELPORT_* variables, plus ``variables``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELPORT_")}
    return env | variables


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


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

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Block until ``/health/ready`` answers 200; fail with the server's log otherwise."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"server exited {self.process.returncode}:\n{self.output()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/health/ready", timeout=2).status_code == 200:
                    return
            time.sleep(0.1)
        raise AssertionError(f"server not ready after {timeout}s:\n{self.output()}")

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


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    """A memory figure of a live process from ``/proc/PID/status`` (VmRSS, VmHWM...), in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise AssertionError(f"/proc/{pid}/status has no {field}")


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
