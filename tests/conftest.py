"""Fixtures (Settings on tmp_path, a client of the real app with its lifespan, the run's
PostgreSQL and S3 servers) and the test tiers.

Every test has one tier, which ``pytest -m`` selects on (``make test-quick``: unit and app):

- ``unit``: no app lifespan, no sockets, no processes;
- ``app``: the app in process (``serve_in_process``, the ``client`` fixture), still no sockets
  and no processes;
- ``process``: real server processes, sockets, the PostgreSQL and S3 servers, subprocesses.

A test's tier is its closest tier mark (its own or a fixture parameter's, then its class's, then
its module's ``pytestmark``); without one, the highest tier of the fixtures it uses
(FIXTURE_TIERS), else ``unit``. A mark below the tier of a fixture the test uses stops the
collection; and while a test is set up and runs, starting a process, opening a network socket
or (in ``unit``) running the app's lifespan fails it, so that no tier can be claimed falsely.
"""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import AsyncIterator, Callable, Generator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager

from app.config import Settings
from tests.helpers import make_settings, serve_in_process
from tests.services import PostgresServer, S3Server, postgres_server, s3_server

TIERS = ("unit", "app", "process")
FIXTURE_TIERS = {"client": "app", "postgres": "process", "s3": "process", "small_disk": "process"}
"""The tier each of these fixtures puts a test in, at least."""
_violations = pytest.StashKey[list[str]]()
_running: list[tuple[str, list[str]]] = []
"""The tier of the test being set up or run, and where its violations go (empty between)."""


def tier_of(item: pytest.Item) -> str:
    """The tier the collection gave ``item``."""
    return next(mark.name for mark in item.iter_markers() if mark.name in TIERS)


@pytest.hookimpl(tryfirst=True)  # before ``-m`` deselects by these marks
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    tiers = {}
    for item in items:
        fixtures = getattr(item, "fixturenames", ())
        implied = max(
            (FIXTURE_TIERS[name] for name in fixtures if name in FIXTURE_TIERS),
            key=TIERS.index,
            default="unit",
        )
        marked = next((mark.name for mark in item.iter_markers() if mark.name in TIERS), None)
        if marked is not None and TIERS.index(marked) < TIERS.index(implied):
            uses = sorted(n for n in fixtures if FIXTURE_TIERS.get(n) == implied)
            raise pytest.UsageError(
                f"{item.nodeid} is marked {marked}, but uses {', '.join(uses)} ({implied} tier)"
            )
        tiers[item] = marked or implied
    # ``-m`` selects on every mark a test inherits: each keeps its one tier, and no other
    for item, tier in tiers.items():
        for node in item.listchain():
            node.own_markers[:] = [mark for mark in node.own_markers if mark.name not in TIERS]
        item.add_marker(tier)


def _refused(what: str, needed: str, allowed: Callable[[str], bool]) -> None:
    """Record and raise a violation when the running test's tier does not allow ``what``."""
    if not _running or allowed(_running[-1][0]):
        return
    tier, violations = _running[-1]
    violations.append(f"a test of the {tier} tier {what}: mark it {needed}")
    raise AssertionError(violations[-1])


def _guard(
    cls: Any, name: str, what: str, needed: str, allowed: Callable[[Any, str], bool]
) -> None:
    original = getattr(cls, name)

    def guarded(self: Any, *args: Any, **kwargs: Any) -> Any:
        _refused(what, needed, lambda tier: allowed(self, tier))
        return original(self, *args, **kwargs)

    setattr(cls, name, guarded)


def pytest_configure(config: pytest.Config) -> None:
    def network(sock: socket.socket, tier: str) -> bool:
        return tier == "process" or sock.family not in (socket.AF_INET, socket.AF_INET6)

    _guard(subprocess.Popen, "__init__", "starts a process", "process", lambda _, t: t == "process")
    for name in ("bind", "connect", "connect_ex"):
        _guard(socket.socket, name, "opens a network socket", "process", network)
    _guard(LifespanManager, "__aenter__", "runs the app", "app", lambda _, t: t != "unit")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Generator[None, None, None]:
    item.stash[_violations] = []
    _running.append((tier_of(item), item.stash[_violations]))
    try:
        return (yield)
    finally:
        _running.pop()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, None, None]:
    _running.append((tier_of(item), item.stash[_violations]))
    try:
        result = yield
    finally:
        _running.pop()
    # a violation the code under test caught and swallowed still fails the test
    assert not item.stash[_violations], item.stash[_violations][0]
    return result


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """Settings serving the two bundled models."""
    return make_settings(tmp_path)


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the real app serving the bundled models."""
    async with serve_in_process(settings) as client:
        yield client


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs: a real file system that fills up (mounting needs root; skipped else)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "disk"
    mount.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.decode(errors='replace')}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """One real PostgreSQL server for the run (each test takes a new database of it); skipped
    where Debian's postgresql package is missing."""
    with postgres_server() as server:
        yield server


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """One real S3 API server (moto, its own process) for the run."""
    with s3_server(tmp_path_factory.mktemp("s3") / "moto.log") as server:
        yield server
