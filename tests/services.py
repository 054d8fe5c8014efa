"""Real components for tests, started by the tests themselves on loopback: a PostgreSQL server
(Debian's postgresql package) and an S3 API server."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import psycopg
import pytest
from boto3.session import Session

from tests.helpers import free_port, wait_until

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client


def postgres_bin() -> Path | None:
    """The newest ``/usr/lib/postgresql/*/bin`` of Debian's postgresql package, if installed."""
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: p.parent.parent.name
    )
    return found[-1].parent if found else None


@contextlib.contextmanager
def postgres_server() -> Iterator[PostgresServer]:
    """A started PostgreSQL server, removed afterwards; skips the test where Debian's
    postgresql package is missing (.ci/run installs it)."""
    bin_dir = postgres_bin()
    if bin_dir is None:
        pytest.skip("Debian's postgresql package is not installed (.ci/run installs it)")
    server = PostgresServer(bin_dir)
    server.start()
    try:
        yield server
    finally:
        server.remove()


class PostgresServer:
    """A real PostgreSQL server (Debian's ``postgresql`` package) in a temporary folder, on a
    free loopback port; run as the ``postgres`` user when this process is root (initdb refuses
    root). fsync is off: these are tests, not the durability of the data."""

    def __init__(self, bin_dir: Path) -> None:
        self.bin_dir = bin_dir
        self.folder = Path(tempfile.mkdtemp(prefix="modelport-pg-"))
        self.data = self.folder / "data"
        self.port = free_port()
        self._as = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self._as:
            shutil.chown(self.folder, "postgres", "postgres")

    def _run(self, tool: str, *args: str) -> None:
        subprocess.run(
            [*self._as, str(self.bin_dir / tool), *args], check=True, capture_output=True
        )

    def start(self) -> None:
        """initdb (once) and start; returns when it accepts connections."""
        if not self.data.exists():
            self._run(
                "initdb",
                "-D",
                str(self.data),
                "-A",
                "trust",
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--no-sync",
            )
        options = f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run(
            "pg_ctl",
            "-D",
            str(self.data),
            "-l",
            str(self.folder / "log"),
            "-w",
            "-t",
            "60",
            "-o",
            options,
            "start",
        )

    def stop(self) -> None:
        """Stop the server (fast: open sessions are cut)."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def remove(self) -> None:
        """Stop it if it runs, and remove its folder."""
        with contextlib.suppress(subprocess.CalledProcessError):
            self.stop()
        shutil.rmtree(self.folder, ignore_errors=True)

    def url(self, database: str = "postgres") -> str:
        """A connection URL for ``database``."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """Create an empty database with a fresh name; its URL."""
        name = f"test_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url(), autocommit=True) as connection:
            connection.execute(f"CREATE DATABASE {name}")
        return self.url(name)


class S3Server:
    """A real S3 API server (moto's) as its own process on a free loopback port. It takes any
    access key, and what it stores lives in its memory only."""

    def __init__(self, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> None:
        """Start the process; returns when it answers HTTP."""
        command = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)]
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        wait_until(self._answers, timeout, f"moto answering (its output: {self.log})", every=0.1)

    def _answers(self) -> bool:
        """Whether the server answers HTTP (any status); fails once its process has exited."""
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"moto exited {self.process.returncode}:\n{self.output()}")
        with contextlib.suppress(httpx.HTTPError):
            httpx.get(f"{self.url}/moto-api/", timeout=2)
            return True
        return False

    def output(self) -> str:
        """Everything the process wrote so far."""
        return self.log.read_text(errors="replace")

    def environment(self) -> dict[str, str]:
        """The standard AWS settings that point a boto3 client at this server (with dummy
        credentials: moto takes any)."""
        return {
            "AWS_ENDPOINT_URL": self.url,
            "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test",
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def client(self) -> S3Client:
        """A boto3 S3 client of this server."""
        session = Session(
            aws_access_key_id="test", aws_secret_access_key="test", region_name="us-east-1"
        )
        return session.client("s3", endpoint_url=self.url)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the process (SIGTERM, then SIGKILL after ``timeout``)."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@contextlib.contextmanager
def s3_server(log: Path) -> Iterator[S3Server]:
    """A started S3Server writing its output to ``log``, stopped on the way out."""
    server = S3Server(log)
    try:
        server.start()
        yield server
    finally:
        server.stop()
