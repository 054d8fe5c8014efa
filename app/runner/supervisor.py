"""Running the service: one uvicorn process, or several, each accepting on its own
``SO_REUSEPORT`` socket so that the kernel spreads connections evenly between them (with one
shared listening socket, one busy worker tends to accept nearly every connection).

The supervisor of several workers imports neither torch nor the app (~230 MiB for as long as it
runs): each worker imports them, makes its app, and reports a config error back to it."""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
import socket
import tempfile
import time
from collections.abc import Callable, MutableSequence
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from types import FrameType
from typing import TYPE_CHECKING

import uvicorn
from fastapi import FastAPI
from prometheus_client.multiprocess import mark_process_dead

from app.config import Settings
from app.errors import ConfigError
from app.http.shutdown import draining
from app.observability.logs import STDERR, configure_logging
from app.observability.metrics import MULTIPROC_ENV

if TYPE_CHECKING:
    from app.http.endpoint import InferenceEndpoint

logger = logging.getLogger(__name__)
MAX_FAILED_STARTS = 3
"""Workers in a row that exit before they ever became ready; then the supervisor gives up."""
REFUSAL_BYTES = 4096
"""Room for the config error a worker reports to the supervisor (longer ones are cut)."""


class DrainingServer(uvicorn.Server):
    """uvicorn, draining on SIGTERM: readiness turns 503 and new requests are refused at once
    (:mod:`app.http.shutdown`); once the requests already accepted have finished, queued ones
    included, or the grace period is over, the usual shutdown follows and the process exits 0."""

    def __init__(
        self, config: uvicorn.Config, grace_s: float, on_ready: Callable[[], None] | None = None
    ) -> None:
        super().__init__(config)
        self.grace_s = grace_s
        self.on_ready = on_ready
        self.drain_deadline: float | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started and self.on_ready is not None:
            self.on_ready()  # the app's startup is done and the socket accepts

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig == signal.SIGTERM and self.drain_deadline is None:
            # first the deadline: a signal that lands while draining.set() holds its lock must
            # not come back here (it would wait on that lock forever)
            self.drain_deadline = time.monotonic() + self.grace_s
            draining.set()
            return  # not recorded as a captured signal: the exit status stays 0
        super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        # uvicorn calls this every 0.1 s; its open request tasks are the work in flight
        if self.drain_deadline is not None and not self.should_exit:
            idle = not self.server_state.tasks
            self.should_exit = idle or time.monotonic() >= self.drain_deadline
            if self.should_exit:
                # the grace period is spent: uvicorn's own wait for open requests is not a second
                # one, only time for the batch in progress to answer
                self.config.timeout_graceful_shutdown = 1
        return await super().on_tick(counter)


def server_for(
    app: FastAPI, settings: Settings, on_ready: Callable[[], None] | None = None
) -> DrainingServer:
    """uvicorn with the service's protocol, limits and gRPC door, serving ``app``; ``on_ready``
    is called once it listens."""
    from app.grpc.server import add_grpc_door  # torch: not in the supervisor
    from app.runner.limits import connection_cap
    from app.runner.protocol import head_limited

    add_grpc_door(app, settings)  # the app's lifespan opens it (not an app in a test's process)
    config = uvicorn.Config(
        app,
        http=head_limited(
            settings.max_header_bytes,
            settings.max_header_count,
            _lane(app),
            settings.client_timeout_s,
            connection_cap(settings.max_connections),
        ),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        log_config=None,  # app.observability.logs configures every logger, uvicorn's included
        access_log=False,  # the service writes its own access lines, with the request id
        timeout_graceful_shutdown=max(1, int(settings.shutdown_grace_s)),
        timeout_keep_alive=settings.keep_alive_s,
    )
    return DrainingServer(config, settings.shutdown_grace_s, on_ready)


def _lane(app: FastAPI) -> InferenceEndpoint | None:
    """The inference endpoint whose requests the protocol serves on its lane."""
    from app.http.app import ModelportAPI

    return app.front if isinstance(app, ModelportAPI) else None


def run(settings: Settings, app: FastAPI | None) -> int:
    """Serve until SIGTERM/SIGINT; returns the exit status. One process serves ``app`` (made
    from ``settings``); with several workers (``app`` None), each worker makes its own from
    ``settings``, and a config error one of them meets is raised here (ConfigError) once they
    have all stopped."""
    if app is not None:
        server_for(app, settings).run()
        return 0
    with tempfile.TemporaryDirectory(prefix="modelport-metrics-") as metrics_dir:
        # The workers share their metrics through this folder. prometheus_client reads it from
        # this variable only, as it is imported: the spawned workers import it afresh, with the
        # environment they inherit.
        os.environ[MULTIPROC_ENV] = metrics_dir
        return _Supervisor(settings).run()


def _worker(
    settings: Settings,
    ready: ctypes.c_bool,
    refusal: ctypes.Array[ctypes.c_char],
    busy: MutableSequence[int],
    index: int,
) -> None:
    """One worker process: the app made from ``settings``, its own socket on the shared port,
    then uvicorn; ``ready`` turns true once it serves; a config error goes to ``refusal``, for
    the supervisor to report once; it counts its forwards in ``busy[index]``
    (:mod:`app.serving.cores`)."""
    # imported here, not by the module: the supervisor imports it too, to start this function
    from app.http.app import create_app
    from app.serving import cores
    from app.serving.allocator import tune_heap

    tune_heap()  # before any other thread of this process allocates
    configure_logging(settings.log_level, settings.log_format)

    busy[index] = 0  # the slot of a worker that died mid-forward
    cores.install(busy, index)
    try:
        app = create_app(settings)
    except ConfigError as exc:  # the classes, kwargs and weights files were not checked before
        refusal.value = exc.message.encode()[: REFUSAL_BYTES - 1]
        raise SystemExit(2) from None
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((settings.host, settings.port))

    def on_ready() -> None:
        ready.value = True

    try:
        server_for(app, settings, on_ready).run(sockets=[sock])
    finally:
        STDERR.drain()  # a worker process ends with os._exit: no atexit hook runs


@dataclass
class _Worker:
    process: BaseProcess
    ready: ctypes.c_bool
    """Shared memory the worker sets once it serves: a plain flag, not an Event, whose lock a
    worker killed while setting it would leave held, and the supervisor waiting on for ever."""
    refusal: ctypes.Array[ctypes.c_char]
    """The config error that stopped the worker (empty: none)."""
    seen_ready: bool = False


class _Supervisor:
    """Starts the workers, replaces one that dies, and stops them all on a signal."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._context = multiprocessing.get_context("spawn")
        self._busy = self._context.RawArray(ctypes.c_int, settings.workers)
        """Each worker's forwards in progress (:mod:`app.serving.cores`)."""
        self._stopping = False
        """Set by the signal handler: a plain flag, since a signal landing while a handler
        holds a lock (``threading.Event.set`` takes one) would wait on it forever."""
        self._failed_starts = 0
        """Workers in a row that exited without ever becoming ready."""

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        workers = [self._start(index) for index in range(self.settings.workers)]
        while not self._stopping:
            for index, worker in enumerate(workers):
                if worker.process.is_alive():
                    if worker.ready.value and not worker.seen_ready:
                        worker.seen_ready = True
                        self._failed_starts = 0  # this one starts: what failed has passed
                    continue
                if worker.refusal.value:  # a config error: another worker would meet it too
                    self._shutdown(workers)
                    raise ConfigError(worker.refusal.value.decode(errors="replace"))
                if self._keeps_failing(worker):
                    self._shutdown(workers)
                    return 1
                mark_process_dead(worker.process.pid)  # type: ignore[no-untyped-call]
                logger.error(
                    "worker %s exited with status %s; starting another",
                    worker.process.pid,
                    worker.process.exitcode,
                )
                workers[index] = self._start(index)
            time.sleep(0.2)
        self._shutdown(workers)
        return 0

    def _start(self, index: int) -> _Worker:
        ready = self._context.RawValue(ctypes.c_bool, False)
        refusal = self._context.RawArray(ctypes.c_char, REFUSAL_BYTES)
        args = (self.settings, ready, refusal, self._busy, index)
        process = self._context.Process(target=_worker, args=args)
        process.start()
        return _Worker(process, ready, refusal)

    def _keeps_failing(self, worker: _Worker) -> bool:
        """Workers that keep dying before they serve will not get better by restarts; one that
        served and was killed later (out of memory, say) is replaced whatever the pace."""
        if worker.ready.value:
            self._failed_starts = 0
            return False
        self._failed_starts += 1
        if self._failed_starts < MAX_FAILED_STARTS:
            return False
        logger.error(
            "workers keep exiting at start (last status %s); stopping", worker.process.exitcode
        )
        return True

    def _on_signal(self, signum: int, _: FrameType | None) -> None:
        self._stopping = True

    def _shutdown(self, workers: list[_Worker]) -> None:
        for worker in workers:
            if worker.process.is_alive():
                worker.process.terminate()  # SIGTERM: each worker drains, then exits
        for worker in workers:
            worker.process.join(self.settings.shutdown_grace_s + 10)
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join()
